//! Per-service uids, for when meshbox runs as root: every service runs under
//! a uid (and gid) of its own, stable across restarts, from the range
//! [`UID_BASE`] .. [`UID_BASE`] + [`UID_COUNT`]. The first choice is a hash
//! of mesh and name; a collision probes on. Allocations are kept in
//! `<data-dir>/sandbox-uids.json` so a service keeps its uid (and so owns its
//! home) while it is in use.
//!
//! The table is bounded: past [`MAX_ENTRIES`] owners, the least recently
//! started owner whose uid no process runs under is forgotten, and its home
//! (recorded with the entry) is handed back to root (mode 0700) so a later
//! owner of the same uid cannot enter it; the forgotten owner, back, gets
//! a uid again and its home back (the backend chowns a home whose owner
//! differs).
//!
//! Owns the allocation table only; it never changes a process's ids.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::model::ServiceKey;

/// First uid meshbox gives to services (documented in the README).
pub const UID_BASE: u32 = 1_800_000_000;
/// How many uids the range holds.
pub const UID_COUNT: u32 = 1 << 20;
/// Most owners the table keeps.
pub const MAX_ENTRIES: usize = 4096;
/// A start refreshes an entry's stored `used` time when it is older than this.
const REFRESH_SECS: u64 = 24 * 3600;

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// One owner's allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    uid: u32,
    /// When a sandbox of it last started (seconds since the epoch; coarse).
    #[serde(default)]
    used: u64,
    /// Its home, handed back to root when the entry is forgotten.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    home: Option<PathBuf>,
}

/// An entry as stored: the current shape, or a bare uid (older tables).
#[derive(Deserialize)]
#[serde(untagged)]
enum Stored {
    Entry(Entry),
    Uid(u32),
}

/// The allocation table, persisted next to the data it protects.
pub struct Uids {
    file: Option<PathBuf>,
    table: Mutex<BTreeMap<String, Entry>>,
    cap: usize,
}

fn key_of(k: &ServiceKey) -> String {
    format!("{}/{}", k.mesh, k.name)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether any process runs under `uid` (as the owner of its /proc entry).
fn uid_in_use(uid: u32) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .any(|e| e.metadata().is_ok_and(|m| m.uid() == uid))
}

/// Forgets least recently used entries (never `keep`, never one whose uid
/// is `in_use`) until fewer than `cap` remain; what was forgotten.
fn evict(
    table: &mut BTreeMap<String, Entry>,
    cap: usize,
    keep: &str,
    in_use: impl Fn(u32) -> bool,
) -> Vec<Entry> {
    let mut gone = Vec::new();
    if table.len() < cap {
        return gone;
    }
    let mut by_age: Vec<(u64, String)> = table
        .iter()
        .filter(|(k, _)| k.as_str() != keep)
        .map(|(k, e)| (e.used, k.clone()))
        .collect();
    by_age.sort();
    for (_, k) in by_age {
        if table.len() < cap {
            break;
        }
        if !in_use(table[&k].uid) {
            gone.extend(table.remove(&k));
        }
    }
    gone
}

/// The longest a change to the uid table waits for another process's.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The table as `file` holds it (empty when absent or unreadable).
fn read_table(file: &Path) -> BTreeMap<String, Entry> {
    let stored: BTreeMap<String, Stored> = std::fs::read(file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    stored
        .into_iter()
        .map(|(k, s)| {
            let e = match s {
                Stored::Entry(e) => e,
                Stored::Uid(uid) => Entry {
                    uid,
                    used: 0,
                    home: None,
                },
            };
            (k, e)
        })
        .collect()
}

/// Hands a forgotten owner's home back to root, so whoever gets its uid
/// next cannot enter it.
fn disown_home(e: &Entry) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(home) = &e.home else { return };
    let Ok(meta) = std::fs::symlink_metadata(home) else {
        return;
    };
    if meta.is_dir() && meta.uid() == e.uid {
        let _ = std::os::unix::fs::lchown(home, Some(0), Some(0));
        let _ = std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700));
    }
}

