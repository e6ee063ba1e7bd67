//! The docker backend: one container per server, through bollard.
//!
//! Owns every Docker API call of meshbox's sandboxes, by concern:
//! [`container`] (the hardened create bodies as pure functions, and a
//! container's life as a [`Sandbox`]), [`network`] (per-mesh bridge
//! networks, internal egress networks, egress proxies, host isolation),
//! [`install`] (containers run to completion, cache volumes, uploads),
//! [`labels`] (every label key and set) and [`stream`] (request bodies
//! produced off the async runtime). What to install and where is planned by
//! `acquire`; this module only runs it. Docker errors are translated here
//! (404 → not found, 409 → conflict); no bollard type leaves this module.

mod container;
mod install;
pub mod labels;
mod network;
pub mod stream;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bollard::Docker;
use tracing::{debug, instrument, warn};

use super::{
    Capabilities, Completed, Enforced, Isolation, Layer, Orchestrator, OrchestratorError, Role,
    Sandbox, SandboxSpec, ServiceKey, Unsupported,
};
use crate::model::{runner_image, stable_hash as fnv, RunnerBuild, Runtime};
use container::Resolved;
use network::{Attachment, MeshLocks};

pub use container::{CA_BUNDLE_TARGET, DEFAULT_PIDS, SANDBOX_USER};

#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Host-side state (the instance id).
    pub data_dir: PathBuf,
    /// A complete PEM bundle (the system's CAs plus the operator's own)
    /// mounted read-only into every install and server container, which
    /// then trust it instead of the bundle baked into their image. Reaches
    /// containers of `image:` sources too, which nothing else does.
    pub ca_bundle: Option<PathBuf>,
}

impl DockerConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        DockerConfig {
            data_dir,
            ca_bundle: None,
        }
    }
}

/// The kinds of engine objects errors name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum What {
    Container,
    Image,
    Network,
    Volume,
}

impl What {
    fn as_str(self) -> &'static str {
        match self {
            What::Container => "container",
            What::Image => "image",
            What::Network => "network",
            What::Volume => "volume",
        }
    }
}

/// An engine error, translated: 404 → [`OrchestratorError::NotFound`], 409 →
/// [`OrchestratorError::Conflict`] (both naming `what` and `name`), anything
/// else → [`OrchestratorError::Engine`] naming `op`.
fn translate(
    op: &'static str,
    what: What,
    name: &str,
    e: bollard::errors::Error,
) -> OrchestratorError {
    match &e {
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        } => OrchestratorError::NotFound {
            what: what.as_str(),
            name: name.to_owned(),
        },
        bollard::errors::Error::DockerResponseServerError {
            status_code: 409, ..
        } => OrchestratorError::Conflict {
            what: what.as_str(),
            name: name.to_owned(),
        },
        _ => engine_err(op)(e),
    }
}

/// An engine failure of `op` that names no object.
fn engine_err(op: &'static str) -> impl FnOnce(bollard::errors::Error) -> OrchestratorError {
    move |e| OrchestratorError::Engine {
        op,
        source: Box::new(e),
    }
}

pub struct DockerBackend {
    docker: Docker,
    /// This meshbox's identity (kept in its data dir): it adopts, sweeps and
    /// releases only objects carrying it, never another instance's on the
    /// same engine.
    instance: String,
    api_version: String,
    ca_bundle: Option<PathBuf>,
    /// Serializes creating and removing each mesh's networks and proxies.
    meshes: MeshLocks,
    /// The layers every server container gets from this engine.
    isolation: Isolation,
}

/// The isolation layers of a server container: fixed by its create body
/// (a non-root user, its own pid, mount, ipc, uts and network namespaces,
/// `cap_drop: ALL`, `no-new-privileges`, cgroups), plus seccomp and a user
/// namespace when the engine's security options say it applies them (its
/// default seccomp profile; `userns-remap`). Landlock is no layer of a
/// container: its own root filesystem isolates it.
fn isolation(security_options: &[String]) -> Isolation {
    let has = |name: &str| {
        let want = format!("name={name}");
        security_options
            .iter()
            .any(|o| o.split(',').any(|kv| kv == want))
    };
    let mut expected = vec![
        Layer::Uid,
        Layer::PidNamespace,
        Layer::MountNamespace,
        Layer::IpcNamespace,
        Layer::UtsNamespace,
        Layer::NetworkNamespace,
        Layer::NoCapabilities,
        Layer::NoNewPrivs,
        Layer::Seccomp,
        Layer::Cgroup,
    ];
    if has("userns") {
        expected.push(Layer::UserNamespace);
    }
    let seccomp = has("seccomp");
    Isolation::sort(expected, |l| l != Layer::Seccomp || seccomp)
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

/// The CA bundle as an absolute path to a regular file (a bind mount's
/// source must be both).
fn ca_bundle_path(path: &Path) -> Result<PathBuf, OrchestratorError> {
    let setup = |source| OrchestratorError::Setup {
        step: "reading the container CA bundle",
        source,
    };
    let path = std::fs::canonicalize(path).map_err(setup)?;
    if !std::fs::metadata(&path).map_err(setup)?.is_file() {
        return Err(setup(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("`{}` is not a regular file", path.display()),
        )));
    }
    Ok(path)
}

