//! The docker backend: one container per server, through bollard.
//!
//! Owns every Docker API call of meshbox's sandboxes: containers (created
//! hardened and limited, attached before start so no early output is lost),
//! per-mesh bridge networks, and per-source volumes filled by a short-lived
//! install container with network ("install with network, run without").
//! Docker errors are translated here; no bollard type leaves this module.

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
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{
    Enforced, ExitReason, Mount, Orchestrator, OrchestratorError, PrepareRequest, Prepared,
    Sandbox, SandboxHandle, SandboxIo, SandboxSpec,
};
use crate::config::{NetworkPolicy, Runtime};
use crate::source::install::{fnv, tail};
use crate::source::{Launch, Source};

/// Where the installed source lives inside containers.
pub const CACHE_MOUNT: &str = "/cache";
/// The non-root user every container runs as.
pub const SANDBOX_USER: &str = "10001";
/// Default pids limit when a spec names none.
pub const DEFAULT_PIDS: u64 = 256;

/// The runner image of a runtime.
pub fn runner_image(runtime: Runtime) -> String {
    format!("meshbox/runner-{runtime}:latest")
}

#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Host-side state (cached install answers).
    pub data_dir: PathBuf,
    /// Budget of one install container.
    pub install_timeout: Duration,
}

pub struct DockerBackend {
    docker: Docker,
    config: DockerConfig,
    /// This meshbox's identity (kept in its data dir): it adopts and sweeps
    /// only containers carrying it, never another instance's on the same engine.
    instance: String,
    api_version: String,
}

