//! Containers: the hardened create body of a server, and a container's life
//! (create, attach, start, wait, stop, remove) wired into a [`Sandbox`].
//!
//! The create bodies are pure functions of a spec and what the backend
//! resolved for it (network, instance, CA bundle), so every hardening
//! setting is unit-tested without an engine. Networks, egress proxies and
//! install runs are not this module's: it is handed their results.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bollard::container::{AttachContainerResults, LogOutput};
use bollard::models::{
    ContainerCreateBody, ContainerState, ContainerSummary, ContainerSummaryStateEnum, HostConfig,
    Mount as DockerMount, MountType,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, StartContainerOptions,
    StopContainerOptionsBuilder, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::labels::{self, Labels};
use super::network::Attachment;
use super::{engine_err, fnv, translate, What};
use crate::orchestrator::{
    Enforced, ExitReason, Isolation, Mount, MountSource, OrchestratorError, Role, Sandbox,
    SandboxHandle, SandboxIo, SandboxSpec, Unsupported,
};

/// The non-root user every container runs as.
pub const SANDBOX_USER: &str = "10001";
/// Pids limit of a server when its spec names none.
pub const DEFAULT_PIDS: u64 = 256;
/// The writable scratch space of a read-only container, and its HOME.
pub const TMPFS: &str = "/tmp";
const TMPFS_OPTIONS: &str = "rw,nosuid,nodev,size=64m";
/// PATH inside containers: the image's directories, never the host's.
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the operator's CA bundle is mounted, read-only.
pub const CA_BUNDLE_TARGET: &str = "/etc/meshbox/ca-bundle.pem";
/// The variables that point TLS clients (OpenSSL, node, python, pip, curl,
/// git) at a CA bundle.
const CA_VARIABLES: [&str; 6] = [
    "SSL_CERT_FILE",
    "NODE_EXTRA_CA_CERTS",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "PIP_CERT",
    "GIT_SSL_CAINFO",
];

/// What the backend resolved for one container, besides its spec.
#[derive(Debug, Clone, Copy)]
pub struct Resolved<'a> {
    /// This meshbox's instance id (labels).
    pub instance: &'a str,
    /// The network the container joins (servers; installs use the default).
    pub network: &'a Attachment,
    /// A complete PEM bundle on the host that containers trust instead of
    /// their image's own.
    pub ca_bundle: Option<&'a Path>,
}

/// What every meshbox container gets, whatever its role: no capabilities, no
/// privilege gain, an init that reaps and forwards signals.
pub fn hardened() -> HostConfig {
    HostConfig {
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges".into()]),
        init: Some(true),
        ..Default::default()
    }
}

/// Memory in bytes, for `memory` and (equal, so no swap) `memory_swap`.
fn memory_bytes(memory_mb: Option<u64>) -> Option<i64> {
    memory_mb.map(|mb| i64::try_from(mb.saturating_mul(1 << 20)).unwrap_or(i64::MAX))
}

/// A spec's mount as docker's: a named volume or a host bind.
pub fn docker_mount(m: &Mount) -> DockerMount {
    let (typ, source) = match &m.source {
        MountSource::Volume(name) => (MountType::VOLUME, name.clone()),
        MountSource::Host(path) => (MountType::BIND, path.to_string_lossy().into_owned()),
    };
    DockerMount {
        typ: Some(typ),
        source: Some(source),
        target: Some(m.target.to_string_lossy().into_owned()),
        read_only: Some(m.read_only),
        ..Default::default()
    }
}

/// The CA bundle's read-only mount and the variables pointing at it.
fn ca_bundle(ca: Option<&Path>) -> (Option<DockerMount>, Vec<(String, String)>) {
    let Some(path) = ca else {
        return (None, Vec::new());
    };
    let mount = docker_mount(&Mount {
        source: MountSource::Host(path.to_path_buf()),
        target: CA_BUNDLE_TARGET.into(),
        read_only: true,
        copy_on_write: false,
    });
    let env = CA_VARIABLES
        .iter()
        .map(|k| ((*k).to_owned(), CA_BUNDLE_TARGET.to_owned()))
        .collect();
    (Some(mount), env)
}

