//! Store and registry stay consistent (issue 9, item 7) on a full disk, and
//! a stored row that does not decode holds no other service back.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{is_root, pid_alive, Daemon};
use serde_json::json;

const UP: Duration = Duration::from_secs(30);

/// A small tmpfs, unmounted when dropped.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        assert!(is_root(), "this lane needs root (it mounts a tmpfs)");
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount -t tmpfs failed");
        Tmpfs(dir)
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes until the filesystem is full.
    fn fill(&self) {
        let _ = Command::new("dd")
            .args(["if=/dev/zero", "bs=64k"])
            .arg(format!("of={}", self.path().join("filler").display()))
            .stderr(std::process::Stdio::null())
            .status();
    }

    fn unfill(&self) {
        std::fs::remove_file(self.path().join("filler")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

#[tokio::test]
#[ignore = "needs root"]
async fn a_delete_that_cannot_be_stored_changes_nothing() {
    let fs = Tmpfs::mount("16m");
    let data = fs.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let d = Daemon::start_on(&data, &[]);
    let (code, st) = d.deploy_py("m", "kept", &[], json!({})).await;
    assert_eq!(code, 200, "{st}");
    let pid = st["pid"].as_u64().unwrap() as u32;
    fs.fill();
    let (code, e) = d.delete("/v1/meshes/m/services/kept").await;
    assert_eq!(code, 500, "{e}");
    assert!(
        e["error"].as_str().unwrap().contains("desired state"),
        "{e}"
    );
    // Still listed, still running, still answering.
    let st = d.status("m", "kept").await;
    assert_eq!(st["status"], "running", "{st}");
    assert!(pid_alive(pid));
    let (code, _) = d.call("m", "kept", "echo", json!({"text": "hi"})).await;
    assert_eq!(code, 200);
    // And stored: a restart brings it back.
    let mut d = d;
    d.terminate();
    fs.unfill();
    let d = Daemon::start_on(&data, &[]);
    d.wait_status("m", "kept", UP, |s| s["status"] == "running")
        .await;
    let (code, _) = d.delete("/v1/meshes/m/services/kept").await;
    assert_eq!(code, 204);
}

/// One stored row with invalid JSON (or a spec that no longer validates) is
/// reported and skipped; the other services come back.
#[tokio::test]
async fn a_bad_stored_row_holds_no_other_back() {
    let a = Daemon::start();
    for name in ["first", "last"] {
        let (code, st) = a.deploy_py("m", name, &[], json!({})).await;
        assert_eq!(code, 200, "{st}");
    }
    let data = a.data.path().to_path_buf();
    let mut a = a;
    a.terminate();
    {
        let db = rusqlite::Connection::open(data.join("meshbox.db")).unwrap();
        db.execute(
            "INSERT INTO services (mesh, name, spec, updated_at) VALUES ('m', 'garbled', '{not json', 0)",
            [],
        )
        .unwrap();
        db.execute(
            "INSERT INTO services (mesh, name, spec, updated_at) VALUES ('m', 'invalid', ?1, 0)",
            [json!({"source": "npm:../../etc", "memory_mb": 1}).to_string()],
        )
        .unwrap();
    }
    let b = Daemon::start_on(&data, &[]);
    for name in ["first", "last"] {
        b.wait_status("m", name, UP, |s| s["status"] == "running")
            .await;
    }
    let (_, list) = b.get("/v1/meshes/m/services").await;
    let names: Vec<&str> = list["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["first", "last"], "{list}");
}