fn docker_err(context: &str, e: bollard::errors::Error) -> OrchestratorError {
    use bollard::errors::Error as E;
    match e {
        E::DockerResponseServerError {
            status_code: 404,
            message,
        } => OrchestratorError::Setup(format!("{context}: not found: {message}")),
        E::DockerResponseServerError {
            status_code: 409,
            message,
        } => OrchestratorError::Setup(format!("{context}: conflict: {message}")),
        other => OrchestratorError::Setup(format!("{context}: {other}")),
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
        Err(OrchestratorError::Unsupported(
            "network allowlists need iptables (as root) to keep sandboxes off the host; not available here".into(),
        ))
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
        .map_err(|e| OrchestratorError::Setup(format!("cannot write `{}`: {e}", path.display())))?;
    Ok(id)
}

/// The answer `meshbox install --json` prints inside the install container.
#[derive(Debug, Deserialize, serde::Serialize)]
pub struct InstallAnswer {
    pub argv: Vec<String>,
    pub workdir: PathBuf,
    pub runtime: Option<Runtime>,
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
            config,
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
                ("meshbox.managed".into(), "true".into()),
                ("meshbox.mesh".into(), mesh.into()),
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
                ("meshbox.managed".into(), "true".into()),
                ("meshbox.role".into(), "proxy".into()),
                ("meshbox.mesh".into(), mesh.to_owned()),
                ("meshbox.instance".into(), self.instance.clone()),
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

    /// Runs a short-lived container to completion: its stdout, or its stderr tail.
    async fn run_to_end(
        &self,
        body: ContainerCreateBody,
        upload: Option<Vec<u8>>,
        what: &str,
    ) -> Result<Vec<u8>, OrchestratorError> {
        let name = format!("meshbox-install-{:08x}", fastrand::u32(..));
        let created = self
            .docker
            .create_container(
                Some(CreateContainerOptionsBuilder::default().name(&name).build()),
                body,
            )
            .await
            .map_err(|e| docker_err(what, e))?;
        let id = created.id;
        let result = async {
            if let Some(tar) = upload {
                self.docker
                    .upload_to_container(
                        &id,
                        Some(
                            UploadToContainerOptionsBuilder::default()
                                .path(CACHE_MOUNT)
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
                .map_err(|e| docker_err(what, e))?;
            let mut wait = self
                .docker
                .wait_container(&id, None::<WaitContainerOptions>);
            let waited = tokio::time::timeout(self.config.install_timeout, wait.next()).await;
            if waited.is_err() {
                return Err(OrchestratorError::Source(
                    crate::source::SourceError::InstallTimeout {
                        what: what.to_owned(),
                        secs: self.config.install_timeout.as_secs(),
                    },
                ));
            }
            let info = self
                .docker
                .inspect_container(&id, None)
                .await
                .map_err(|e| docker_err(what, e))?;
            let code = info.state.and_then(|s| s.exit_code).unwrap_or(-1);
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
                        out.extend_from_slice(&message)
                    }
                    bollard::container::LogOutput::StdErr { message } => {
                        err.extend_from_slice(&message)
                    }
                    _ => {}
                }
            }
            if code == 0 {
                Ok(out)
            } else {
                let tail = tail(&err);
                Err(OrchestratorError::Source(
                    crate::source::SourceError::Install {
                        what: what.to_owned(),
                        status: format!("exit code {code}"),
                        tail,
                    },
                ))
            }
        }
        .await;
        let _ = remove_forced(&self.docker, &id).await;
        result
    }

    /// The runtime a source will run with, known before installing it.
    fn runtime_for(source: &Source, runtime: Option<Runtime>) -> Runtime {
        runtime.unwrap_or(match source {
            Source::Npm { .. } => Runtime::Node,
            Source::Pypi { .. } => Runtime::Python,
            Source::Path(dir) => crate::source::detect_runtime(dir).unwrap_or(Runtime::Node),
            Source::Git { .. } | Source::Image(_) => Runtime::Node,
        })
    }

    async fn install_in_container(
        &self,
        req: &PrepareRequest<'_>,
        runtime: Runtime,
        volume: &str,
    ) -> Result<InstallAnswer, OrchestratorError> {
        let source_arg = match req.source {
            // Path sources are copied in as a tar stream, never bind-mounted.
            Source::Path(_) => format!("path:{CACHE_MOUNT}/src"),
            other => other.to_string(),
        };
        let mut cmd = vec![
            "meshbox".to_owned(),
            "install".to_owned(),
            "--cache".to_owned(),
            CACHE_MOUNT.to_owned(),
            "--runtime".to_owned(),
            runtime.to_string(),
        ];
        if let Some(c) = req.command {
            cmd.push("--command-json".into());
            cmd.push(serde_json::to_string(c).unwrap_or_default());
        }
        cmd.push(source_arg);
        cmd.push("--".into());
        cmd.extend(req.args.iter().cloned());
        let upload = match req.source {
            Source::Path(dir) => Some(tar_dir(dir, "src").map_err(|e| {
                OrchestratorError::Setup(format!("failed to pack `{}`: {e}", dir.display()))
            })?),
            _ => None,
        };
        let env: Vec<String> = passthrough_env()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let body = ContainerCreateBody {
            image: Some(runner_image(runtime)),
            cmd: Some(cmd),
            env: Some(env),
            user: Some(SANDBOX_USER.into()),
            labels: Some(HashMap::from([
                ("meshbox.managed".into(), "true".into()),
                ("meshbox.role".into(), "install".into()),
                ("meshbox.instance".into(), self.instance.clone()),
            ])),
            host_config: Some(HostConfig {
                mounts: Some(vec![DockerMount {
                    typ: Some(MountType::VOLUME),
                    source: Some(volume.into()),
                    target: Some(CACHE_MOUNT.into()),
                    read_only: Some(false),
                    ..Default::default()
                }]),
                ..hardened()
            }),
            ..Default::default()
        };
        (req.progress)(&format!(
            "installing {} in a {} container",
            req.source, runtime
        ));
        let out = self
            .run_to_end(body, upload, &format!("install of {}", req.source))
            .await?;
        let text = String::from_utf8_lossy(&out);
        let last = text
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or("");
        serde_json::from_str(last).map_err(|e| {
            OrchestratorError::Setup(format!(
                "install container gave no launch answer ({e}): {}",
                text.trim()
            ))
        })
    }
}

/// Proxy and registry settings an install container needs (never credentials).
fn passthrough_env() -> Vec<(String, String)> {
    [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "PIP_INDEX_URL",
        "UV_INDEX_URL",
        "npm_config_registry",
    ]
    .iter()
    .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
    .collect()
}

/// Paths, sizes and mtimes of what `tar_dir` would pack: changes when the
/// directory's content does.
fn dir_fingerprint(dir: &Path) -> String {
    let mut acc = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            if matches!(
                e.file_name().to_str(),
                Some(".git" | "node_modules" | ".venv" | "__pycache__")
            ) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            let mtime = meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            acc.push_str(&format!("{}|{}|{mtime}\n", e.path().display(), meta.len()));
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    fnv(&acc)
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
    fn backend(&self) -> &'static str {
        "docker"
    }

    fn check(&self, spec: &SandboxSpec) -> Result<Enforced, OrchestratorError> {
        Ok(Enforced {
            memory: spec.limits.memory_mb.is_some(),
            cpus: spec.limits.cpus.is_some(),
            // A pids limit always applies (default 256).
            pids: true,
            network: true,
        })
    }

    async fn prepare(&self, req: PrepareRequest<'_>) -> Result<Prepared, OrchestratorError> {
        if let Source::Image(image) = req.source {
            let mut argv: Vec<String> = req.command.map(<[String]>::to_vec).unwrap_or_default();
            argv.extend(req.args.iter().cloned());
            return Ok(Prepared {
                launch: Launch {
                    argv,
                    workdir: PathBuf::new(),
                    runtime: req.runtime,
                },
                image: Some(image.clone()),
                mounts: Vec::new(),
            });
        }
        let runtime = Self::runtime_for(req.source, req.runtime);
        let ident = match req.source {
            Source::Path(dir) => format!("path:{}", dir.display()),
            other => other.to_string(),
        };
        let volume = format!("meshbox-src-{}-{runtime}", fnv(&ident));
        // A warm source: its volume and the answer of its install are both there.
        let answers = self.config.data_dir.join("docker-installs");
        let key = fnv(&format!(
            "{volume}|{}|{}",
            serde_json::to_string(&req.command).unwrap_or_default(),
            serde_json::to_string(req.args).unwrap_or_default()
        ));
        // A directory is warm while its files are unchanged.
        let fingerprint = match req.source {
            Source::Path(dir) => dir_fingerprint(dir),
            _ => String::new(),
        };
        let answer_file = answers.join(format!("{key}-{fingerprint}.json"));
        let volume_exists = self.docker.inspect_volume(&volume).await.is_ok();
        let cached: Option<InstallAnswer> = match (volume_exists, req.source) {
            (true, Source::Npm { .. } | Source::Pypi { .. } | Source::Path(_)) => {
                std::fs::read(&answer_file)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
            }
            // A branch may have moved: re-run the install (it reuses what the
            // volume holds, and `ls-remote` tells whether anything changed).
            _ => None,
        };
        let answer = match cached {
            Some(a) => a,
            None => {
                if !volume_exists {
                    self.docker
                        .create_volume(VolumeCreateRequest {
                            name: Some(volume.clone()),
                            labels: Some(HashMap::from([
                                ("meshbox.managed".into(), "true".into()),
                                ("meshbox.source".into(), ident.chars().take(200).collect()),
                            ])),
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| docker_err("creating the source volume", e))?;
                }
                let mut a = self.install_in_container(&req, runtime, &volume).await?;
                if let Some(rt) = a.runtime.filter(|rt| *rt != runtime) {
                    // A git source turned out to need another runtime's image.
                    let volume2 = format!("meshbox-src-{}-{rt}", fnv(&ident));
                    let _ = self
                        .docker
                        .create_volume(VolumeCreateRequest {
                            name: Some(volume2.clone()),
                            labels: Some(HashMap::from([(
                                "meshbox.managed".into(),
                                "true".into(),
                            )])),
                            ..Default::default()
                        })
                        .await;
                    a = self.install_in_container(&req, rt, &volume2).await?;
                    return Ok(Prepared {
                        launch: Launch {
                            argv: a.argv,
                            workdir: a.workdir,
                            runtime: Some(rt),
                        },
                        image: Some(runner_image(rt)),
                        mounts: vec![Mount {
                            volume: volume2,
                            target: CACHE_MOUNT.into(),
                            read_only: true,
                        }],
                    });
                }
                let _ = std::fs::create_dir_all(&answers);
                let _ = std::fs::write(&answer_file, serde_json::to_vec(&a).unwrap_or_default());
                a
            }
        };
        Ok(Prepared {
            launch: Launch {
                argv: answer.argv,
                workdir: answer.workdir,
                runtime: answer.runtime.or(Some(runtime)),
            },
            image: Some(runner_image(runtime)),
            mounts: vec![Mount {
                volume,
                target: CACHE_MOUNT.into(),
                read_only: true,
            }],
        })
    }

    async fn released(&self, mesh: &str, _service: &str) {
        // The mesh network goes with the mesh's last service.
        if mesh_is_empty(&self.docker, mesh).await {
            if let Ok(proxies) = list_labelled(
                &self.docker,
                vec![
                    "meshbox.role=proxy".to_owned(),
                    format!("meshbox.mesh={mesh}"),
                    format!("meshbox.instance={}", self.instance),
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
        let mesh = spec.labels.get("meshbox.mesh")?;
        let service = spec.labels.get("meshbox.service")?;
        let list = list_labelled(
            &self.docker,
            vec![
                "meshbox.managed=true".to_owned(),
                format!("meshbox.instance={}", self.instance),
                format!("meshbox.mesh={mesh}"),
                format!("meshbox.service={service}"),
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
            let same = c.labels.as_ref().and_then(|l| l.get("meshbox.spec-hash")) == Some(&want);
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

    async fn sweep(&self, keep: &[(String, String)]) {
        let Ok(list) = list_labelled(
            &self.docker,
            vec![
                "meshbox.managed=true".to_owned(),
                format!("meshbox.instance={}", self.instance),
            ],
        )
        .await
        else {
            return;
        };
        for c in list {
            let labels = c.labels.unwrap_or_default();
            if labels.get("meshbox.role").map(String::as_str) == Some("proxy") {
                continue; // removed with its mesh
            }
            let key = (
                labels.get("meshbox.mesh").cloned().unwrap_or_default(),
                labels.get("meshbox.service").cloned().unwrap_or_default(),
            );
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
        let image = spec
            .image
            .clone()
            .ok_or_else(|| OrchestratorError::Setup("no image for the container".into()))?;
        let mesh = spec
            .labels
            .get("meshbox.mesh")
            .cloned()
            .unwrap_or_else(|| "default".into());
        let service = spec
            .labels
            .get("meshbox.service")
            .cloned()
            .unwrap_or_else(|| "run".into());
        let mut proxy_env = Vec::new();
        let network_mode = match spec.network.effective() {
            NetworkPolicy::Mode(crate::config::NetworkMode::None) => "none".to_owned(),
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
        let mut labels: HashMap<String, String> = spec.labels.clone().into_iter().collect();
        labels.insert("meshbox.managed".into(), "true".into());
        labels.insert("meshbox.spec-hash".into(), spec_hash(&spec));
        labels.insert("meshbox.instance".into(), self.instance.clone());
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
            mounts: Some(
                spec.mounts
                    .iter()
                    .map(|m| DockerMount {
                        typ: Some(MountType::VOLUME),
                        source: Some(m.volume.clone()),
                        target: Some(m.target.clone()),
                        read_only: Some(m.read_only),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..hardened()
        };
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
            .map_err(|e| docker_err("creating the container", e))?;
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
            "meshbox.managed=true".to_owned(),
            format!("meshbox.mesh={mesh}"),
        ],
    )
    .await
    {
        // Proxies serve the mesh; they do not keep it alive.
        Ok(list) => list.iter().all(|c| {
            c.labels
                .as_ref()
                .and_then(|l| l.get("meshbox.role"))
                .map(String::as_str)
                == Some("proxy")
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