/// Identifies what a container was created from: a re-adopted container
/// must match the spec it would be created with now.
pub fn spec_hash(spec: &SandboxSpec) -> String {
    fnv(&format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        spec.argv, spec.env, spec.image, spec.limits, spec.network, spec.mounts, spec.workdir
    ))
}

fn env_list(env: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
    env.into_iter().map(|(k, v)| format!("{k}={v}")).collect()
}

/// The create body of a server container: hardened (no capabilities, no
/// privilege gain, read-only root with a tmpfs `/tmp` as HOME, non-root
/// user, init), limited (memory with equal memory-swap, nano-cpus, a pids
/// limit, [`DEFAULT_PIDS`] unless the spec names one), labelled, on the
/// resolved network, stdin open and no TTY.
pub fn server_body(
    spec: &SandboxSpec,
    r: &Resolved<'_>,
) -> Result<ContainerCreateBody, Unsupported> {
    let image = spec.image.clone().ok_or(Unsupported::NoImage)?;
    let (ca_mount, ca_env) = ca_bundle(r.ca_bundle);
    let mut env = spec.env.clone();
    // HOME must be writable on a read-only root: the tmpfs.
    env.insert("HOME".into(), TMPFS.into());
    env.insert("PATH".into(), CONTAINER_PATH.into());
    env.extend(ca_env);
    env.extend(r.network.proxy_env());
    let mut labels = labels::of_sandbox(r.instance, &spec.owner, Role::Server);
    labels.insert(labels::SPEC_HASH.into(), spec_hash(spec));
    let mut mounts: Vec<DockerMount> = spec.mounts.iter().map(docker_mount).collect();
    mounts.extend(ca_mount);
    let memory = memory_bytes(spec.limits.memory_mb);
    let host_config = HostConfig {
        memory,
        memory_swap: memory,
        nano_cpus: spec.limits.cpus.map(|c| (c * 1e9) as i64),
        pids_limit: Some(spec.limits.pids.unwrap_or(DEFAULT_PIDS) as i64),
        readonly_rootfs: Some(true),
        tmpfs: Some(HashMap::from([(TMPFS.into(), TMPFS_OPTIONS.into())])),
        network_mode: Some(r.network.network_mode()),
        mounts: Some(mounts),
        ..hardened()
    };
    Ok(ContainerCreateBody {
        image: Some(image),
        cmd: (!spec.argv.is_empty()).then(|| spec.argv.clone()),
        env: Some(env_list(env)),
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
    })
}

/// The create body of a container run to completion (an install step):
/// hardened and non-root like a server, on the default network (installs
/// need the registries), writing its cache volume; its root stays writable
/// for package managers' scratch files.
pub fn install_body(
    spec: &SandboxSpec,
    r: &Resolved<'_>,
) -> Result<ContainerCreateBody, Unsupported> {
    let image = spec.image.clone().ok_or(Unsupported::NoImage)?;
    if spec.argv.is_empty() {
        return Err(Unsupported::EmptyCommand);
    }
    let (ca_mount, ca_env) = ca_bundle(r.ca_bundle);
    let mut env = spec.env.clone();
    env.extend(ca_env);
    let mut mounts: Vec<DockerMount> = spec.mounts.iter().map(docker_mount).collect();
    mounts.extend(ca_mount);
    let memory = memory_bytes(spec.limits.memory_mb);
    Ok(ContainerCreateBody {
        image: Some(image),
        cmd: Some(spec.argv.clone()),
        env: Some(env_list(env)),
        user: Some(SANDBOX_USER.into()),
        labels: Some(labels::of_sandbox(r.instance, &spec.owner, spec.role)),
        host_config: Some(HostConfig {
            mounts: Some(mounts),
            memory,
            memory_swap: memory,
            pids_limit: Some(spec.limits.pids.unwrap_or(1024) as i64),
            ..hardened()
        }),
        ..Default::default()
    })
}

