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
use crate::acquire::{AcquireError, AcquireRequest, Installer, Launch, Progress, Source};
use crate::config::{EnvValue, ServiceSpec};
use crate::model::{runner_image, Limits, Runtime, ServiceKey};
use crate::orchestrator::{
    Mount, MountSource, Orchestrator, OrchestratorError, Role, SandboxSpec, Upload,
};

use super::StartError;

/// What a start needs besides the spec: where acquisition happens.
pub struct Acquirers<'a> {
    pub installer: &'a Installer,
    pub sandboxed: &'a SandboxedInstalls,
    /// Default budget of one install step.
    pub install_timeout: Duration,
}

/// A spec validated once: the parsed source travels with it.
#[derive(Debug, Clone)]
pub struct Validated {
    pub spec: ServiceSpec,
    pub source: Source,
}

/// An acquired source, ready to become a sandbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub launch: Launch,
    pub image: Option<String>,
    /// The installed source, read-only.
    pub source_mount: Option<Mount>,
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
    };
    if let Source::Image(image) = &v.source {
        let mut argv: Vec<String> = spec.command.clone().unwrap_or_default();
        argv.extend(spec.args.iter().cloned());
        return Ok(Prepared {
            launch: Launch {
                argv,
                workdir: PathBuf::new(),
                runtime: spec.runtime,
            },
            image: Some(image.clone()),
            source_mount: None,
        });
    }
    if caps.sandboxed_install {
        return acquire_sandboxed(orchestrator, acquirers, owner, &req, progress).await;
    }
    let launch = acquirers.installer.acquire(&req, None, progress).await?;
    let source_mount = Some(Mount {
        source: MountSource::Host(launch.workdir.clone()),
        target: launch.workdir.clone(),
        read_only: true,
    });
    Ok(Prepared {
        launch,
        image: None,
        source_mount,
    })
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
    for _ in 0..2 {
        let step = match acquirers.sandboxed.plan(req, runtime)? {
            Plan::Ready(a) => return Ok(sandboxed_prepared(a)),
            Plan::Install(step) => step,
        };
        progress(&format!(
            "installing {} in a {} container",
            req.source, step.runtime
        ));
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
        }),
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
    env: BTreeMap<String, String>,
    home: Option<PathBuf>,
) -> SandboxSpec {
    let mut mounts: Vec<Mount> = prepared.source_mount.iter().cloned().collect();
    mounts.extend(spec.mounts.iter().map(|m| Mount {
        source: MountSource::Host(m.path.clone()),
        target: m.path.clone(),
        read_only: m.read_only,
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

/// The only environment a server gets: PATH, HOME, LANG, and its spec's env.
/// File values are read now; a missing secret fails loudly, naming the key.
pub fn server_env(
    path: &str,
    home: &Path,
    spec_env: &BTreeMap<String, EnvValue>,
) -> Result<BTreeMap<String, String>, StartError> {
    let mut env = BTreeMap::from([
        ("PATH".to_owned(), path.to_owned()),
        ("HOME".to_owned(), home.to_string_lossy().into_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
    ]);
    for (k, v) in spec_env {
        let value = match v {
            EnvValue::Literal(s) => s.clone(),
            EnvValue::File { file } => std::fs::read_to_string(file)
                .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
                .map_err(|source| StartError::Secret {
                    key: k.clone(),
                    source,
                })?,
        };
        env.insert(k.clone(), value);
    }
    Ok(env)
}
