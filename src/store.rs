//! Desired state: every deployed spec, per mesh, in SQLite (WAL) in the data
//! dir. Written before a deploy answers, removed by undeploy, read on start.
//! The file is created 0600: specs can hold literal env values.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection};

use crate::config::ServiceSpec;
use crate::supervisor::ServiceKey;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database `{}`", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state database query failed")]
    Query(#[from] rusqlite::Error),
    #[error("stored spec of {key} is unreadable")]
    Decode {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

pub struct Store {
    conn: Mutex<Connection>,
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
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.conn().execute(
            "INSERT INTO services (mesh, name, spec, updated_at) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (mesh, name) DO UPDATE SET spec = excluded.spec, updated_at = excluded.updated_at",
            params![key.mesh, key.name, json, now],
        )?;
        Ok(())
    }

    pub fn delete(&self, key: &ServiceKey) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM services WHERE mesh = ?1 AND name = ?2",
            params![key.mesh, key.name],
        )?;
        Ok(())
    }

    /// Every stored service, in (mesh, name) order.
    pub fn all(&self) -> Result<Vec<(ServiceKey, ServiceSpec)>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT mesh, name, spec FROM services ORDER BY mesh, name")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (mesh, name, spec) = row?;
            let key = ServiceKey { mesh, name };
            let spec = serde_json::from_str(&spec).map_err(|source| StoreError::Decode {
                key: key.to_string(),
                source,
            })?;
            out.push((key, spec));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_replace_delete_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = ServiceKey::parse("m", "s").unwrap();
        let mut spec = ServiceSpec {
            source: "npm:x".into(),
            ..Default::default()
        };
        {
            let store = Store::open(dir.path()).unwrap();
            store.put(&key, &spec).unwrap();
            spec.args = vec!["a".into()];
            store.put(&key, &spec).unwrap();
            store
                .put(&ServiceKey::parse("m", "t").unwrap(), &spec)
                .unwrap();
            store.delete(&ServiceKey::parse("m", "t").unwrap()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let all = store.all().unwrap();
        assert_eq!(all, vec![(key, spec)]);
        let mode = std::fs::metadata(dir.path().join("meshbox.db")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
    }
}
