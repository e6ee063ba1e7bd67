//! The docker backend: one container per server, through bollard.
//!
//! Owns every Docker API call of meshbox's sandboxes: containers (created
//! hardened and limited, attached before start so no early output is lost),
//! per-mesh bridge networks and egress proxies, and install containers run to
//! completion into named cache volumes. What to install and where is planned
//! by `acquire`; this module only runs it. Docker errors are translated
//! here; no bollard type leaves this module.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bollard::models::{
    ContainerCreateBody, HostConfig, Mount as DockerMount, MountType, NetworkCreateRequest,
    VolumeCreateRequest,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder, UploadToContainerOptionsBuilder, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{
    Capabilities, Completed, Enforced, ExitReason, MountSource, Orchestrator, OrchestratorError,
    Sandbox, SandboxHandle, SandboxIo, SandboxSpec, ServiceKey, Unsupported, MAX_COMPLETED_OUTPUT,
};
use crate::model::{runner_image, NetworkMode, NetworkPolicy, Runtime};

/// The non-root user every container runs as.
pub const SANDBOX_USER: &str = "10001";
/// Default pids limit when a spec names none.
pub const DEFAULT_PIDS: u64 = 256;

/// Label keys: how containers, networks and volumes say whose they are.
pub mod labels {
    pub const MANAGED: &str = "meshbox.managed";
    pub const MESH: &str = "meshbox.mesh";
    pub const SERVICE: &str = "meshbox.service";
    pub const ROLE: &str = "meshbox.role";
    pub const INSTANCE: &str = "meshbox.instance";
    pub const SPEC_HASH: &str = "meshbox.spec-hash";
    pub const SOURCE: &str = "meshbox.source";
    /// `meshbox.role` of egress proxies.
    pub const ROLE_PROXY: &str = "proxy";
}

#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Host-side state (the instance id).
    pub data_dir: PathBuf,
}

use crate::model::stable_hash as fnv;

pub struct DockerBackend {
    docker: Docker,
    /// This meshbox's identity (kept in its data dir): it adopts and sweeps
    /// only containers carrying it, never another instance's on the same engine.
    instance: String,
    api_version: String,
}

fn docker_err(op: &'static str, e: bollard::errors::Error) -> OrchestratorError {
    OrchestratorError::Engine {
        op,
        source: Box::new(e),
    }
}

/// The engine answered with HTTP status `code`.
fn is_status(e: &bollard::errors::Error, code: u16) -> bool {
    matches!(e, bollard::errors::Error::DockerResponseServerError { status_code, .. } if *status_code == code)
}

/// A create that named a missing image is `MissingImage`, not an engine fault.
fn create_err(image: &str, e: bollard::errors::Error) -> OrchestratorError {
    if is_status(&e, 404) {
        OrchestratorError::MissingImage {
            image: image.to_owned(),
        }
    } else {
        docker_err("creating a container", e)
    }
}

/// Identifies what a container was created from: a re-adopted container
/// must match the spec it would be created with now.
fn spec_hash(spec: &SandboxSpec) -> String {
    fnv(&format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        spec.argv, spec.env, spec.image, spec.limits, spec.network, spec.mounts, spec.workdir
    ))
}

/// What every meshbox container gets, whatever its role: no capabilities, no
/// privilege gain, an init that reaps and forwards signals.
fn hardened() -> HostConfig {
    HostConfig {
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        init: Some(true),
        ..Default::default()
    }
}

/// Every container (running or not) carrying all of `labels` (`k=v`).
async fn list_labelled(
    docker: &Docker,
    labels: Vec<String>,
) -> Result<Vec<bollard::models::ContainerSummary>, bollard::errors::Error> {
    let filters = HashMap::from([("label".to_owned(), labels)]);
    docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build(),
        ))
        .await
}

