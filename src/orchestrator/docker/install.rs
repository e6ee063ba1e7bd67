//! Install runs: containers run to completion (an install step) with their
//! cache volumes and uploads.
//!
//! Owns the named cache volumes (created for an install's writable mount,
//! required to exist for a server's read-only one), copying a `path:`
//! source into an install container (a tar streamed as it is packed, off
//! the async runtime; never a bind mount), and collecting a finished run's
//! bounded output. What to install is planned by `acquire`; networks are not
//! this module's (installs use the engine's default bridge).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use bollard::container::LogOutput;
use bollard::models::VolumeCreateRequest;
use bollard::query_parameters::{
    LogsOptionsBuilder, UploadToContainerOptionsBuilder, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;

use super::container::{self, exit_reason, RemoveOnDrop, Resolved, SANDBOX_USER};
use super::{labels, stream, translate, What};
use crate::orchestrator::{
    Completed, MountSource, OrchestratorError, SandboxSpec, Upload, MAX_COMPLETED_OUTPUT,
};

/// Makes sure every volume `spec` mounts exists: created when `create` (an
/// install fills it), else [`OrchestratorError::MissingVolume`] (a server
/// needs what an install left there).
pub async fn ensure_volumes(
    docker: &Docker,
    instance: &str,
    spec: &SandboxSpec,
    create: bool,
) -> Result<(), OrchestratorError> {
    for m in &spec.mounts {
        let MountSource::Volume(name) = &m.source else {
            continue;
        };
        match docker.inspect_volume(name).await {
            Ok(_) => continue,
            Err(e) => match translate("inspecting a volume", What::Volume, name, e) {
                OrchestratorError::NotFound { .. } if !create => {
                    return Err(OrchestratorError::MissingVolume {
                        volume: name.clone(),
                    })
                }
                OrchestratorError::NotFound { .. } => {}
                other => return Err(other),
            },
        }
        docker
            .create_volume(VolumeCreateRequest {
                name: Some(name.clone()),
                labels: Some(labels::of_volume(instance)),
                ..Default::default()
            })
            .await
            .map_err(|e| translate("creating a cache volume", What::Volume, name, e))?;
    }
    Ok(())
}

/// Runs a short-lived container to completion: its exit and bounded output.
/// `timeout` covers the upload, the run and reading its output; the
/// container is removed however this ends, a dropped future included.
pub async fn run_to_completion(
    docker: &Docker,
    resolved: &Resolved<'_>,
    spec: SandboxSpec,
    timeout: Duration,
) -> Result<Completed, OrchestratorError> {
    let body = container::install_body(&spec, resolved)?;
    let image = body.image.clone().unwrap_or_default();
    ensure_volumes(docker, resolved.instance, &spec, true).await?;
    let name = format!("meshbox-install-{:08x}", fastrand::u32(..));
    let id = container::create(docker, &name, body).await?;
    let _guard = RemoveOnDrop {
        docker: docker.clone(),
        id: id.clone(),
    };
    let run = async {
        if let Some(upload) = &spec.upload {
            copy_in(docker, &id, upload).await?;
        }
        container::start(docker, &id, "starting the install container").await?;
        let mut wait = docker.wait_container(&id, None::<WaitContainerOptions>);
        let _ = wait.next().await;
        let info = docker
            .inspect_container(&id, None)
            .await
            .map_err(|e| translate("inspecting the install container", What::Container, &id, e))?;
        let exit = exit_reason(&info.state.unwrap_or_default());
        let (stdout, stderr) = output(docker, &id).await;
        Ok(Completed {
            exit,
            stdout,
            stderr,
        })
    };
    tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| {
            Err(OrchestratorError::TimedOut {
                what: format!("install in {image}"),
                after: timeout,
            })
        })
}

/// Copies `upload.from` into the container at `upload.into/upload.name`,
/// packed on the blocking pool as the request sends it.
async fn copy_in(docker: &Docker, id: &str, upload: &Upload) -> Result<(), OrchestratorError> {
    let (from, name) = (upload.from.clone(), upload.name.clone());
    let (body, packer) = stream::produced(move |w| tar_dir(&from, &name, w));
    let sent = docker
        .upload_to_container(
            id,
            Some(
                UploadToContainerOptionsBuilder::default()
                    .path(&upload.into.to_string_lossy())
                    .build(),
            ),
            bollard::body_try_stream(body),
        )
        .await;
    let packed = packer.await.map_err(std::io::Error::other).and_then(|r| r);
    let packing = |source| OrchestratorError::Setup {
        step: "packing the source directory",
        source,
    };
    match (sent, packed) {
        (Ok(()), Ok(())) => Ok(()),
        // The packer's own failure (an unreadable file) says more than the
        // aborted request it caused; a broken pipe only says the request
        // ended first.
        (_, Err(e)) if !stream::cut_short(&e) => Err(packing(e)),
        (Err(e), _) => Err(translate(
            "copying the source into the install container",
            What::Container,
            id,
            e,
        )),
        (Ok(()), Err(e)) => Err(packing(e)),
    }
}

