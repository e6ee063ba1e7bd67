//! Per-service uids, for when meshbox runs as root: every service runs under
//! a uid (and gid) of its own, stable across restarts, from the range
//! [`UID_BASE`] .. [`UID_BASE`] + [`UID_COUNT`]. The first choice is a hash
//! of mesh and name; a collision probes on. Allocations are kept in
//! `<data-dir>/sandbox-uids.json` so a service keeps its uid (and so owns its
//! home) for good.
//!
//! Owns the allocation table only; it never changes a process's ids.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::model::ServiceKey;

/// First uid meshbox gives to services (documented in the README).
pub const UID_BASE: u32 = 1_800_000_000;
/// How many uids the range holds.
pub const UID_COUNT: u32 = 1 << 20;

fn fnv1a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// The allocation table, persisted next to the data it protects.
pub struct Uids {
    file: Option<PathBuf>,
    table: Mutex<BTreeMap<String, u32>>,
}

fn key_of(k: &ServiceKey) -> String {
    format!("{}/{}", k.mesh, k.name)
}

impl Uids {
    pub fn open(data_dir: Option<&Path>) -> Uids {
        let file = data_dir.map(|d| d.join("sandbox-uids.json"));
        let table = file
            .as_ref()
            .and_then(|f| std::fs::read(f).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Uids {
            file,
            table: Mutex::new(table),
        }
    }

    /// The uid of `key`, allocated on first use.
    pub fn get(&self, key: &ServiceKey) -> std::io::Result<u32> {
        let k = key_of(key);
        let mut table = self.table.lock().expect("uid table poisoned");
        if let Some(uid) = table.get(&k) {
            return Ok(*uid);
        }
        let taken: std::collections::HashSet<u32> = table.values().copied().collect();
        let start = fnv1a(k.as_bytes()) % UID_COUNT;
        let uid = (0..UID_COUNT)
            .map(|i| UID_BASE + (start + i) % UID_COUNT)
            .find(|u| !taken.contains(u))
            .ok_or_else(|| std::io::Error::other("the service uid range is exhausted"))?;
        table.insert(k, uid);
        if let Some(f) = &self.file {
            let tmp = f.with_extension("json.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&*table).unwrap_or_default())?;
            std::fs::rename(&tmp, f)?;
        }
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
        let a = u.get(&key("acme", "time")).unwrap();
        let b = u.get(&key("acme", "fs")).unwrap();
        assert_ne!(a, b);
        assert!((UID_BASE..UID_BASE + UID_COUNT).contains(&a));
        assert_eq!(u.get(&key("acme", "time")).unwrap(), a);
        let again = Uids::open(Some(d.path()));
        assert_eq!(again.get(&key("acme", "fs")).unwrap(), b);
    }

    #[test]
    fn a_collision_probes_on() {
        let u = Uids::open(None);
        let k = key("m", "n");
        let first = UID_BASE + fnv1a(b"m/n") % UID_COUNT;
        u.table.lock().unwrap().insert("other/x".into(), first);
        assert_ne!(u.get(&k).unwrap(), first);
    }
}