/// Removes a container whatever its state; false if it was not there.
async fn remove_forced(docker: &Docker, id: &str) -> bool {
    docker
        .remove_container(
            id,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await
        .is_ok()
}

/// Attaches to a container's stdin, stdout and stderr as a stream.
async fn attach(
    docker: &Docker,
    id: &str,
) -> Result<bollard::container::AttachContainerResults, bollard::errors::Error> {
    docker
        .attach_container(
            id,
            Some(
                AttachContainerOptionsBuilder::default()
                    .stream(true)
                    .stdin(true)
                    .stdout(true)
                    .stderr(true)
                    .build(),
            ),
        )
        .await
}

/// The host-side bridge interface of an egress network (at most 15 bytes).
fn host_bridge_name(network: &str) -> String {
    format!("mbx{}", &fnv(network)[..12])
}

/// Drops everything a bridge's containers send to the host itself.
async fn isolate_from_host(bridge: &str) -> Result<(), OrchestratorError> {
    let rule = ["INPUT", "-i", bridge, "-j", "DROP"];
    let run = |op: &'static str| async move {
        tokio::process::Command::new("iptables")
            .arg(op)
            .args(rule)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success())
    };
    if run("-C").await || run("-I").await {
        Ok(())
    } else {
        Err(Unsupported::Allowlist {
            reason: "keeping sandboxes off the host needs iptables as root",
        }
        .into())
    }
}

