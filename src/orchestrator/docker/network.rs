//! Networks and egress: each mesh's bridge network, its internal egress
//! network, the egress proxies that are an allowlist's only way out, and
//! keeping sandboxes on the internal network off the host (iptables).
//!
//! Everything here carries the instance label and is found by its labels,
//! never by name alone (a name filter is a substring match, and docker 20.10
//! creates two networks of one name side by side). Creating and removing a
//! mesh's networks and proxies is serialized per mesh inside the backend
//! ([`MeshLocks`]); the caller holds the mesh's lock until its container
//! exists, so a release never pulls a network from under a deploy. Container
//! bodies and install runs are not this module's.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bollard::models::{
    ContainerCreateBody, HostConfig, Network, NetworkConnectRequest, NetworkCreateRequest,
};
use bollard::query_parameters::ListNetworksOptionsBuilder;
use bollard::Docker;
use tracing::{debug, warn};

use super::container::{self, hardened, SANDBOX_USER};
use super::labels;
use super::{engine_err, fnv, translate, What};
use crate::model::{runner_image, NetworkMode, NetworkPolicy, Runtime};
use crate::orchestrator::{OrchestratorError, ServiceKey, Unsupported};

/// Port an egress proxy listens on inside its networks.
const PROXY_PORT: u16 = 3128;
/// Hosts a sandbox reaches without its proxy.
const NO_PROXY: &str = "localhost,127.0.0.1";

/// The network a sandbox joins, resolved to engine ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attachment {
    /// No network at all.
    None,
    /// The mesh's bridge network.
    Mesh { network: String },
    /// The mesh's internal egress network: out only through the proxy.
    Egress { network: String, proxy_url: String },
}

impl Attachment {
    /// Docker's `network_mode` for it.
    pub fn network_mode(&self) -> String {
        match self {
            Attachment::None => "none".to_owned(),
            Attachment::Mesh { network } | Attachment::Egress { network, .. } => network.clone(),
        }
    }

    /// The proxy variables a sandbox on it gets.
    pub fn proxy_env(&self) -> Vec<(String, String)> {
        let Attachment::Egress { proxy_url, .. } = self else {
            return Vec::new();
        };
        let mut env: Vec<(String, String)> =
            ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"]
                .into_iter()
                .map(|k| (k.to_owned(), proxy_url.clone()))
                .collect();
        env.push(("NO_PROXY".into(), NO_PROXY.into()));
        env.push(("no_proxy".into(), NO_PROXY.into()));
        env
    }
}

/// What a network policy needs from the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Needs {
    Nothing,
    /// The mesh's bridge network.
    Mesh,
    /// The egress network and a proxy for this allowlist (sorted, deduplicated).
    Egress {
        allow: Vec<String>,
    },
}

pub fn needs(policy: &NetworkPolicy) -> Needs {
    match policy.effective() {
        NetworkPolicy::Mode(NetworkMode::None) => Needs::Nothing,
        NetworkPolicy::Allow { mut allow } => {
            allow.sort();
            allow.dedup();
            Needs::Egress { allow }
        }
        NetworkPolicy::Mode(NetworkMode::Full) | NetworkPolicy::Unset => Needs::Mesh,
    }
}

/// Which of a mesh's networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The bridge: a way out, and the mesh's services see each other.
    Mesh,
    /// Internal: no route out; its host bridge is cut off from the host.
    Egress,
}

impl Kind {
    fn role(self) -> &'static str {
        match self {
            Kind::Mesh => labels::ROLE_MESH_NETWORK,
            Kind::Egress => labels::ROLE_EGRESS_NETWORK,
        }
    }

    fn internal(self) -> bool {
        self == Kind::Egress
    }
}

/// A network's name: the mesh, then (after a dot, which mesh names never
/// hold) the instance, so instances sharing an engine never share one.
pub fn network_name(mesh: &str, instance: &str, kind: Kind) -> String {
    match kind {
        Kind::Mesh => format!("meshbox-{mesh}.{instance}"),
        Kind::Egress => format!("meshbox-{mesh}.{instance}.egress"),
    }
}

