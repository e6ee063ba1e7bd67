//! From a validated spec to a [`SandboxSpec`]: the supervisor asks `acquire`
//! for a launch (running a sandboxed install step through the orchestrator
//! when the backend installs in sandboxes), then assembles the sandbox.
//!
//! The one place a `SandboxSpec` for a server is built, for `serve` and
//! `meshbox run` alike.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::acquire::sandboxed::{Finished, InstallStep, Plan, SandboxedInstalls, CACHE_MOUNT};
use crate::acquire::{
    AcquireError, AcquireRequest, DirPlan, Installer, Launch, Progress, Source, Update,
};
use crate::config::{EnvValue, ServiceSpec};
use crate::environ;
use crate::model::{runner_image, Limits, Runtime, ServiceKey};
use crate::orchestrator::{
    Mount, MountSource, Orchestrator, OrchestratorError, Role, SandboxSpec, Upload,
};
use crate::secrets::SecretPolicy;

use super::StartError;

/// What a start needs besides the spec: where acquisition happens.
pub struct Acquirers<'a> {
    pub installer: &'a Installer,
    pub sandboxed: &'a SandboxedInstalls,
    /// Default budget of one install step.
    pub install_timeout: Duration,
}

/// A spec validated once: the parsed source travels with it, and a `path:`
/// source's entry once it was looked for (none for a stored spec restored
/// while its directory may be missing: looked for at its start).
#[derive(Debug, Clone)]
pub struct Validated {
    pub spec: ServiceSpec,
    pub source: Source,
    pub plan: Option<DirPlan>,
}

/// An acquired source, ready to become a sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub launch: Launch,
    pub image: Option<String>,
    /// The installed source, read-only.
    pub source_mount: Option<Mount>,
    /// Its dependencies in the cache (a `path:` source's), read-only.
    pub deps_mount: Option<Mount>,
}

/// Acquires `v`'s source: an image as it is, a sandboxed install through the
/// orchestrator, or a host install by the installer.
pub async fn acquire(
    orchestrator: &dyn Orchestrator,
    acquirers: &Acquirers<'_>,
    owner: &ServiceKey,
    v: &Validated,
    progress: &Progress,
) -> Result<Prepared, StartError> {
    let caps = orchestrator.capabilities();
    let spec = &v.spec;
    let req = AcquireRequest {
        source: &v.source,
        runtime: spec.runtime,
        command: spec.command.as_deref(),
        args: &spec.args,
        install_env: &spec.install_env,
        install_timeout: Some(
            spec.install_timeout_s
                .map(Duration::from_secs)
                .unwrap_or(acquirers.install_timeout),
        ),
        plan: v.plan.as_ref(),
    };
    if let Source::Image(image) = &v.source {
        let mut argv: Vec<String> = spec.command.clone().unwrap_or_default();
        argv.extend(spec.args.iter().cloned());
        return Ok(Prepared {
            launch: Launch {
                argv,
                workdir: PathBuf::new(),
                runtime: spec.runtime,
                ..Launch::default()
            },
            image: Some(image.clone()),
            source_mount: None,
            deps_mount: None,
        });
    }
    if caps.sandboxed_install {
        return acquire_sandboxed(orchestrator, acquirers, owner, &req, progress).await;
    }
    let launch = acquirers.installer.acquire(&req, None, progress).await?;
    let root = install_root(acquirers.installer.cache_dir(), &launch.workdir);
    let source_mount = Some(Mount {
        source: MountSource::Host(root.clone()),
        target: root,
        read_only: true,
        copy_on_write: true,
    });
    let deps_mount = launch.deps.clone().map(|d| Mount {
        source: MountSource::Host(d.clone()),
        target: d,
        read_only: true,
        copy_on_write: false,
    });
    Ok(Prepared {
        launch,
        image: None,
        source_mount,
        deps_mount,
    })
}

/// What a server must see of its installed source: the whole cache entry
/// (`<cache>/npm/<pkg@version>`, whose `node_modules` hold the entry's
/// dependencies beside it), or the directory itself when it is not cached.
fn install_root(cache: &Path, workdir: &Path) -> PathBuf {
    match workdir.strip_prefix(cache) {
        Ok(rel) if rel.components().count() >= 2 => {
            cache.join(rel.components().take(2).collect::<PathBuf>())
        }
        _ => workdir.to_path_buf(),
    }
}