async fn release_host_isolation(bridge: &str) {
    let _ = tokio::process::Command::new("iptables")
        .args(["-D", "INPUT", "-i", bridge, "-j", "DROP"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await;
}

/// The instance id stored in the data dir, created on first use.
fn instance_id(data_dir: &Path) -> Result<String, OrchestratorError> {
    let path = data_dir.join("instance-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(id.to_owned());
        }
    }
    let id = format!("{:016x}", fastrand::u64(..));
    std::fs::create_dir_all(data_dir)
        .and_then(|()| std::fs::write(&path, &id))
        .map_err(|source| OrchestratorError::Setup {
            step: "writing the instance id",
            source,
        })?;
    Ok(id)
}

impl DockerBackend {
    /// Connects to the local engine and negotiates the API version.
    pub async fn connect(config: DockerConfig) -> Result<Self, OrchestratorError> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(|e| docker_err("connecting to the docker engine", e))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| docker_err("negotiating the docker API version", e))?;
        let version = docker
            .version()
            .await
            .map_err(|e| docker_err("asking the docker engine for its version", e))?;
        let instance = instance_id(&config.data_dir)?;
        Ok(DockerBackend {
            docker,
            instance,
            api_version: version.api_version.unwrap_or_default(),
        })
    }

    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    pub fn client(&self) -> &Docker {
        &self.docker
    }

    /// The mesh's bridge network, created on demand.
    async fn mesh_network(&self, mesh: &str) -> Result<String, OrchestratorError> {
        self.network(&format!("meshbox-{mesh}"), mesh, false).await
    }

    /// A network created on demand; `internal` ones have no route out.
    async fn network(
        &self,
        name: &str,
        mesh: &str,
        internal: bool,
    ) -> Result<String, OrchestratorError> {
        let name = name.to_owned();
        if self.docker.inspect_network(&name, None).await.is_ok() {
            return Ok(name);
        }
        let req = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".into()),
            internal: Some(internal),
            options: internal.then(|| {
                HashMap::from([(
                    "com.docker.network.bridge.name".to_owned(),
                    host_bridge_name(&name),
                )])
            }),
            labels: Some(HashMap::from([
                (labels::MANAGED.into(), "true".into()),
                (labels::MESH.into(), mesh.into()),
            ])),
            ..Default::default()
        };
        let created = self.docker.create_network(req).await;
        if internal
            && matches!(
                created,
                Ok(_)
                    | Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 409,
                        ..
                    })
            )
        {
            // Docker's internal networks still reach the host itself (INPUT,
            // not FORWARD): close that too, or refuse to run the sandbox.
            isolate_from_host(&host_bridge_name(&name)).await?;
        }
        match created {
            Ok(_) => Ok(name),
            // Created by a concurrent deploy in the meantime.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(name),
            Err(e) => Err(docker_err("creating the mesh network", e)),
        }
    }

    /// The mesh's egress proxy for one allowlist: on the internal network
    /// (where its clients are) and the mesh bridge (its way out). Returns the
    /// internal network and the proxy URL.
    async fn egress(
        &self,
        mesh: &str,
        allow: &[String],
        image: &str,
    ) -> Result<(String, String), OrchestratorError> {
        let internal = self
            .network(&format!("meshbox-{mesh}-egress"), mesh, true)
            .await?;
        let bridge = self.mesh_network(mesh).await?;
        let mut sorted = allow.to_vec();
        sorted.sort();
        let name = format!("meshbox-proxy-{mesh}-{}", &fnv(&sorted.join(","))[..12]);
        let url = format!("http://{name}:3128");
        if let Ok(info) = self.docker.inspect_container(&name, None).await {
            if info.state.and_then(|s| s.running) == Some(true) {
                return Ok((internal, url));
            }
            let _ = remove_forced(&self.docker, &name).await;
        }
        let mut cmd = vec![
            "meshbox".to_owned(),
            "proxy".to_owned(),
            "--listen".to_owned(),
            "0.0.0.0:3128".to_owned(),
        ];
        for a in &sorted {
            cmd.push("--allow".into());
            cmd.push(a.clone());
        }
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(cmd),
            user: Some(SANDBOX_USER.into()),
            labels: Some(HashMap::from([
                (labels::MANAGED.into(), "true".into()),
                (labels::ROLE.into(), labels::ROLE_PROXY.into()),
                (labels::MESH.into(), mesh.to_owned()),
                (labels::INSTANCE.into(), self.instance.clone()),
            ])),
            host_config: Some(HostConfig {
                network_mode: Some(internal.clone()),
                readonly_rootfs: Some(true),
                memory: Some(64 << 20),
                pids_limit: Some(64),
                ..hardened()
            }),
            ..Default::default()
        };
        match self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body,
            )
            .await
        {
            Ok(_) => {}
            // Another deploy created it meanwhile.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => return Ok((internal, url)),
            Err(e) => return Err(docker_err("creating the egress proxy", e)),
        }
        self.docker
            .connect_network(
                &bridge,
                bollard::models::NetworkConnectRequest {
                    container: name.clone(),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| docker_err("connecting the egress proxy", e))?;
        self.docker
            .start_container(
                &name,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(|e| docker_err("starting the egress proxy", e))?;
        Ok((internal, url))
    }

    /// Runs a short-lived container to completion (an install step): its
    /// exit and bounded output. The container is removed however this ends,
    /// a dropped future included.
    async fn run_to_end(
        &self,
        spec: SandboxSpec,
        timeout: Duration,
    ) -> Result<Completed, OrchestratorError> {
        let image = spec.image.clone().ok_or(Unsupported::NoImage)?;
        if spec.argv.is_empty() {
            return Err(Unsupported::EmptyCommand.into());
        }
        let env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut mounts = Vec::new();
        for m in &spec.mounts {
            mounts.push(self.docker_mount(m, true).await?);
        }
        let body = ContainerCreateBody {
            image: Some(image.clone()),
            cmd: Some(spec.argv.clone()),
            env: Some(env),
            user: Some(SANDBOX_USER.into()),
            labels: Some(self.labels(&spec)),
            host_config: Some(HostConfig {
                mounts: Some(mounts),
                memory: spec.limits.memory_mb.map(|mb| (mb * 1024 * 1024) as i64),
                pids_limit: Some(spec.limits.pids.unwrap_or(1024) as i64),
                ..hardened()
            }),
            ..Default::default()
        };
        let name = format!("meshbox-install-{:08x}", fastrand::u32(..));
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body,
            )
            .await
            .map_err(|e| create_err(&image, e))?;
        let id = created.id;
        // Removes the container on every way out, cancellation included.
        let _guard = RemoveOnDrop {
            docker: self.docker.clone(),
            id: id.clone(),
        };
        if let Some(upload) = &spec.upload {
            let (from, into, name) = (
                upload.from.clone(),
                upload.into.clone(),
                upload.name.clone(),
            );
            let tar = tokio::task::spawn_blocking(move || tar_dir(&from, &name))
                .await
                .map_err(|e| OrchestratorError::Setup {
                    step: "packing the source directory",
                    source: std::io::Error::other(e),
                })?
                .map_err(|source| OrchestratorError::Setup {
                    step: "packing the source directory",
                    source,
                })?;
            self.docker
                .upload_to_container(
                    &id,
                    Some(
                        UploadToContainerOptionsBuilder::default()
                            .path(&into.to_string_lossy())
                            .build(),
                    ),
                    bollard::body_full(tar.into()),
                )
                .await
                .map_err(|e| docker_err("copying the source into the install container", e))?;
        }
        self.docker
            .start_container(
                &id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
            .map_err(|e| docker_err("starting the install container", e))?;
        let mut wait = self
            .docker
            .wait_container(&id, None::<WaitContainerOptions>);
        if tokio::time::timeout(timeout, wait.next()).await.is_err() {
            return Err(OrchestratorError::TimedOut {
                what: format!("install in {image}"),
                after: timeout,
            });
        }
        let info = self
            .docker
            .inspect_container(&id, None)
            .await
            .map_err(|e| docker_err("inspecting the install container", e))?;
        let state = info.state.unwrap_or_default();
        let code = state.exit_code.map(|c| c as i32);
        let mut out = Vec::new();
        let mut err = Vec::new();
        let mut logs = self.docker.logs(
            &id,
            Some(
                LogsOptionsBuilder::default()
                    .stdout(true)
                    .stderr(true)
                    .build(),
            ),
        );
        while let Some(Ok(chunk)) = logs.next().await {
            match chunk {
                bollard::container::LogOutput::StdOut { message } => {
                    let room = MAX_COMPLETED_OUTPUT.saturating_sub(out.len());
                    out.extend_from_slice(&message[..message.len().min(room)]);
                }
                bollard::container::LogOutput::StdErr { message } => {
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
        Ok(Completed {
            exit: ExitReason {
                code,
                signal: code.filter(|c| *c > 128 && *c < 160).map(|c| c - 128),
                oom_killed: state.oom_killed.unwrap_or(false),
            },
            stdout: out,
            stderr: err,
        })
    }

    /// The labels of a sandbox: whose it is, what for, which instance.
    fn labels(&self, spec: &SandboxSpec) -> HashMap<String, String> {
        HashMap::from([
            (labels::MANAGED.into(), "true".into()),
            (labels::MESH.into(), spec.owner.mesh.clone()),
            (labels::SERVICE.into(), spec.owner.name.clone()),
            (labels::ROLE.into(), spec.role.as_str().into()),
            (labels::INSTANCE.into(), self.instance.clone()),
        ])
    }

    /// A spec's mount as docker's: a volume (created for a writable install
    /// mount, required to exist for a server's read-only one) or a bind.
    async fn docker_mount(
        &self,
        m: &super::Mount,
        create: bool,
    ) -> Result<DockerMount, OrchestratorError> {
        let target = Some(m.target.to_string_lossy().into_owned());
        match &m.source {
            MountSource::Volume(name) => {
                if self.docker.inspect_volume(name).await.is_err() {
                    if !create {
                        return Err(OrchestratorError::MissingVolume {
                            volume: name.clone(),
                        });
                    }
                    self.docker
                        .create_volume(VolumeCreateRequest {
                            name: Some(name.clone()),
                            labels: Some(HashMap::from([
                                (labels::MANAGED.into(), "true".into()),
                                (labels::INSTANCE.into(), self.instance.clone()),
                            ])),
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| docker_err("creating a cache volume", e))?;
                }
                Ok(DockerMount {
                    typ: Some(MountType::VOLUME),
                    source: Some(name.clone()),
                    target,
                    read_only: Some(m.read_only),
                    ..Default::default()
                })
            }
            MountSource::Host(path) => Ok(DockerMount {
                typ: Some(MountType::BIND),
                source: Some(path.to_string_lossy().into_owned()),
                target,
                read_only: Some(m.read_only),
                ..Default::default()
            }),
        }
    }
}

/// Removes a container when dropped (in the background).
struct RemoveOnDrop {
    docker: Docker,
    id: String,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if tokio::runtime::Handle::try_current().is_ok() {
            let (docker, id) = (self.docker.clone(), self.id.clone());
            tokio::spawn(async move {
                remove_forced(&docker, &id).await;
            });
        }
    }
}

/// Packs `dir` as a tar under `prefix/`, owned by the sandbox user; skips
/// `.git`, `node_modules` and `.venv`, which are rebuilt inside.
pub fn tar_dir(dir: &Path, prefix: &str) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
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
            // Symlinks and special files are left out: they could point outside.
        }
    }
    builder.into_inner()
}