impl Uids {
    pub fn open(data_dir: Option<&Path>) -> Uids {
        let file = data_dir.map(|d| d.join("sandbox-uids.json"));
        let table = file.as_deref().map(read_table).unwrap_or_default();
        Uids {
            file,
            table: Mutex::new(table),
            cap: MAX_ENTRIES,
        }
    }

    /// Several meshbox processes (`meshbox run`s, a `serve`) share one table
    /// file: each change is made under an exclusive lock on its lock file,
    /// to the table as that file holds it then. `None` without a file.
    fn lock_file(&self) -> std::io::Result<Option<std::fs::File>> {
        let Some(f) = &self.file else {
            return Ok(None);
        };
        let lock = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(f.with_extension("lock"))?;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match lock.try_lock() {
                Ok(()) => return Ok(Some(lock)),
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(std::io::Error::other(format!(
                        "{} is locked by another meshbox for over {} s",
                        f.display(),
                        LOCK_WAIT.as_secs()
                    )))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(e),
            }
        }
    }

    fn save(&self, table: &BTreeMap<String, Entry>) -> std::io::Result<()> {
        if let Some(f) = &self.file {
            let tmp = f.with_extension(format!("json.{}.tmp", std::process::id()));
            std::fs::write(&tmp, serde_json::to_vec(table).unwrap_or_default())?;
            std::fs::rename(&tmp, f)?;
        }
        Ok(())
    }

    /// The uid of `key`, allocated on first use; `home` is recorded with it.
    pub fn get(&self, key: &ServiceKey, home: Option<&Path>) -> std::io::Result<u32> {
        let k = key_of(key);
        let now = now();
        let mut table = self.table.lock().expect("uid table poisoned");
        let _locked = self.lock_file()?;
        if let Some(f) = &self.file {
            // What other processes allocated meanwhile.
            *table = read_table(f);
        }
        if let Some(e) = table.get_mut(&k) {
            let uid = e.uid;
            let stale = now.saturating_sub(e.used) > REFRESH_SECS;
            let moved = home.is_some() && e.home.as_deref() != home;
            if stale || moved {
                e.used = now;
                if home.is_some() {
                    e.home = home.map(Path::to_path_buf);
                }
                self.save(&table)?;
            }
            return Ok(uid);
        }
        for gone in evict(&mut table, self.cap, &k, uid_in_use) {
            disown_home(&gone);
        }
        if table.len() >= self.cap {
            return Err(std::io::Error::other(
                "the service uid table is full: every uid in it is in use",
            ));
        }
        let taken: std::collections::HashSet<u32> = table.values().map(|e| e.uid).collect();
        let start = fnv1a(k.as_bytes()) % UID_COUNT;
        let uid = (0..UID_COUNT)
            .map(|i| UID_BASE + (start + i) % UID_COUNT)
            .find(|u| !taken.contains(u))
            .ok_or_else(|| std::io::Error::other("the service uid range is exhausted"))?;
        table.insert(
            k,
            Entry {
                uid,
                used: now,
                home: home.map(Path::to_path_buf),
            },
        );
        self.save(&table)?;
        Ok(uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(m: &str, n: &str) -> ServiceKey {
        ServiceKey {
            mesh: m.into(),
            name: n.into(),
        }
    }

    #[test]
    fn stable_distinct_and_persisted() {
        let d = tempfile::tempdir().unwrap();
        let u = Uids::open(Some(d.path()));
        let a = u.get(&key("acme", "time"), None).unwrap();
        let b = u.get(&key("acme", "fs"), None).unwrap();
        assert_ne!(a, b);
        assert!((UID_BASE..UID_BASE + UID_COUNT).contains(&a));
        assert_eq!(u.get(&key("acme", "time"), None).unwrap(), a);
        let again = Uids::open(Some(d.path()));
        assert_eq!(again.get(&key("acme", "fs"), None).unwrap(), b);
    }

    #[test]
    fn processes_sharing_one_table_neither_fail_nor_hand_out_one_uid_twice() {
        // Each `Uids` stands for a meshbox process (its own memory, one file),
        // as two `meshbox run`s in one home.
        let d = tempfile::tempdir().unwrap();
        let uids: Vec<(String, u32)> = std::thread::scope(|s| {
            let runs: Vec<_> = (0..4)
                .map(|p| {
                    let dir = d.path();
                    s.spawn(move || {
                        let u = Uids::open(Some(dir));
                        (0..25)
                            .map(|i| {
                                let k = key("run", &format!("p{p}-s{i}"));
                                (key_of(&k), u.get(&k, None).unwrap())
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            runs.into_iter().flat_map(|r| r.join().unwrap()).collect()
        });
        let distinct: std::collections::HashSet<u32> = uids.iter().map(|(_, u)| *u).collect();
        assert_eq!(distinct.len(), uids.len(), "one uid handed out twice");
        // Every allocation is in the file, none lost to another's write.
        let kept = read_table(&d.path().join("sandbox-uids.json"));
        for (k, uid) in &uids {
            assert_eq!(kept.get(k).map(|e| e.uid), Some(*uid), "{k}");
        }
    }

    #[test]
    fn an_older_table_of_bare_uids_still_reads() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("sandbox-uids.json"),
            r#"{"acme/time": 1800000007}"#,
        )
        .unwrap();
        let u = Uids::open(Some(d.path()));
        assert_eq!(u.get(&key("acme", "time"), None).unwrap(), 1_800_000_007);
    }

    #[test]
    fn a_collision_probes_on() {
        let u = Uids::open(None);
        let k = key("m", "n");
        let first = UID_BASE + fnv1a(b"m/n") % UID_COUNT;
        u.table.lock().unwrap().insert(
            "other/x".into(),
            Entry {
                uid: first,
                used: 0,
                home: None,
            },
        );
        assert_ne!(u.get(&k, None).unwrap(), first);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_least_recent_unused() {
        let e = |uid, used| Entry {
            uid,
            used,
            home: None,
        };
        let mut t = BTreeMap::from([
            ("a/old".to_owned(), e(1, 10)),
            ("a/running".to_owned(), e(2, 5)),
            ("a/new".to_owned(), e(3, 30)),
        ]);
        let gone = evict(&mut t, 3, "a/next", |uid| uid == 2);
        assert_eq!(gone, vec![e(1, 10)]);
        assert_eq!(t.len(), 2);
        assert!(t.contains_key("a/running"), "an owner in use was forgotten");
        // Below the cap nothing goes.
        assert!(evict(&mut t, 3, "a/next", |_| false).is_empty());
        // Every uid in use: nothing goes.
        assert!(evict(&mut t, 2, "a/next", |_| true).is_empty());
        assert_eq!(t.len(), 2);
        // Through `get`: the table stays at its cap.
        let mut u = Uids::open(None);
        u.cap = 2;
        u.table.lock().unwrap().extend(t);
        u.get(&key("a", "next"), None).unwrap();
        let t = u.table.lock().unwrap();
        assert_eq!(t.len(), 2);
        assert!(t.contains_key("a/next"));
    }

    #[test]
    fn a_forgotten_owners_home_goes_back_to_root() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let d = tempfile::tempdir().unwrap();
        let home = d.path().join("home");
        std::fs::create_dir(&home).unwrap();
        // As root the home belongs to a service uid; else to us (the chown
        // to root then fails, the mode still closes).
        let root = nix::unistd::geteuid().is_root();
        let uid = if root {
            UID_BASE + 5
        } else {
            nix::unistd::geteuid().as_raw()
        };
        std::os::unix::fs::chown(&home, Some(uid), Some(uid)).unwrap();
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        disown_home(&Entry {
            uid,
            used: 0,
            home: Some(home.clone()),
        });
        let m = std::fs::metadata(&home).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        if root {
            assert_eq!((m.uid(), m.gid()), (0, 0));
        }
        // A home someone else owns now is left alone.
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o755)).unwrap();
        disown_home(&Entry {
            uid: uid + 1,
            used: 0,
            home: Some(home.clone()),
        });
        assert_eq!(std::fs::metadata(&home).unwrap().mode() & 0o777, 0o755);
    }
}