/// How a container's final state reads as an exit (128+n is how a signal
/// death shows through init).
pub fn exit_reason(state: &ContainerState) -> ExitReason {
    let code = state.exit_code.map(|c| c as i32);
    ExitReason {
        code,
        signal: code.filter(|c| *c > 128 && *c < 160).map(|c| c - 128),
        oom_killed: state.oom_killed.unwrap_or(false),
    }
}

/// A listed container that is running.
pub fn is_running(c: &ContainerSummary) -> bool {
    c.state == Some(ContainerSummaryStateEnum::RUNNING)
}

/// Creates a container named `name`. A 404 is a missing image (checked,
/// since a missing network answers 404 too); a 409 is a name taken.
pub async fn create(
    docker: &Docker,
    name: &str,
    body: ContainerCreateBody,
) -> Result<String, OrchestratorError> {
    let image = body.image.clone().unwrap_or_default();
    let network = body
        .host_config
        .as_ref()
        .and_then(|h| h.network_mode.clone())
        .unwrap_or_default();
    match docker
        .create_container(
            Some(CreateContainerOptionsBuilder::default().name(name).build()),
            body,
        )
        .await
    {
        Ok(created) => Ok(created.id),
        Err(e) => match translate("creating a container", What::Container, name, e) {
            OrchestratorError::NotFound { .. } if docker.inspect_image(&image).await.is_err() => {
                Err(OrchestratorError::MissingImage { image })
            }
            OrchestratorError::NotFound { .. } => Err(OrchestratorError::NotFound {
                what: What::Network.as_str(),
                name: network,
            }),
            other => Err(other),
        },
    }
}

pub async fn start(docker: &Docker, id: &str, op: &'static str) -> Result<(), OrchestratorError> {
    docker
        .start_container(id, None::<StartContainerOptions>)
        .await
        .map_err(|e| translate(op, What::Container, id, e))
}

/// Every container (running or not) carrying all of `pairs`.
pub async fn list_labelled(
    docker: &Docker,
    pairs: &[(&str, &str)],
) -> Result<Vec<ContainerSummary>, OrchestratorError> {
    docker
        .list_containers(Some(
            ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&labels::filter(pairs))
                .build(),
        ))
        .await
        .map_err(engine_err("listing containers"))
}

/// Removes a container whatever its state; false if it was not there.
pub async fn remove_forced(docker: &Docker, id: &str) -> bool {
    docker
        .remove_container(
            id,
            Some(RemoveContainerOptionsBuilder::default().force(true).build()),
        )
        .await
        .is_ok()
}

/// Attaches to a container's stdin, stdout and stderr as a stream.
pub async fn attach(
    docker: &Docker,
    id: &str,
) -> Result<AttachContainerResults, OrchestratorError> {
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
        .map_err(|e| translate("attaching to the container", What::Container, id, e))
}

/// Attaches to a created container (before start, so no early output is
/// lost) and starts it; the container is removed if either fails.
pub async fn attach_and_start(
    docker: &Docker,
    id: &str,
) -> Result<AttachContainerResults, OrchestratorError> {
    let attached = match attach(docker, id).await {
        Ok(a) => start(docker, id, "starting the container")
            .await
            .map(|()| a),
        Err(e) => Err(e),
    };
    if attached.is_err() {
        remove_forced(docker, id).await;
    }
    attached
}