/// The host-side bridge interface of a network (at most 15 bytes).
pub fn host_bridge_name(network: &str) -> String {
    format!("mbx{}", &fnv(network)[..12])
}

/// The egress proxy's container name (also its host name on the networks).
pub fn proxy_name(mesh: &str, instance: &str, allow: &[String]) -> String {
    let id = fnv(&format!("{instance}|{}", allow.join(",")));
    format!("meshbox-proxy-{mesh}-{}", &id[..12])
}

pub fn network_request(mesh: &str, instance: &str, kind: Kind) -> NetworkCreateRequest {
    let name = network_name(mesh, instance, kind);
    NetworkCreateRequest {
        driver: Some("bridge".into()),
        internal: Some(kind.internal()),
        options: kind.internal().then(|| {
            HashMap::from([(
                "com.docker.network.bridge.name".to_owned(),
                host_bridge_name(&name),
            )])
        }),
        labels: Some(labels::of_mesh(instance, mesh, kind.role())),
        name,
        ..Default::default()
    }
}

/// The image egress proxies run (`meshbox proxy`): the server's own when it
/// is a runner image, else the python runner.
pub fn proxy_image(server_image: &str) -> String {
    if server_image.starts_with("meshbox/runner-") {
        server_image.to_owned()
    } else {
        runner_image(Runtime::Python)
    }
}

/// The create body of an egress proxy: `meshbox proxy` for one allowlist,
/// hardened, small, on the internal network (joined to the bridge after).
pub fn proxy_body(
    image: &str,
    allow: &[String],
    instance: &str,
    mesh: &str,
    internal: &str,
) -> ContainerCreateBody {
    let mut cmd = vec![
        "meshbox".to_owned(),
        "proxy".to_owned(),
        "--listen".to_owned(),
        format!("0.0.0.0:{PROXY_PORT}"),
    ];
    for a in allow {
        cmd.push("--allow".into());
        cmd.push(a.clone());
    }
    ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: Some(cmd),
        user: Some(SANDBOX_USER.into()),
        labels: Some(labels::of_mesh(instance, mesh, labels::ROLE_PROXY)),
        host_config: Some(HostConfig {
            network_mode: Some(internal.to_owned()),
            readonly_rootfs: Some(true),
            memory: Some(64 << 20),
            memory_swap: Some(64 << 20),
            pids_limit: Some(64),
            ..hardened()
        }),
        ..Default::default()
    }
}

/// One async lock per mesh, dropped from the map once nobody holds or
/// waits for it.
#[derive(Default)]
pub struct MeshLocks {
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// Holds a mesh's lock; unlocking prunes it.
pub struct MeshGuard<'a> {
    locks: &'a MeshLocks,
    mesh: String,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl MeshLocks {
    pub async fn lock(&self, mesh: &str) -> MeshGuard<'_> {
        let lock = self
            .locks
            .lock()
            .expect("mesh locks poisoned")
            .entry(mesh.to_owned())
            .or_default()
            .clone();
        MeshGuard {
            locks: self,
            mesh: mesh.to_owned(),
            guard: Some(lock.lock_owned().await),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.locks.lock().expect("mesh locks poisoned").len()
    }
}

impl Drop for MeshGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut locks = self.locks.locks.lock().expect("mesh locks poisoned");
        if locks
            .get(&self.mesh)
            .is_some_and(|l| Arc::strong_count(l) == 1)
        {
            locks.remove(&self.mesh);
        }
    }
}

/// The networks of this instance carrying all of `pairs` besides.
async fn list_networks(
    docker: &Docker,
    instance: &str,
    pairs: &[(&str, &str)],
) -> Result<Vec<Network>, OrchestratorError> {
    let mut all = vec![
        (labels::MANAGED, labels::TRUE),
        (labels::INSTANCE, instance),
    ];
    all.extend_from_slice(pairs);
    docker
        .list_networks(Some(
            ListNetworksOptionsBuilder::default()
                .filters(&labels::filter(&all))
                .build(),
        ))
        .await
        .map_err(engine_err("listing networks"))
}