/// A finished container's output: at most [`MAX_COMPLETED_OUTPUT`] bytes of
/// stdout, the last [`MAX_COMPLETED_OUTPUT`] of stderr.
async fn output(docker: &Docker, id: &str) -> (Vec<u8>, Vec<u8>) {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let mut logs = docker.logs(
        id,
        Some(
            LogsOptionsBuilder::default()
                .stdout(true)
                .stderr(true)
                .build(),
        ),
    );
    while let Some(Ok(chunk)) = logs.next().await {
        match chunk {
            LogOutput::StdOut { message } => {
                let room = MAX_COMPLETED_OUTPUT.saturating_sub(out.len());
                out.extend_from_slice(&message[..message.len().min(room)]);
            }
            LogOutput::StdErr { message } => {
                err.extend_from_slice(&message);
                if err.len() > 2 * MAX_COMPLETED_OUTPUT {
                    err.drain(..err.len() - MAX_COMPLETED_OUTPUT);
                }
            }
            _ => {}
        }
    }
    if err.len() > MAX_COMPLETED_OUTPUT {
        err.drain(..err.len() - MAX_COMPLETED_OUTPUT);
    }
    (out, err)
}

/// Writes `dir` as a tar under `prefix/`, owned by the sandbox user; skips
/// `.git`, `node_modules`, `.venv` and `__pycache__`, which are rebuilt
/// inside, and symlinks and special files, which could point outside.
pub fn tar_dir(dir: &Path, prefix: &str, w: impl Write) -> std::io::Result<()> {
    let mut builder = tar::Builder::new(w);
    builder.follow_symlinks(false);
    let uid: u64 = SANDBOX_USER.parse().unwrap_or(10001);
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_mode(0o755);
    header.set_uid(uid);
    header.set_gid(uid);
    header.set_size(0);
    builder.append_data(&mut header, prefix, std::io::empty())?;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let name = e.file_name();
            if matches!(
                name.to_str(),
                Some(".git" | "node_modules" | ".venv" | "__pycache__")
            ) {
                continue;
            }
            let path = e.path();
            let rel = Path::new(prefix).join(path.strip_prefix(dir).expect("under dir"));
            let meta = std::fs::symlink_metadata(&path)?;
            let mut h = tar::Header::new_gnu();
            h.set_uid(uid);
            h.set_gid(uid);
            if meta.is_dir() {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                builder.append_data(&mut h, &rel, std::io::empty())?;
                stack.push(path);
            } else if meta.is_file() {
                use std::os::unix::fs::PermissionsExt;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(meta.permissions().mode() & 0o755 | 0o644);
                h.set_size(meta.len());
                builder.append_data(&mut h, &rel, std::fs::File::open(&path)?)?;
            }
        }
    }
    builder.into_inner()?.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn tar_holds_the_tree_owned_by_the_sandbox_user_without_links_or_caches() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("server.py"), b"print(1)").unwrap();
        std::fs::create_dir_all(d.path().join("pkg")).unwrap();
        std::fs::write(d.path().join("pkg/mod.py"), b"x = 1").unwrap();
        std::fs::create_dir_all(d.path().join(".venv/bin")).unwrap();
        std::fs::write(d.path().join(".venv/bin/python"), b"").unwrap();
        std::fs::create_dir_all(d.path().join("node_modules/x")).unwrap();
        std::os::unix::fs::symlink("/etc/shadow", d.path().join("shadow")).unwrap();
        let mut tar = Vec::new();
        tar_dir(d.path(), "src", &mut tar).unwrap();
        let mut seen = Vec::new();
        for e in tar::Archive::new(&tar[..]).entries().unwrap() {
            let mut e = e.unwrap();
            assert_eq!(e.header().uid().unwrap(), 10001);
            assert_eq!(e.header().gid().unwrap(), 10001);
            let path = e.path().unwrap().display().to_string();
            let mut body = String::new();
            e.read_to_string(&mut body).unwrap();
            seen.push((path, body));
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                ("src".to_owned(), String::new()),
                ("src/pkg".to_owned(), String::new()),
                ("src/pkg/mod.py".to_owned(), "x = 1".to_owned()),
                ("src/server.py".to_owned(), "print(1)".to_owned()),
            ]
        );
    }
}