impl DockerBackend {
    /// Connects to the local engine and negotiates the API version.
    pub async fn connect(config: DockerConfig) -> Result<Self, OrchestratorError> {
        let docker = Docker::connect_with_local_defaults()
            .map_err(engine_err("connecting to the docker engine"))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(engine_err("negotiating the docker API version"))?;
        let version = docker
            .version()
            .await
            .map_err(engine_err("asking the docker engine for its version"))?;
        let security = docker
            .info()
            .await
            .map_err(engine_err(
                "asking the docker engine for its security options",
            ))?
            .security_options
            .unwrap_or_default();
        let instance = instance_id(&config.data_dir)?;
        let ca_bundle = config
            .ca_bundle
            .as_deref()
            .map(ca_bundle_path)
            .transpose()?;
        Ok(DockerBackend {
            docker,
            instance,
            api_version: version.api_version.unwrap_or_default(),
            ca_bundle,
            meshes: MeshLocks::default(),
            isolation: isolation(&security),
        })
    }

    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    pub fn client(&self) -> &Docker {
        &self.docker
    }

    fn resolved<'a>(&'a self, network: &'a Attachment) -> Resolved<'a> {
        Resolved {
            instance: &self.instance,
            network,
            ca_bundle: self.ca_bundle.as_deref(),
        }
    }