/// Removes a network (and, for an egress network, its host rule).
async fn remove_network(docker: &Docker, n: &Network) {
    let Some(id) = &n.id else { return };
    match docker.remove_network(id).await {
        Ok(()) => {
            if labels::get(n.labels.as_ref(), labels::ROLE) == Some(labels::ROLE_EGRESS_NETWORK) {
                if let Some(name) = &n.name {
                    release_host_isolation(&host_bridge_name(name)).await;
                }
            }
        }
        Err(e) => debug!(network = %id, error = %e, "network not removed"),
    }
}

/// The id of a mesh's network of `kind`, created on demand. Duplicates (left
/// by an older meshbox, which raced on docker's non-unique names) are
/// removed; the oldest is kept. Call with the mesh's lock held.
pub async fn ensure_network(
    docker: &Docker,
    instance: &str,
    mesh: &str,
    kind: Kind,
) -> Result<String, OrchestratorError> {
    let name = network_name(mesh, instance, kind);
    let mut found: Vec<Network> = list_networks(
        docker,
        instance,
        &[(labels::MESH, mesh), (labels::ROLE, kind.role())],
    )
    .await?
    .into_iter()
    .filter(|n| n.name.as_deref() == Some(name.as_str()) && n.id.is_some())
    .collect();
    found.sort_by(|a, b| (&a.created, &a.id).cmp(&(&b.created, &b.id)));
    let id = if found.is_empty() {
        let created = docker
            .create_network(network_request(mesh, instance, kind))
            .await
            .map_err(|e| translate("creating a network", What::Network, &name, e))?;
        created.id
    } else {
        for dup in &found[1..] {
            warn!(network = %name, "removing a duplicate network");
            remove_network(docker, dup).await;
        }
        found[0].id.clone().unwrap_or_default()
    };
    if kind.internal() {
        // Docker's internal networks still reach the host itself (INPUT,
        // not FORWARD): close that too (again after a reboot dropped the
        // rule), or refuse to run the sandbox.
        if let Err(e) = isolate_from_host(&host_bridge_name(&name)).await {
            if found.is_empty() {
                let _ = docker.remove_network(&id).await;
            }
            return Err(e);
        }
    }
    Ok(id)
}