async fn acquire_sandboxed(
    orchestrator: &dyn Orchestrator,
    acquirers: &Acquirers<'_>,
    owner: &ServiceKey,
    req: &AcquireRequest<'_>,
    progress: &Progress,
) -> Result<Prepared, StartError> {
    let mut runtime: Option<Runtime> = None;
    // At most one change of image: a git source asking for another runtime.
    for n in 1..=2 {
        let step = match acquirers.sandboxed.plan(req, runtime)? {
            Plan::Ready(a) => return Ok(sandboxed_prepared(a)),
            Plan::Install(step) => step,
        };
        progress.update(Update::Step {
            n,
            total: n,
            text: &format!("installing {} in a {} container", req.source, step.runtime),
        });
        let timeout = req.install_timeout.unwrap_or(acquirers.install_timeout);
        let done = orchestrator
            .run_to_completion(install_sandbox(owner, &step), timeout)
            .await
            .map_err(|e| match e {
                OrchestratorError::TimedOut { after, .. } => {
                    StartError::Acquire(AcquireError::InstallTimeout {
                        what: format!("install of {}", req.source),
                        secs: after.as_secs(),
                    })
                }
                other => StartError::Orchestrator(other),
            })?;
        if !done.success() {
            return Err(StartError::Acquire(AcquireError::Install {
                what: format!("install of {}", req.source),
                status: done.exit.to_string(),
                tail: crate::acquire::tail(&done.stderr),
            }));
        }
        match acquirers.sandboxed.finish(&step, &done.stdout)? {
            Finished::Ready(a) => return Ok(sandboxed_prepared(a)),
            Finished::NeedsRuntime(rt) => runtime = Some(rt),
        }
    }
    Err(StartError::Acquire(AcquireError::NoAnswer {
        output: "the install step asked for another runtime twice".into(),
    }))
}

fn sandboxed_prepared(a: crate::acquire::sandboxed::Acquired) -> Prepared {
    Prepared {
        image: Some(runner_image(a.runtime)),
        source_mount: Some(Mount {
            source: MountSource::Volume(a.volume),
            target: PathBuf::from(CACHE_MOUNT),
            read_only: true,
            copy_on_write: true,
        }),
        deps_mount: None,
        launch: a.launch,
    }
}

/// The sandbox of an install step: the runner image, with network, writing
/// the cache volume.
fn install_sandbox(owner: &ServiceKey, step: &InstallStep) -> SandboxSpec {
    SandboxSpec {
        owner: owner.clone(),
        role: Role::Install,
        image: Some(runner_image(step.runtime)),
        argv: step.argv.clone(),
        env: step.env.clone(),
        mounts: vec![Mount {
            source: MountSource::Volume(step.volume.clone()),
            target: PathBuf::from(CACHE_MOUNT),
            read_only: false,
            copy_on_write: false,
        }],
        upload: step
            .upload
            .clone()
            .map(|(from, into, name)| Upload { from, into, name }),
        ..Default::default()
    }
}

/// The server's sandbox: launch, environment, limits, network and mounts.
pub fn server_sandbox(
    owner: &ServiceKey,
    spec: &ServiceSpec,
    prepared: &Prepared,
    mut env: BTreeMap<String, String>,
    home: Option<PathBuf>,
) -> SandboxSpec {
    let runtime = prepared.launch.runtime.or(spec.runtime);
    if matches!(runtime, Some(Runtime::Node | Runtime::Bun)) {
        env.entry("NODE_ENV".to_owned())
            .or_insert_with(|| "production".to_owned());
    }
    if prepared.image.is_some() {
        // Host paths mean nothing in an image (it has its own bundle),
        // unless the spec itself names one.
        for k in environ::CA_FILES {
            if !spec.env.contains_key(*k) {
                env.remove(*k);
            }
        }
    }
    let mut mounts: Vec<Mount> = prepared
        .source_mount
        .iter()
        .chain(&prepared.deps_mount)
        .cloned()
        .collect();
    // What the launch needs (cached deps), under the spec's own env.
    for (k, v) in &prepared.launch.env {
        if !spec.env.contains_key(k) {
            env.insert(k.clone(), v.clone());
        }
    }
    mounts.extend(spec.mounts.iter().map(|m| Mount {
        source: MountSource::Host(m.path.clone()),
        target: m.path.clone(),
        read_only: m.read_only,
        copy_on_write: false,
    }));
    SandboxSpec {
        owner: owner.clone(),
        role: Role::Server,
        image: prepared.image.clone(),
        argv: prepared.launch.argv.clone(),
        env,
        workdir: (!prepared.launch.workdir.as_os_str().is_empty())
            .then(|| prepared.launch.workdir.clone()),
        home,
        limits: Limits {
            memory_mb: spec.memory_mb,
            cpus: spec.cpus,
            pids: spec.pids,
        },
        network: spec.network.clone(),
        mounts,
        upload: None,
    }
}

/// A service's private home under the data dir, created.
pub fn server_home(data_dir: &Path, key: &ServiceKey) -> Result<PathBuf, StartError> {
    let home = data_dir.join("home").join(&key.mesh).join(&key.name);
    std::fs::create_dir_all(&home).map_err(|source| StartError::Home {
        path: home.clone(),
        source,
    })?;
    Ok(home)
}

