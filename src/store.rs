//! Desired state: every deployed spec, per mesh, in SQLite (WAL) in the data
//! dir, with what a restart must not forget (failed-retry attempts, the
//! detected protocol era). Written before a deploy answers, removed by
//! undeploy, read on start row by row. Also the data dir's exclusive lock:
//! one `meshbox serve` per data dir. The file is created 0600: specs can hold
//! literal env values (never secret file contents).

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};

use crate::config::ServiceSpec;
use crate::model::{Protocol, ServiceKey};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the state database `{}`", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database query failed")]
    Query(#[from] rusqlite::Error),
    #[error("stored spec of {key} is unreadable")]
    Decode {
        key: ServiceKey,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot lock the data dir `{}`", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the data dir `{}` is in use by another meshbox (pid {holder})", path.display())]
    Locked { path: PathBuf, holder: String },
}

/// What a restart remembers of a service besides its spec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Remembered {
    /// Failed attempts in a row, and when the last one was (unix seconds).
    pub retry_attempts: u32,
    pub last_attempt_at: Option<i64>,
    /// The era detected for the spec with this hash.
    pub protocol: Option<(String, Protocol)>,
}

/// One stored row: its spec may not decode (reported and skipped by restore,
/// never holding the others back).
#[derive(Debug)]
pub struct Row {
    pub key: ServiceKey,
    pub spec: Result<ServiceSpec, StoreError>,
    pub remembered: Remembered,
}

pub struct Store {
    conn: Mutex<Connection>,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Handshake => "handshake",
        Protocol::Stateless => "stateless",
    }
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join("meshbox.db");
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(open_err)?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(open_err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS services (
                mesh TEXT NOT NULL,
                name TEXT NOT NULL,
                spec TEXT NOT NULL,
                updated_at INTEGER NOT NULL,
                PRIMARY KEY (mesh, name)
            );
            CREATE TABLE IF NOT EXISTS service_state (
                mesh TEXT NOT NULL,
                name TEXT NOT NULL,
                retry_attempts INTEGER NOT NULL DEFAULT 0,
                last_attempt_at INTEGER,
                spec_hash TEXT,
                protocol TEXT,
                PRIMARY KEY (mesh, name)
            );",
        )
        .map_err(open_err)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().expect("store poisoned")
    }

    pub fn put(&self, key: &ServiceKey, spec: &ServiceSpec) -> Result<(), StoreError> {
        let json = serde_json::to_string(spec).expect("a spec always serializes");
        self.conn().execute(
            "INSERT INTO services (mesh, name, spec, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (mesh, name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
            params![key.mesh, key.name, json, now()],
        )?;
        Ok(())
    }

    /// Removes a service and what was remembered of it, in one transaction.
    pub fn delete(&self, key: &ServiceKey) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM services WHERE mesh = ?1 AND name = ?2",
            params![key.mesh, key.name],
        )?;
        tx.execute(
            "DELETE FROM service_state WHERE mesh = ?1 AND name = ?2",
            params![key.mesh, key.name],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Records the failed-retry count (0 clears it).
    pub fn set_retry(&self, key: &ServiceKey, attempts: u32) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO service_state (mesh, name, retry_attempts, last_attempt_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (mesh, name) DO UPDATE SET retry_attempts = excluded.retry_attempts,
                 last_attempt_at = excluded.last_attempt_at",
            params![key.mesh, key.name, attempts, (attempts > 0).then(now)],
        )?;
        Ok(())
    }

    /// Records the era detected for the spec with `spec_hash`.
    pub fn set_protocol(
        &self,
        key: &ServiceKey,
        spec_hash: &str,
        protocol: Protocol,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO service_state (mesh, name, spec_hash, protocol) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (mesh, name) DO UPDATE SET spec_hash = excluded.spec_hash,
                 protocol = excluded.protocol",
            params![key.mesh, key.name, spec_hash, protocol_name(protocol)],
        )?;
        Ok(())
    }

    /// What is remembered of one service.
    pub fn remembered(&self, key: &ServiceKey) -> Result<Remembered, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT retry_attempts, last_attempt_at, spec_hash, protocol FROM service_state
                 WHERE mesh = ?1 AND name = ?2",
                params![key.mesh, key.name],
                |r| {
                    Ok((
                        r.get::<_, u32>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                },
            )
            .optional()?;
        Ok(row.map(remembered_of).unwrap_or_default())
    }

    /// Every stored service, in (mesh, name) order, each row on its own.
    pub fn all(&self) -> Result<Vec<Row>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT s.mesh, s.name, s.spec, st.retry_attempts, st.last_attempt_at, st.spec_hash, st.protocol
             FROM services s LEFT JOIN service_state st ON s.mesh = st.mesh AND s.name = st.name
             ORDER BY s.mesh, s.name",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                (
                    r.get::<_, Option<u32>>(3)?.unwrap_or(0),
                    r.get::<_, Option<i64>>(4)?,
                    r.get::<_, Option<String>>(5)?,
                    r.get::<_, Option<String>>(6)?,
                ),
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mesh, name, spec, state) = row?;
            let key = ServiceKey { mesh, name };
            let spec = serde_json::from_str(&spec).map_err(|source| StoreError::Decode {
                key: key.clone(),
                source,
            });
            out.push(Row {
                key,
                spec,
                remembered: remembered_of(state),
            });
        }
        Ok(out)
    }
}