/// The mesh's egress proxy for one allowlist, running on the internal
/// network (where its clients are) and the bridge (its way out): its URL.
/// Call with the mesh's lock held.
async fn ensure_proxy(
    docker: &Docker,
    instance: &str,
    mesh: &str,
    allow: &[String],
    image: &str,
    networks: [&str; 2],
) -> Result<String, OrchestratorError> {
    let name = proxy_name(mesh, instance, allow);
    let url = format!("http://{name}:{PROXY_PORT}");
    if let Ok(info) = docker.inspect_container(&name, None).await {
        let running = info.state.and_then(|s| s.running) == Some(true);
        let on: HashSet<String> = info
            .network_settings
            .and_then(|s| s.networks)
            .unwrap_or_default()
            .into_values()
            .filter_map(|e| e.network_id)
            .collect();
        if running && networks.iter().all(|n| on.contains(*n)) {
            return Ok(url);
        }
        // Stopped, or on networks that were replaced: start afresh.
        container::remove_forced(docker, &name).await;
    }
    let [internal, bridge] = networks;
    let body = proxy_body(image, allow, instance, mesh, internal);
    let id = container::create(docker, &name, body).await?;
    let joined = docker
        .connect_network(
            bridge,
            NetworkConnectRequest {
                container: id.clone(),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| translate("connecting the egress proxy", What::Network, bridge, e));
    let started = match joined {
        Ok(()) => container::start(docker, &id, "starting the egress proxy").await,
        Err(e) => Err(e),
    };
    if let Err(e) = started {
        container::remove_forced(docker, &id).await;
        return Err(e);
    }
    Ok(url)
}

/// Resolves what `policy` needs for a sandbox of `mesh` running `image`:
/// networks created and a proxy started on demand. Call with the mesh's
/// lock held, until the container exists.
pub async fn attach(
    docker: &Docker,
    instance: &str,
    mesh: &str,
    policy: &NetworkPolicy,
    image: &str,
) -> Result<Attachment, OrchestratorError> {
    match needs(policy) {
        Needs::Nothing => Ok(Attachment::None),
        Needs::Mesh => Ok(Attachment::Mesh {
            network: ensure_network(docker, instance, mesh, Kind::Mesh).await?,
        }),
        Needs::Egress { allow } => {
            let internal = ensure_network(docker, instance, mesh, Kind::Egress).await?;
            let bridge = ensure_network(docker, instance, mesh, Kind::Mesh).await?;
            let proxy_url = ensure_proxy(
                docker,
                instance,
                mesh,
                &allow,
                &proxy_image(image),
                [&internal, &bridge],
            )
            .await?;
            Ok(Attachment::Egress {
                network: internal,
                proxy_url,
            })
        }
    }
}

/// Removes a mesh's proxies and networks once no sandbox of this instance
/// is left in it. Call with the mesh's lock held.
pub async fn release(docker: &Docker, instance: &str, mesh: &str) {
    let members = match container::list_labelled(
        docker,
        &[
            (labels::MANAGED, labels::TRUE),
            (labels::INSTANCE, instance),
            (labels::MESH, mesh),
        ],
    )
    .await
    {
        Ok(list) => list,
        Err(e) => {
            warn!(mesh, error = %crate::error_chain(&e), "cannot list the mesh's containers");
            return;
        }
    };
    // Proxies serve the mesh; they do not keep it alive.
    let (proxies, sandboxes): (Vec<_>, Vec<_>) = members
        .into_iter()
        .partition(|c| labels::get(c.labels.as_ref(), labels::ROLE) == Some(labels::ROLE_PROXY));
    if !sandboxes.is_empty() {
        return;
    }
    for p in proxies.into_iter().filter_map(|p| p.id) {
        container::remove_forced(docker, &p).await;
    }
    remove_networks(docker, instance, |mesh_of| mesh_of == Some(mesh)).await;
}

/// Removes this instance's networks whose mesh `drop` says to.
pub async fn remove_networks(docker: &Docker, instance: &str, drop: impl Fn(Option<&str>) -> bool) {
    let networks = match list_networks(docker, instance, &[]).await {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "cannot list networks");
            return;
        }
    };
    for n in networks {
        if drop(labels::get(n.labels.as_ref(), labels::MESH)) {
            remove_network(docker, &n).await;
        }
    }
}

/// The meshes with a service in `keep`.
pub fn kept_meshes(keep: &[ServiceKey]) -> HashSet<&str> {
    keep.iter().map(|k| k.mesh.as_str()).collect()
}

/// Drops everything a bridge's containers send to the host itself.
async fn isolate_from_host(bridge: &str) -> Result<(), OrchestratorError> {
    if iptables("-C", bridge).await || iptables("-I", bridge).await {
        Ok(())
    } else {
        Err(Unsupported::Allowlist {
            reason: "keeping sandboxes off the host needs iptables as root",
        }
        .into())
    }
}

async fn release_host_isolation(bridge: &str) {
    iptables("-D", bridge).await;
}