/// Wires an attached container into a `Sandbox`: demultiplexed streams, an
/// exit waiter (which removes the container), and a handle.
pub async fn sandbox(
    docker: &Docker,
    id: String,
    attached: AttachContainerResults,
    enforced: Enforced,
    isolation: Isolation,
) -> Sandbox {
    let pid = docker
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
                Ok(LogOutput::StdOut { message }) => out_w.write_all(&message).await.is_ok(),
                Ok(LogOutput::StdErr { message }) => {
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
        let docker = docker.clone();
        let id = id.clone();
        tokio::spawn(async move {
            let mut wait = docker.wait_container(&id, None::<WaitContainerOptions>);
            let _ = wait.next().await;
            let reason = match docker.inspect_container(&id, None).await {
                Ok(info) => exit_reason(&info.state.unwrap_or_default()),
                Err(e) => {
                    warn!(error = %e, "inspecting an exited container failed");
                    ExitReason::default()
                }
            };
            // Removed before the exit is announced, so whoever waits for
            // it (undeploy) sees the mesh without this container.
            remove_forced(&docker, &id).await;
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
            docker: docker.clone(),
            id: id.clone(),
            exit: exit_rx,
            detached: AtomicBool::new(false),
        }),
        pid,
        container_id: Some(id),
        enforced,
        isolation,
    }
}

/// Of a service's listed containers, the one to re-adopt (running, created
/// from `want`) and the stale rest, to remove.
pub fn pick_adoptable(list: Vec<ContainerSummary>, want: &str) -> (Option<String>, Vec<String>) {
    let mut adopted = None;
    let mut stale = Vec::new();
    for c in list {
        let Some(id) = c.id.clone() else { continue };
        let same = labels::get(c.labels.as_ref(), labels::SPEC_HASH) == Some(want);
        if adopted.is_none() && is_running(&c) && same {
            adopted = Some(id);
        } else {
            stale.push(id);
        }
    }
    (adopted, stale)
}

/// The labels a listed container carries.
pub fn labels_of(c: &ContainerSummary) -> Labels {
    c.labels.clone().unwrap_or_default()
}

struct DockerHandle {
    docker: Docker,
    id: String,
    exit: watch::Receiver<Option<ExitReason>>,
    /// Let go without stopping: the container outlives this meshbox.
    detached: AtomicBool,
}

impl DockerHandle {
    /// The exit, if it comes within `d`.
    async fn wait_for(&self, d: Duration) -> Option<ExitReason> {
        crate::model::exit_within(&self.exit, d).await
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
        self.detached.store(true, Ordering::SeqCst);
        true
    }

    /// The engine's one-shot stats: memory less inactive page cache (as
    /// `docker stats` shows it) and total CPU time.
    async fn usage(&self) -> Option<crate::orchestrator::Usage> {
        let opts = bollard::query_parameters::StatsOptionsBuilder::default()
            .stream(false)
            .one_shot(true)
            .build();
        let stats = self.docker.stats(&self.id, Some(opts)).next().await?.ok()?;
        let memory = stats.memory_stats.and_then(|m| {
            let inactive = m.stats.as_ref().and_then(|s| {
                s.get("inactive_file")
                    .or_else(|| s.get("total_inactive_file"))
                    .copied()
            });
            m.usage.map(|u| u.saturating_sub(inactive.unwrap_or(0)))
        });
        let cpu = stats
            .cpu_stats
            .and_then(|c| c.cpu_usage)
            .and_then(|c| c.total_usage)
            .map(|ns| ns as f64 / 1e9);
        Some(crate::orchestrator::Usage {
            memory_bytes: memory,
            cpu_seconds: cpu,
        })
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
        let detached = self.detached.load(Ordering::SeqCst);
        if !detached
            && self.exit.borrow().is_none()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            self.kill();
        }
    }
}

/// Removes a container when dropped (in the background): a container run to
/// completion goes however its run ends, cancellation included.
pub struct RemoveOnDrop {
    pub docker: Docker,
    pub id: String,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    use super::*;
    use crate::orchestrator::{Limits, ServiceKey};