    /// Resolves the network, creates the container and lets go of the mesh
    /// only once it exists (a release in between would see an empty mesh).
    async fn create_server(&self, spec: &SandboxSpec) -> Result<String, OrchestratorError> {
        let image = spec.image.clone().ok_or(Unsupported::NoImage)?;
        install::ensure_volumes(&self.docker, &self.instance, spec, false).await?;
        let mesh = &spec.owner.mesh;
        let _mesh = self.meshes.lock(mesh).await;
        let attachment =
            network::attach(&self.docker, &self.instance, mesh, &spec.network, &image).await?;
        let body = container::server_body(spec, &self.resolved(&attachment))?;
        let name = format!(
            "meshbox-{mesh}-{}-{:08x}",
            spec.owner.name,
            fastrand::u32(..)
        );
        container::create(&self.docker, &name, body).await
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

    #[instrument(skip_all, fields(service = %spec.owner))]
    async fn spawn(&self, spec: SandboxSpec) -> Result<Sandbox, OrchestratorError> {
        let enforced = self.check(&spec)?;
        let id = self.create_server(&spec).await?;
        let attached = container::attach_and_start(&self.docker, &id).await?;
        let isolation = self.isolation.clone();
        Ok(container::sandbox(&self.docker, id, attached, enforced, isolation).await)
    }

    #[instrument(skip_all, fields(service = %spec.owner))]
    async fn run_to_completion(
        &self,
        spec: SandboxSpec,
        timeout: Duration,
    ) -> Result<Completed, OrchestratorError> {
        let network = Attachment::None;
        install::run_to_completion(&self.docker, &self.resolved(&network), spec, timeout).await
    }

    /// The mesh's proxies and networks go with its last sandbox.
    #[instrument(skip_all, fields(service = %owner))]
    async fn release(&self, owner: &ServiceKey) {
        let _mesh = self.meshes.lock(&owner.mesh).await;
        network::release(&self.docker, &self.instance, &owner.mesh).await;
    }

    #[instrument(skip_all, fields(service = %spec.owner))]
    async fn adopt(&self, spec: &SandboxSpec) -> Option<Sandbox> {
        let enforced = self.check(spec).ok()?;
        let list = container::list_labelled(
            &self.docker,
            &[
                (labels::MANAGED, labels::TRUE),
                (labels::INSTANCE, &self.instance),
                (labels::MESH, &spec.owner.mesh),
                (labels::SERVICE, &spec.owner.name),
                (labels::ROLE, Role::Server.as_str()),
            ],
        )
        .await
        .ok()?;
        let (adopted, stale) = container::pick_adoptable(list, &container::spec_hash(spec));
        // Stale: another spec, or exited. Replaced by what is deployed now.
        for id in stale {
            container::remove_forced(&self.docker, &id).await;
        }
        let id = adopted?;
        let attached = container::attach(&self.docker, &id).await.ok()?;
        let isolation = self.isolation.clone();
        Some(container::sandbox(&self.docker, id, attached, enforced, isolation).await)
    }

    /// Removes this instance's install containers, its server containers
    /// of services not in `keep`, and the proxies and networks of meshes
    /// with no service in `keep`.
    #[instrument(skip_all)]
    async fn sweep(&self, keep: &[ServiceKey]) {
        let meshes = network::kept_meshes(keep);
        let Ok(list) = container::list_labelled(
            &self.docker,
            &[
                (labels::MANAGED, labels::TRUE),
                (labels::INSTANCE, &self.instance),
            ],
        )
        .await
        else {
            return;
        };
        for c in list {
            let labels = container::labels_of(&c);
            let get = |k: &str| labels.get(k).map(String::as_str).unwrap_or_default();
            let key = ServiceKey {
                mesh: get(labels::MESH).to_owned(),
                name: get(labels::SERVICE).to_owned(),
            };
            let stray = match get(labels::ROLE) {
                labels::ROLE_PROXY => !meshes.contains(key.mesh.as_str()),
                // Never adopted: a run to completion ends with its meshbox.
                r if r == Role::Install.as_str() => true,
                _ => !keep.contains(&key),
            };
            if let (true, Some(id)) = (stray, c.id) {
                debug!(container = %id, "removing a container no stored service needs");
                container::remove_forced(&self.docker, &id).await;
            }
        }
        network::remove_networks(&self.docker, &self.instance, |mesh| {
            !mesh.is_some_and(|m| meshes.contains(m))
        })
        .await;
    }
}

/// Which meshbox each runtime's runner image holds (by its version label),
/// or why that is not known.
pub async fn runner_images(
    backend: &DockerBackend,
) -> Vec<(String, Result<RunnerBuild, OrchestratorError>)> {
    let mut out = Vec::new();
    for rt in [Runtime::Node, Runtime::Python, Runtime::Bun] {
        let image = runner_image(rt);
        let build = match backend.docker.inspect_image(&image).await {
            Ok(info) => Ok(RunnerBuild::of(info.config.and_then(|c| c.labels).as_ref())),
            Err(e) => Err(translate("inspecting an image", What::Image, &image, e)),
        };
        out.push((image, build));
    }
    out
}

/// Logs a warning for each runner image that holds another meshbox than
/// this one (install steps run the meshbox inside the image).
pub async fn warn_of_stale_runner_images(backend: &DockerBackend) {
    for (image, build) in runner_images(backend).await {
        if let Ok(b @ (RunnerBuild::Other(_) | RunnerBuild::Unlabelled)) = build {
            warn!(%image, "runner image {b}");
        }
    }
}

/// What `meshbox doctor` reports about the engine.
pub async fn describe(backend: &DockerBackend) -> Vec<(String, String)> {
    let mut out = vec![("docker API".to_owned(), backend.api_version().to_owned())];
    for (image, build) in runner_images(backend).await {
        let state = match build {
            Ok(b) => b.to_string(),
            Err(OrchestratorError::NotFound { .. }) => "missing (meshbox images build)".to_owned(),
            Err(other) => format!("unknown ({})", crate::error_chain(&other)),
        };
        out.push((image, state));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_error(status_code: u16) -> bollard::errors::Error {
        bollard::errors::Error::DockerResponseServerError {
            status_code,
            message: "engine says no".into(),
        }
    }

    #[test]
    fn container_layers_follow_the_engine_security_options() {
        let i = isolation(&["name=seccomp,profile=default".to_owned()]);
        assert!(i.missing.is_empty(), "{i:?}");
        for l in [
            Layer::Uid,
            Layer::NetworkNamespace,
            Layer::Seccomp,
            Layer::NoNewPrivs,
        ] {
            assert!(i.applied.contains(&l), "{l} not claimed: {i:?}");
        }
        assert!(!i.applied.contains(&Layer::Landlock), "{i:?}");
        assert!(!i.applied.contains(&Layer::UserNamespace), "{i:?}");
        // An engine without seccomp, with userns-remap.
        let i = isolation(&["name=userns".to_owned()]);
        assert_eq!(i.missing, vec![Layer::Seccomp]);
        assert!(i.applied.contains(&Layer::UserNamespace), "{i:?}");
    }

    #[test]
    fn engine_statuses_become_typed_errors() {
        assert!(matches!(
            translate("x", What::Network, "n1", server_error(404)),
            OrchestratorError::NotFound { what: "network", name } if name == "n1"
        ));
        assert!(matches!(
            translate("x", What::Container, "c1", server_error(409)),
            OrchestratorError::Conflict { what: "container", name } if name == "c1"
        ));
        let e = translate(
            "starting the container",
            What::Container,
            "c1",
            server_error(500),
        );
        assert!(matches!(
            e,
            OrchestratorError::Engine {
                op: "starting the container",
                ..
            }
        ));
        assert_eq!(
            crate::error_chain(&e),
            "the container engine failed while starting the container: \
             Docker responded with status code 500: engine says no"
        );
    }

    #[test]
    fn the_instance_id_is_kept_in_the_data_dir() {
        let d = tempfile::tempdir().unwrap();
        let a = instance_id(d.path()).unwrap();
        assert_eq!(a.len(), 16);
        assert_eq!(instance_id(d.path()).unwrap(), a);
        std::fs::write(d.path().join("instance-id"), "not hex!").unwrap();
        assert_ne!(instance_id(d.path()).unwrap(), "not hex!");
    }
}