/// `iptables <op> INPUT -i <bridge> -j DROP`; whether it succeeded.
async fn iptables(op: &str, bridge: &str) -> bool {
    tokio::process::Command::new("iptables")
        .args([op, "INPUT", "-i", bridge, "-j", "DROP"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_need_nothing_the_bridge_or_egress() {
        assert_eq!(
            needs(&NetworkPolicy::Mode(NetworkMode::None)),
            Needs::Nothing
        );
        assert_eq!(needs(&NetworkPolicy::Mode(NetworkMode::Full)), Needs::Mesh);
        assert_eq!(needs(&NetworkPolicy::Unset), Needs::Mesh, "full by default");
        let allow = NetworkPolicy::Allow {
            allow: vec![
                "b.example:443".into(),
                "a.example:443".into(),
                "b.example:443".into(),
            ],
        };
        assert_eq!(
            needs(&allow),
            Needs::Egress {
                allow: vec!["a.example:443".into(), "b.example:443".into()]
            }
        );
    }

    #[test]
    fn names_are_per_instance_and_never_collide_across_meshes() {
        let a = network_name("acme", "0123", Kind::Mesh);
        assert_eq!(a, "meshbox-acme.0123");
        assert_eq!(
            network_name("acme", "0123", Kind::Egress),
            "meshbox-acme.0123.egress"
        );
        assert_ne!(a, network_name("acme", "4567", Kind::Mesh));
        // A mesh named like another's egress network cannot exist: no dots.
        assert!(crate::model::validate_name("mesh", "acme.0123").is_err());
        let allow = vec!["a.example:443".to_owned()];
        let p = proxy_name("acme", "0123", &allow);
        assert!(p.starts_with("meshbox-proxy-acme-"), "{p}");
        assert_ne!(p, proxy_name("acme", "4567", &allow));
        assert_ne!(p, proxy_name("acme", "0123", &["b.example:443".to_owned()]));
        assert!(host_bridge_name(&a).len() <= 15);
    }

    #[test]
    fn network_requests_are_labelled_and_egress_ones_internal() {
        let r = network_request("acme", "0123", Kind::Mesh);
        assert_eq!(r.name, "meshbox-acme.0123");
        assert_eq!(r.internal, Some(false));
        assert_eq!(r.options, None);
        let l = r.labels.unwrap();
        assert_eq!(l[labels::MANAGED], "true");
        assert_eq!(l[labels::INSTANCE], "0123");
        assert_eq!(l[labels::MESH], "acme");
        assert_eq!(l[labels::ROLE], labels::ROLE_MESH_NETWORK);

        let r = network_request("acme", "0123", Kind::Egress);
        assert_eq!(r.internal, Some(true));
        assert_eq!(
            r.options.unwrap()["com.docker.network.bridge.name"],
            host_bridge_name("meshbox-acme.0123.egress")
        );
        assert_eq!(r.labels.unwrap()[labels::ROLE], labels::ROLE_EGRESS_NETWORK);
    }

    #[test]
    fn proxies_are_hardened_labelled_and_on_the_internal_network() {
        let allow = vec!["a.example:443".to_owned(), "b.example:443".to_owned()];
        let body = proxy_body(
            "meshbox/runner-node:latest",
            &allow,
            "0123",
            "acme",
            "net-id",
        );
        assert_eq!(
            body.cmd.unwrap(),
            [
                "meshbox",
                "proxy",
                "--listen",
                "0.0.0.0:3128",
                "--allow",
                "a.example:443",
                "--allow",
                "b.example:443"
            ]
        );
        assert_eq!(body.user.as_deref(), Some("10001"));
        let l = body.labels.unwrap();
        assert_eq!(l[labels::ROLE], labels::ROLE_PROXY);
        assert_eq!(l[labels::INSTANCE], "0123");
        assert_eq!(l[labels::MESH], "acme");
        let hc = body.host_config.unwrap();
        assert_eq!(hc.network_mode.as_deref(), Some("net-id"));
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(hc.security_opt, Some(vec!["no-new-privileges".to_owned()]));
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert_eq!(hc.memory, hc.memory_swap);
        assert_eq!(hc.pids_limit, Some(64));
        assert_eq!(
            proxy_image("meshbox/runner-node:latest"),
            "meshbox/runner-node:latest"
        );
        assert_eq!(
            proxy_image("example/server:1"),
            "meshbox/runner-python:latest"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn mesh_locks_serialize_one_mesh_and_are_pruned() {
        let locks = MeshLocks::default();
        let a = locks.lock("acme").await;
        let other = locks.lock("beta").await;
        assert_eq!(locks.len(), 2);
        let waiting =
            tokio::time::timeout(std::time::Duration::from_millis(50), locks.lock("acme")).await;
        assert!(waiting.is_err(), "a second holder of one mesh");
        drop(a);
        drop(other);
        assert_eq!(locks.len(), 0, "unheld locks are pruned");
        let _again = locks.lock("acme").await;
        assert_eq!(locks.len(), 1);
    }
}