/// The only environment a server gets: PATH, HOME, LANG, the runner's
/// proxy and CA-bundle variables, then the spec's env (which wins). File
/// values are read now, off the runtime, under `secrets`; a refused one fails
/// loudly, naming the key. (`NODE_ENV` is added by [`server_sandbox`], once
/// the runtime is known.)
pub async fn server_env(
    path: &str,
    home: &Path,
    spec_env: &BTreeMap<String, EnvValue>,
    secrets: &SecretPolicy,
) -> Result<BTreeMap<String, String>, StartError> {
    let mut env = BTreeMap::from([
        ("PATH".to_owned(), path.to_owned()),
        ("HOME".to_owned(), home.to_string_lossy().into_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
    ]);
    env.extend(environ::from_runner(environ::PROXY_AND_CA));
    env.extend(crate::secrets::resolve_env(spec_env, secrets).await?);
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::MountSource;

    fn prepared(runtime: Option<Runtime>, image: Option<&str>) -> Prepared {
        Prepared {
            launch: Launch {
                argv: vec!["node".into(), "x.js".into()],
                workdir: PathBuf::from("/src"),
                runtime,
                ..Launch::default()
            },
            image: image.map(str::to_owned),
            deps_mount: None,
            source_mount: Some(Mount {
                source: MountSource::Host(PathBuf::from("/src")),
                target: PathBuf::from("/src"),
                read_only: true,
                copy_on_write: true,
            }),
        }
    }

    #[tokio::test]
    async fn server_env_is_curated_and_the_spec_wins() {
        let d = tempfile::tempdir().unwrap();
        let secrets = d.path().join("secrets");
        std::fs::create_dir(&secrets).unwrap();
        std::fs::write(secrets.join("key"), "from-file\n").unwrap();
        let spec_env = BTreeMap::from([
            ("LANG".to_owned(), EnvValue::Literal("de_DE.UTF-8".into())),
            (
                "API_KEY".to_owned(),
                EnvValue::File {
                    file: secrets.join("key"),
                },
            ),
        ]);
        let policy = SecretPolicy::Dirs(vec![secrets.clone()]);
        let env = server_env("/bin", d.path(), &spec_env, &policy)
            .await
            .unwrap();
        assert_eq!(env["PATH"], "/bin");
        assert_eq!(env["HOME"], d.path().to_string_lossy());
        assert_eq!(env["LANG"], "de_DE.UTF-8");
        assert_eq!(env["API_KEY"], "from-file");
        // Nothing of the runner's own beyond the curated lists.
        for k in env.keys() {
            assert!(
                ["PATH", "HOME", "LANG", "API_KEY"].contains(&k.as_str())
                    || environ::PROXY_AND_CA
                        .iter()
                        .any(|l| l.contains(&k.as_str())),
                "{k}"
            );
        }
        // A refused secret names its key.
        let bad = BTreeMap::from([(
            "TOKEN".to_owned(),
            EnvValue::File {
                file: PathBuf::from("/etc/shadow"),
            },
        )]);
        let e = server_env("/bin", d.path(), &bad, &policy)
            .await
            .unwrap_err();
        assert!(crate::error_chain(&e).contains("env `TOKEN`"), "{e}");
    }

    #[test]
    fn node_servers_get_node_env_production_unless_the_spec_says() {
        let key = ServiceKey::default();
        let spec = ServiceSpec::default();
        let env = BTreeMap::from([("PATH".to_owned(), "/bin".to_owned())]);
        let s = server_sandbox(
            &key,
            &spec,
            &prepared(Some(Runtime::Node), None),
            env.clone(),
            None,
        );
        assert_eq!(s.env["NODE_ENV"], "production");
        let s = server_sandbox(
            &key,
            &spec,
            &prepared(Some(Runtime::Python), None),
            env.clone(),
            None,
        );
        assert!(!s.env.contains_key("NODE_ENV"));
        let mut spec = ServiceSpec::default();
        spec.env
            .insert("NODE_ENV".into(), EnvValue::Literal("development".into()));
        let mut given = env.clone();
        given.insert("NODE_ENV".into(), "development".into());
        let s = server_sandbox(
            &key,
            &spec,
            &prepared(Some(Runtime::Node), None),
            given,
            None,
        );
        assert_eq!(s.env["NODE_ENV"], "development");
    }

    #[test]
    fn host_ca_paths_do_not_reach_containers() {
        let key = ServiceKey::default();
        let spec = ServiceSpec::default();
        let env = BTreeMap::from([
            ("SSL_CERT_FILE".to_owned(), "/host/ca.pem".to_owned()),
            ("HTTPS_PROXY".to_owned(), "http://proxy:3128".to_owned()),
        ]);
        let s = server_sandbox(
            &key,
            &spec,
            &prepared(Some(Runtime::Python), Some("img")),
            env.clone(),
            None,
        );
        assert!(!s.env.contains_key("SSL_CERT_FILE"));
        assert_eq!(s.env["HTTPS_PROXY"], "http://proxy:3128");
        let s = server_sandbox(
            &key,
            &spec,
            &prepared(Some(Runtime::Python), None),
            env,
            None,
        );
        assert_eq!(s.env["SSL_CERT_FILE"], "/host/ca.pem");
    }

    #[test]
    fn a_cached_source_is_mounted_with_its_dependencies() {
        let cache = Path::new("/data/cache");
        assert_eq!(
            install_root(cache, Path::new("/data/cache/npm/x@1/node_modules/x")),
            Path::new("/data/cache/npm/x@1")
        );
        assert_eq!(
            install_root(cache, Path::new("/home/me/server")),
            Path::new("/home/me/server")
        );
    }
}