struct DockerHandle {
    docker: Docker,
    id: String,
    exit: watch::Receiver<Option<ExitReason>>,
    /// Let go without stopping: the container outlives this meshbox.
    detached: std::sync::atomic::AtomicBool,
}

impl DockerHandle {
    async fn wait_for(&self, d: Duration) -> Option<ExitReason> {
        let mut rx = self.exit.clone();
        let r = tokio::time::timeout(d, rx.wait_for(Option::is_some)).await;
        r.ok().and_then(|r| r.ok().and_then(|v| v.clone()))
    }
}

#[async_trait]
impl SandboxHandle for DockerHandle {
    async fn stop(&self, grace: Duration) -> ExitReason {
        // stdin stays open across detaches (so a restarted meshbox can
        // re-attach), so closing it may not reach the server: a short wait,
        // then docker's own SIGTERM → grace → SIGKILL.
        if let Some(r) = self.wait_for(grace.min(Duration::from_millis(500))).await {
            return r;
        }
        let t = grace.as_secs().max(1) as i32;
        let _ = self
            .docker
            .stop_container(
                &self.id,
                Some(StopContainerOptionsBuilder::default().t(t).build()),
            )
            .await;
        if let Some(r) = self.wait_for(Duration::from_secs(5)).await {
            return r;
        }
        self.kill();
        self.wait_for(Duration::from_secs(10))
            .await
            .unwrap_or_default()
    }