fn remembered_of(
    (attempts, last, hash, protocol): (u32, Option<i64>, Option<String>, Option<String>),
) -> Remembered {
    let protocol = match (hash, protocol.as_deref()) {
        (Some(h), Some("handshake")) => Some((h, Protocol::Handshake)),
        (Some(h), Some("stateless")) => Some((h, Protocol::Stateless)),
        _ => None,
    };
    Remembered {
        retry_attempts: attempts,
        last_attempt_at: last,
        protocol,
    }
}

/// The exclusive lock on a data dir, held while `meshbox serve` runs: a
/// second `serve` on the same dir fails naming the holder.
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, StoreError> {
        let path = data_dir.join("meshbox.lock");
        let lock_err = |source| StoreError::Lock {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(lock_err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(StoreError::Locked {
                    path: data_dir.to_path_buf(),
                    holder: if holder.is_empty() {
                        "unknown".into()
                    } else {
                        holder.chars().take(20).collect()
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(lock_err(e)),
        }
        file.set_len(0).map_err(lock_err)?;
        file.rewind().map_err(lock_err)?;
        write!(file, "{}", std::process::id()).map_err(lock_err)?;
        file.flush().map_err(lock_err)?;
        Ok(DataDirLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> ServiceKey {
        ServiceKey::parse("m", n).unwrap()
    }

    #[test]
    fn put_replace_delete_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = ServiceSpec {
            source: "npm:x".into(),
            ..Default::default()
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store.put(&key("s"), &spec).unwrap();
            spec.args = vec!["a".into()];
            store.put(&key("s"), &spec).unwrap();
            store.put(&key("t"), &spec).unwrap();
            store.set_retry(&key("t"), 3).unwrap();
            store.delete(&key("t")).unwrap();
            assert_eq!(store.remembered(&key("t")).unwrap(), Remembered::default());
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.all().unwrap();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].key, key("s"));
        assert_eq!(all[0].spec.as_ref().unwrap(), &spec);
        let mode = std::fs::metadata(dir.path().join("meshbox.db")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn retry_state_and_verdicts_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .put(
                    &key("s"),
                    &ServiceSpec {
                        source: "npm:x".into(),
                        ..Default::default()
                    },
                )
                .unwrap();
            store.set_retry(&key("s"), 4).unwrap();
            store
                .set_protocol(&key("s"), "abc", Protocol::Stateless)
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let r = &store.all().unwrap()[0].remembered;
        assert_eq!(r.retry_attempts, 4);
        assert!(r.last_attempt_at.is_some());
        assert_eq!(r.protocol, Some(("abc".into(), Protocol::Stateless)));
        store.set_retry(&key("s"), 0).unwrap();
        let r = store.remembered(&key("s")).unwrap();
        assert_eq!((r.retry_attempts, r.last_attempt_at), (0, None));
        assert!(r.protocol.is_some(), "clearing retries keeps the verdict");
    }

    #[test]
    fn a_bad_row_does_not_hide_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let spec = ServiceSpec {
            source: "npm:x".into(),
            ..Default::default()
        };
        store.put(&key("a"), &spec).unwrap();
        store.put(&key("c"), &spec).unwrap();
        store
            .conn()
            .execute(
                "INSERT INTO services (mesh, name, spec, updated_at) VALUES ('m', 'b', '{not json', 0)",
                [],
            )
            .unwrap();
        let all = store.all().unwrap();
        assert_eq!(all.len(), 3);
        assert!(all[0].spec.is_ok() && all[2].spec.is_ok());
        let err = all[1].spec.as_ref().unwrap_err();
        assert!(err.to_string().contains("m/b"), "{err}");
    }

    #[test]
    fn one_holder_per_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).err().unwrap();
        assert!(
            err.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{err}"
        );
        drop(held);
        DataDirLock::acquire(dir.path()).unwrap();
    }
}