    fn spec() -> SandboxSpec {
        SandboxSpec {
            owner: ServiceKey {
                mesh: "acme".into(),
                name: "time".into(),
            },
            role: Role::Server,
            image: Some("meshbox/runner-python:latest".into()),
            argv: vec!["python3".into(), "server.py".into()],
            env: BTreeMap::from([
                ("LANG".to_owned(), "C.UTF-8".to_owned()),
                ("HOME".to_owned(), "/host/home".to_owned()),
                ("PATH".to_owned(), "/host/bin".to_owned()),
            ]),
            workdir: Some(PathBuf::from("/cache/src")),
            limits: Limits {
                memory_mb: Some(128),
                cpus: Some(0.5),
                pids: None,
            },
            mounts: vec![
                Mount {
                    source: MountSource::Volume("meshbox-src-1-python".into()),
                    target: PathBuf::from("/cache"),
                    read_only: true,
                    copy_on_write: true,
                },
                Mount {
                    source: MountSource::Host(PathBuf::from("/srv/data")),
                    target: PathBuf::from("/srv/data"),
                    read_only: false,
                    copy_on_write: false,
                },
            ],
            ..Default::default()
        }
    }

    fn mesh() -> Attachment {
        Attachment::Mesh {
            network: "net-id".into(),
        }
    }