    fn detach(&self) -> bool {
        self.detached
            .store(true, std::sync::atomic::Ordering::SeqCst);
        true
    }

    fn kill(&self) {
        let docker = self.docker.clone();
        let id = self.id.clone();
        tokio::spawn(async move {
            let _ = docker
                .kill_container(
                    &id,
                    Some(
                        KillContainerOptionsBuilder::default()
                            .signal("SIGKILL")
                            .build(),
                    ),
                )
                .await;
        });
    }
}

impl Drop for DockerHandle {
    fn drop(&mut self) {
        let detached = self.detached.load(std::sync::atomic::Ordering::SeqCst);
        if !detached
            && self.exit.borrow().is_none()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            self.kill();
        }
    }
}

#[async_trait]
impl Orchestrator for DockerBackend {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            name: "docker",
            images: true,
            sandboxed_install: true,
            detach: true,
        }
    }

    fn check(&self, spec: &SandboxSpec) -> Result<Enforced, OrchestratorError> {
        Ok(Enforced {
            memory: spec.limits.memory_mb.is_some(),
            cpus: spec.limits.cpus.is_some(),
            // A pids limit always applies (default 256).
            pids: true,
            network: true,
            // Its own root filesystem (read-only), the source volume and tmpfs.
            filesystem: true,
        })
    }

    async fn run_to_completion(
        &self,
        spec: SandboxSpec,
        timeout: Duration,
    ) -> Result<Completed, OrchestratorError> {
        self.run_to_end(spec, timeout).await
    }

    async fn release(&self, owner: &ServiceKey) {
        let mesh = owner.mesh.as_str();
        // The mesh network goes with the mesh's last service.
        if mesh_is_empty(&self.docker, mesh).await {
            if let Ok(proxies) = list_labelled(
                &self.docker,
                vec![
                    format!("{}={}", labels::ROLE, labels::ROLE_PROXY),
                    format!("{}={mesh}", labels::MESH),
                    format!("{}={}", labels::INSTANCE, self.instance),
                ],
            )
            .await
            {
                for p in proxies.into_iter().filter_map(|p| p.id) {
                    let _ = remove_forced(&self.docker, &p).await;
                }
            }
            let egress = format!("meshbox-{mesh}-egress");
            if self.docker.remove_network(&egress).await.is_ok() {
                release_host_isolation(&host_bridge_name(&egress)).await;
            }
            let _ = self.docker.remove_network(&format!("meshbox-{mesh}")).await;
        }
    }

    async fn adopt(&self, spec: &SandboxSpec) -> Option<Sandbox> {
        let enforced = self.check(spec).ok()?;
        let mesh = &spec.owner.mesh;
        let service = &spec.owner.name;
        let list = list_labelled(
            &self.docker,
            vec![
                format!("{}=true", labels::MANAGED),
                format!("{}={}", labels::INSTANCE, self.instance),
                format!("{}={mesh}", labels::MESH),
                format!("{}={service}", labels::SERVICE),
            ],
        )
        .await
        .ok()?;
        let want = spec_hash(spec);
        let mut adopted = None;
        for c in list {
            let Some(id) = c.id else { continue };
            let running = c
                .state
                .as_ref()
                .is_some_and(|s| format!("{s:?}").to_lowercase().contains("running"));
            let same = c.labels.as_ref().and_then(|l| l.get(labels::SPEC_HASH)) == Some(&want);
            if adopted.is_none() && running && same {
                adopted = Some(id);
            } else {
                // Stale: another spec, or exited. Replaced by what is deployed now.
                let _ = remove_forced(&self.docker, &id).await;
            }
        }
        let id = adopted?;
        let attached = attach(&self.docker, &id).await.ok()?;
        Some(self.sandbox(id, attached, enforced).await)
    }

    async fn sweep(&self, keep: &[ServiceKey]) {
        let Ok(list) = list_labelled(
            &self.docker,
            vec![
                format!("{}=true", labels::MANAGED),
                format!("{}={}", labels::INSTANCE, self.instance),
            ],
        )
        .await
        else {
            return;
        };
        for c in list {
            let labels = c.labels.unwrap_or_default();
            if labels.get(labels::ROLE).map(String::as_str) == Some(labels::ROLE_PROXY) {
                continue; // removed with its mesh
            }
            let key = ServiceKey {
                mesh: labels.get(labels::MESH).cloned().unwrap_or_default(),
                name: labels.get(labels::SERVICE).cloned().unwrap_or_default(),
            };
            if !keep.contains(&key) {
                if let Some(id) = c.id {
                    debug!(container = %id, "removing a managed container with no stored spec");
                    let _ = remove_forced(&self.docker, &id).await;
                }
            }
        }
    }

    async fn spawn(&self, spec: SandboxSpec) -> Result<Sandbox, OrchestratorError> {
        let enforced = self.check(&spec)?;
        let image = spec.image.clone().ok_or(Unsupported::NoImage)?;
        let mesh = spec.owner.mesh.clone();
        let service = spec.owner.name.clone();
        let mut proxy_env = Vec::new();
        let network_mode = match spec.network.effective() {
            NetworkPolicy::Mode(NetworkMode::None) => "none".to_owned(),
            NetworkPolicy::Allow { allow } => {
                // Only the proxy's allowlist leads out of the internal network.
                let proxy_image = if image.starts_with("meshbox/runner-") {
                    image.clone()
                } else {
                    runner_image(Runtime::Python)
                };
                let (net, url) = self.egress(&mesh, &allow, &proxy_image).await?;
                for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                    proxy_env.push((k.to_owned(), url.clone()));
                }
                proxy_env.push(("NO_PROXY".into(), "localhost,127.0.0.1".into()));
                proxy_env.push(("no_proxy".into(), "localhost,127.0.0.1".into()));
                net
            }
            _ => self.mesh_network(&mesh).await?,
        };
        let mut labels = self.labels(&spec);
        labels.insert(labels::SPEC_HASH.into(), spec_hash(&spec));
        let mut mounts = Vec::new();
        for m in &spec.mounts {
            mounts.push(self.docker_mount(m, false).await?);
        }
        // HOME must be writable on a read-only root: the tmpfs. PATH is the
        // image's, not the host's.
        let mut env = spec.env.clone();
        env.insert("HOME".into(), "/tmp".into());
        env.insert(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
        env.extend(proxy_env);
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let memory = spec.limits.memory_mb.map(|mb| (mb * 1024 * 1024) as i64);
        let host_config = HostConfig {
            memory,
            memory_swap: memory,
            nano_cpus: spec.limits.cpus.map(|c| (c * 1e9) as i64),
            pids_limit: Some(spec.limits.pids.unwrap_or(DEFAULT_PIDS) as i64),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([(
                "/tmp".into(),
                "rw,nosuid,nodev,size=64m".into(),
            )])),
            network_mode: Some(network_mode),
            mounts: Some(mounts),
            ..hardened()
        };
        let image_name = image.clone();
        let body = ContainerCreateBody {
            image: Some(image),
            cmd: (!spec.argv.is_empty()).then(|| spec.argv.clone()),
            env: Some(env),
            working_dir: spec
                .workdir
                .as_ref()
                .filter(|w| !w.as_os_str().is_empty())
                .map(|w| w.to_string_lossy().into_owned()),
            user: Some(SANDBOX_USER.into()),
            labels: Some(labels),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            open_stdin: Some(true),
            stdin_once: Some(false),
            tty: Some(false),
            host_config: Some(host_config),
            ..Default::default()
        };
        let name = format!("meshbox-{mesh}-{service}-{:08x}", fastrand::u32(..));
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body,
            )
            .await
            .map_err(|e| create_err(&image_name, e))?;
        let id = created.id;
        let cleanup = |docker: Docker, id: String| async move {
            let _ = remove_forced(&docker, &id).await;
        };
        // Attach before start, so no early output is lost.
        let attached = match attach(&self.docker, &id).await {
            Ok(a) => a,
            Err(e) => {
                cleanup(self.docker.clone(), id).await;
                return Err(docker_err("attaching to the container", e));
            }
        };
        if let Err(e) = self
            .docker
            .start_container(
                &id,
                None::<bollard::query_parameters::StartContainerOptions>,
            )
            .await
        {
            cleanup(self.docker.clone(), id).await;
            return Err(docker_err("starting the container", e));
        }
        Ok(self.sandbox(id, attached, enforced).await)
    }
}

impl DockerBackend {
    /// Wires an attached container into a `Sandbox`: demultiplexed streams,
    /// an exit waiter (which removes the container), and a handle.
    async fn sandbox(
        &self,
        id: String,
        attached: bollard::container::AttachContainerResults,
        enforced: Enforced,
    ) -> Sandbox {
        let cleanup = |docker: Docker, id: String| async move {
            let _ = remove_forced(&docker, &id).await;
        };
        let pid = self
            .docker
            .inspect_container(&id, None)
            .await
            .ok()
            .and_then(|i| i.state.and_then(|s| s.pid))
            .filter(|p| *p > 0)
            .map(|p| p as u32);

        // Demultiplex the attach stream: stdout frames and stderr frames.
        let (mut out_w, out_r) = tokio::io::duplex(1 << 20);
        let (mut err_w, err_r) = tokio::io::duplex(1 << 16);
        let mut output = attached.output;
        tokio::spawn(async move {
            while let Some(frame) = output.next().await {
                let ok = match frame {
                    Ok(bollard::container::LogOutput::StdOut { message }) => {
                        out_w.write_all(&message).await.is_ok()
                    }
                    Ok(bollard::container::LogOutput::StdErr { message }) => {
                        let _ = err_w.write_all(&message).await;
                        true
                    }
                    Ok(_) => true,
                    Err(e) => {
                        debug!(error = %e, "attach stream ended");
                        false
                    }
                };
                if !ok {
                    break;
                }
            }
        });

        let (exit_tx, exit_rx) = watch::channel(None);
        {
            let docker = self.docker.clone();
            let id = id.clone();
            tokio::spawn(async move {
                let mut wait = docker.wait_container(&id, None::<WaitContainerOptions>);
                let _ = wait.next().await;
                let reason = match docker.inspect_container(&id, None).await {
                    Ok(info) => {
                        let st = info.state.unwrap_or_default();
                        let code = st.exit_code.map(|c| c as i32);
                        ExitReason {
                            code,
                            // 128+n is how a signal death shows through init.
                            signal: code.filter(|c| *c > 128 && *c < 160).map(|c| c - 128),
                            oom_killed: st.oom_killed.unwrap_or(false),
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "inspecting an exited container failed");
                        ExitReason::default()
                    }
                };
                // Removed before the exit is announced, so whoever waits for
                // it (undeploy) sees the mesh without this container.
                cleanup(docker, id).await;
                exit_tx.send_replace(Some(reason));
            });
        }
        Sandbox {
            io: SandboxIo {
                stdin: attached.input,
                stdout: Box::pin(out_r),
                stderr: Box::pin(err_r),
            },
            exit: exit_rx.clone(),
            handle: Box::new(DockerHandle {
                docker: self.docker.clone(),
                id: id.clone(),
                exit: exit_rx,
                detached: std::sync::atomic::AtomicBool::new(false),
            }),
            pid,
            container_id: Some(id),
            enforced,
        }
    }
}

async fn mesh_is_empty(docker: &Docker, mesh: &str) -> bool {
    match list_labelled(
        docker,
        vec![
            format!("{}=true", labels::MANAGED),
            format!("{}={mesh}", labels::MESH),
        ],
    )
    .await
    {
        // Proxies serve the mesh; they do not keep it alive.
        Ok(list) => list.iter().all(|c| {
            c.labels
                .as_ref()
                .and_then(|l| l.get(labels::ROLE))
                .map(String::as_str)
                == Some(labels::ROLE_PROXY)
        }),
        Err(_) => false,
    }
}

/// What `meshbox doctor` reports about the engine.
pub async fn describe(backend: &DockerBackend) -> Vec<(String, String)> {
    let mut out = vec![("docker API".to_owned(), backend.api_version().to_owned())];
    for rt in [Runtime::Node, Runtime::Python, Runtime::Bun] {
        let image = runner_image(rt);
        let state = match backend.docker.inspect_image(&image).await {
            Ok(_) => "present".to_owned(),
            Err(_) => "missing (meshbox images build)".to_owned(),
        };
        out.push((image, state));
    }
    out
}