    fn resolved(network: &Attachment) -> Resolved<'_> {
        Resolved {
            instance: "0123abcd",
            network,
            ca_bundle: None,
        }
    }

    fn env_of(body: &ContainerCreateBody) -> HashMap<String, String> {
        body.env
            .iter()
            .flatten()
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    /// The host config of `s`'s server body on `net`.
    fn host_config(s: &SandboxSpec, net: &Attachment) -> HostConfig {
        server_body(s, &resolved(net)).unwrap().host_config.unwrap()
    }

    #[test]
    fn servers_drop_every_capability_and_privilege_gain() {
        let net = mesh();
        let hc = host_config(&spec(), &net);
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(hc.cap_add, None);
        assert_eq!(hc.privileged, None);
        assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        assert_eq!(hc.init, Some(true));
    }

    #[test]
    fn servers_have_a_read_only_root_and_a_tmpfs_home() {
        let net = mesh();
        let body = server_body(&spec(), &resolved(&net)).unwrap();
        let hc = body.host_config.clone().unwrap();
        assert_eq!(hc.readonly_rootfs, Some(true));
        let tmpfs = hc.tmpfs.unwrap();
        assert_eq!(tmpfs.len(), 1);
        assert_eq!(tmpfs["/tmp"], "rw,nosuid,nodev,size=64m");
        let env = env_of(&body);
        assert_eq!(env["HOME"], "/tmp", "the host's HOME is replaced");
        assert_eq!(env["PATH"], CONTAINER_PATH, "the host's PATH is replaced");
        assert_eq!(env["LANG"], "C.UTF-8");
    }

    #[test]
    fn servers_get_memory_without_swap_cpus_and_pids() {
        let net = mesh();
        let hc = host_config(&spec(), &net);
        assert_eq!(hc.memory, Some(128 << 20));
        assert_eq!(hc.memory_swap, Some(128 << 20), "memory-swap equals memory");
        assert_eq!(hc.nano_cpus, Some(500_000_000));
        assert_eq!(hc.pids_limit, Some(256), "default pids limit");

        let mut s = spec();
        s.limits = Limits {
            memory_mb: None,
            cpus: None,
            pids: Some(32),
        };
        let hc = host_config(&s, &net);
        assert_eq!(
            (hc.memory, hc.memory_swap, hc.nano_cpus),
            (None, None, None)
        );
        assert_eq!(hc.pids_limit, Some(32));
    }

    #[test]
    fn servers_run_as_the_sandbox_user_with_stdin_open_and_no_tty() {
        let net = mesh();
        let body = server_body(&spec(), &resolved(&net)).unwrap();
        assert_eq!(body.user.as_deref(), Some("10001"));
        assert_eq!(body.open_stdin, Some(true));
        assert_eq!(body.stdin_once, Some(false));
        assert_eq!(body.tty, Some(false));
        assert_eq!(
            (body.attach_stdin, body.attach_stdout, body.attach_stderr),
            (Some(true), Some(true), Some(true))
        );
        assert_eq!(
            body.cmd,
            Some(vec!["python3".to_owned(), "server.py".to_owned()])
        );
        assert_eq!(body.working_dir.as_deref(), Some("/cache/src"));
        assert_eq!(body.image.as_deref(), Some("meshbox/runner-python:latest"));
    }

    #[test]
    fn an_image_source_keeps_its_own_command_and_workdir_but_not_its_privileges() {
        let net = mesh();
        let mut s = spec();
        s.image = Some("example/server:1".into());
        s.argv.clear();
        s.workdir = None;
        s.mounts.clear();
        let body = server_body(&s, &resolved(&net)).unwrap();
        assert_eq!(body.cmd, None);
        assert_eq!(body.working_dir, None);
        assert_eq!(body.user.as_deref(), Some("10001"));
        let hc = body.host_config.unwrap();
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert_eq!(hc.pids_limit, Some(256));
        let no_image = SandboxSpec {
            image: None,
            ..spec()
        };
        assert_eq!(
            server_body(&no_image, &resolved(&net)).unwrap_err(),
            Unsupported::NoImage
        );
    }

    #[test]
    fn servers_are_labelled_with_owner_instance_and_spec() {
        let net = mesh();
        let s = spec();
        let body = server_body(&s, &resolved(&net)).unwrap();
        let l = body.labels.unwrap();
        assert_eq!(l[labels::MANAGED], "true");
        assert_eq!(l[labels::MESH], "acme");
        assert_eq!(l[labels::SERVICE], "time");
        assert_eq!(l[labels::ROLE], "server");
        assert_eq!(l[labels::INSTANCE], "0123abcd");
        assert_eq!(l[labels::SPEC_HASH], spec_hash(&s));
        let mut other = spec();
        other.argv.push("--verbose".into());
        assert_ne!(spec_hash(&other), spec_hash(&s));
    }

    #[test]
    fn the_network_follows_the_policy() {
        let none = Attachment::None;
        let body = server_body(&spec(), &resolved(&none)).unwrap();
        assert_eq!(
            body.host_config.unwrap().network_mode.as_deref(),
            Some("none")
        );
        assert!(
            !env_of(&server_body(&spec(), &resolved(&none)).unwrap()).contains_key("HTTPS_PROXY")
        );

        let full = mesh();
        let body = server_body(&spec(), &resolved(&full)).unwrap();
        assert_eq!(
            body.host_config.unwrap().network_mode.as_deref(),
            Some("net-id")
        );

        let egress = Attachment::Egress {
            network: "egress-id".into(),
            proxy_url: "http://meshbox-proxy-acme-0123:3128".into(),
        };
        let body = server_body(&spec(), &resolved(&egress)).unwrap();
        let env = env_of(&body);
        for k in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
            assert_eq!(env[k], "http://meshbox-proxy-acme-0123:3128", "{k}");
        }
        assert_eq!(env["NO_PROXY"], "localhost,127.0.0.1");
        assert_eq!(
            body.host_config.unwrap().network_mode.as_deref(),
            Some("egress-id")
        );
    }

    #[test]
    fn volumes_and_host_binds_keep_their_mode() {
        let net = mesh();
        let mounts = host_config(&spec(), &net).mounts.unwrap();
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].typ, Some(MountType::VOLUME));
        assert_eq!(mounts[0].source.as_deref(), Some("meshbox-src-1-python"));
        assert_eq!(mounts[0].target.as_deref(), Some("/cache"));
        assert_eq!(mounts[0].read_only, Some(true));
        assert_eq!(mounts[1].typ, Some(MountType::BIND));
        assert_eq!(mounts[1].source.as_deref(), Some("/srv/data"));
        assert_eq!(mounts[1].target.as_deref(), Some("/srv/data"));
        assert_eq!(mounts[1].read_only, Some(false));
    }

    #[test]
    fn a_ca_bundle_is_mounted_read_only_and_pointed_at() {
        let net = mesh();
        let r = Resolved {
            ca_bundle: Some(Path::new("/etc/corp/bundle.pem")),
            ..resolved(&net)
        };
        for body in [
            server_body(&spec(), &r).unwrap(),
            install_body(&spec(), &r).unwrap(),
        ] {
            let env = env_of(&body);
            for k in CA_VARIABLES {
                assert_eq!(env[k], CA_BUNDLE_TARGET, "{k}");
            }
            let mounts = body.host_config.unwrap().mounts.unwrap();
            let ca = mounts
                .iter()
                .find(|m| m.target.as_deref() == Some(CA_BUNDLE_TARGET))
                .expect("CA mount");
            assert_eq!(ca.typ, Some(MountType::BIND));
            assert_eq!(ca.source.as_deref(), Some("/etc/corp/bundle.pem"));
            assert_eq!(ca.read_only, Some(true));
        }
        let body = server_body(&spec(), &resolved(&net)).unwrap();
        assert!(!env_of(&body).contains_key("SSL_CERT_FILE"));
    }

    #[test]
    fn installs_are_hardened_but_keep_the_default_network() {
        let mut s = spec();
        s.role = Role::Install;
        s.limits = Limits::default();
        let net = Attachment::None;
        let body = install_body(&s, &resolved(&net)).unwrap();
        assert_eq!(body.user.as_deref(), Some("10001"));
        assert_eq!(body.labels.unwrap()[labels::ROLE], "install");
        let hc = body.host_config.unwrap();
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        assert_eq!(hc.init, Some(true));
        assert_eq!(hc.pids_limit, Some(1024));
        assert_eq!(hc.network_mode, None, "installs reach the registries");
        let empty = SandboxSpec {
            argv: Vec::new(),
            ..s
        };
        assert_eq!(
            install_body(&empty, &resolved(&net)).unwrap_err(),
            Unsupported::EmptyCommand
        );
    }

    #[test]
    fn exits_read_codes_signals_and_oom() {
        let st = |code, oom| ContainerState {
            exit_code: Some(code),
            oom_killed: Some(oom),
            ..Default::default()
        };
        assert_eq!(
            exit_reason(&st(1, false)),
            ExitReason {
                code: Some(1),
                signal: None,
                oom_killed: false
            }
        );
        assert_eq!(exit_reason(&st(137, true)).signal, Some(9));
        assert!(exit_reason(&st(137, true)).oom_killed);
    }

    #[test]
    fn adoption_takes_the_running_container_of_the_same_spec() {
        let c = |id: &str, state, hash: &str| ContainerSummary {
            id: Some(id.into()),
            state: Some(state),
            labels: Some(Labels::from([(labels::SPEC_HASH.into(), hash.into())])),
            ..Default::default()
        };
        let list = vec![
            c("exited", ContainerSummaryStateEnum::EXITED, "h"),
            c("other", ContainerSummaryStateEnum::RUNNING, "x"),
            c("mine", ContainerSummaryStateEnum::RUNNING, "h"),
            c("twin", ContainerSummaryStateEnum::RUNNING, "h"),
        ];
        let (adopted, stale) = pick_adoptable(list, "h");
        assert_eq!(adopted.as_deref(), Some("mine"));
        assert_eq!(stale, ["exited", "other", "twin"]);
        let paused = vec![c("p", ContainerSummaryStateEnum::PAUSED, "h")];
        assert_eq!(pick_adoptable(paused, "h").0, None);
    }

    #[test]
    fn memory_never_overflows() {
        assert_eq!(memory_bytes(Some(u64::MAX)), Some(i64::MAX));
        assert_eq!(memory_bytes(None), None);
    }
}
