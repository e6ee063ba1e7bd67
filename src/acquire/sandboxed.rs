//! Installs that run inside a sandbox ("install with network, run without").
//!
//! For a backend with sandboxed installs (docker) the supervisor asks this
//! module for a [`Plan`]: either the source is warm (its cache volume was
//! filled by an earlier install and the answer is remembered), or an
//! [`InstallStep`] — the runner image, the `meshbox install` argv, the cache
//! volume and what to upload — which the supervisor hands to the
//! orchestrator to run to completion. [`SandboxedInstalls::finish`] reads the
//! step's answer back into a [`Launch`]. Volume names and answer caching are
//! owned here; running anything is not.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{fnv, AcquireError, AcquireRequest, Launch, Source};
use crate::model::Runtime;

/// Where the cache volume is mounted inside install and server containers.
pub const CACHE_MOUNT: &str = "/cache";
/// Name of a `path:` source's copy inside the cache volume.
const UPLOAD_NAME: &str = "src";

/// What `meshbox install --json` prints as its last stdout line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InstallAnswer {
    Launch {
        argv: Vec<String>,
        workdir: PathBuf,
        runtime: Option<Runtime>,
        /// The launch's own environment (a `path:` source's cached deps).
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        env: BTreeMap<String, String>,
    },
    /// The source turned out to need another runtime's image (a `git:`
    /// source given without `runtime`): nothing was installed but the clone.
    NeedsRuntime { needs_runtime: Runtime },
}

/// An install the orchestrator runs to completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallStep {
    /// Runner image runtime the step runs in.
    pub runtime: Runtime,
    /// The named volume the install writes (mounted at [`CACHE_MOUNT`]).
    pub volume: String,
    pub argv: Vec<String>,
    /// Proxy, CA and registry settings plus the spec's `install_env`.
    pub env: BTreeMap<String, String>,
    /// A `path:` source to copy into the volume before the step starts:
    /// (host directory, directory inside the sandbox, name there).
    pub upload: Option<(PathBuf, PathBuf, String)>,
    answer_file: PathBuf,
}

/// A source acquired into a cache volume: how to start it, where from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub launch: Launch,
    /// Runner image runtime to run it in.
    pub runtime: Runtime,
    /// The cache volume, mounted read-only at [`CACHE_MOUNT`].
    pub volume: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Warm: the volume holds the install and its answer is remembered.
    Ready(Acquired),
    Install(InstallStep),
}

/// What an install step's answer means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    Ready(Acquired),
    /// Plan again with this runtime.
    NeedsRuntime(Runtime),
}

/// Plans sandboxed installs and remembers their answers under `answers`.
#[derive(Debug, Clone)]
pub struct SandboxedInstalls {
    answers: PathBuf,
}

/// `meshbox install`'s variable holding a `path:` source's [`DirPlan`]
/// (JSON), as the host found it.
///
/// [`DirPlan`]: super::DirPlan
pub const PLAN_VAR: &str = "MESHBOX_DIR_PLAN";

/// The runtime a source runs with, as far as it is known before installing
/// (a `path:` source's: as its plan found it).
pub fn runtime_hint(req: &AcquireRequest<'_>) -> Runtime {
    req.runtime.unwrap_or(match req.source {
        Source::Npm { .. } => Runtime::Node,
        Source::Pypi { .. } => Runtime::Python,
        Source::Path(dir) => req
            .plan
            .map_or_else(|| super::detect_runtime(dir), |p| p.runtime)
            .unwrap_or(Runtime::Node),
        // Detected after the clone: the step may answer `NeedsRuntime`.
        Source::Git { .. } | Source::Image(_) => Runtime::Node,
    })
}

impl SandboxedInstalls {
    pub fn new(answers: PathBuf) -> Self {
        SandboxedInstalls { answers }
    }

    /// Plans the acquisition of `req` in `runtime`'s runner image (the hint,
    /// unless an earlier step asked for another).
    pub fn plan(
        &self,
        req: &AcquireRequest<'_>,
        runtime: Option<Runtime>,
    ) -> Result<Plan, AcquireError> {
        let source = req.source;
        if matches!(source, Source::Image(_)) {
            return Err(AcquireError::Unsupported { kind: "image" });
        }
        let explicit = req.runtime.or(runtime);
        let runtime = runtime.unwrap_or_else(|| runtime_hint(req));
        let ident = match source {
            Source::Path(dir) => format!("path:{}", dir.display()),
            other => other.to_string(),
        };
        let volume = format!("meshbox-src-{}-{runtime}", fnv(&ident));
        let key = fnv(&format!(
            "{volume}|{}|{}",
            serde_json::to_string(&req.command).unwrap_or_default(),
            serde_json::to_string(req.args).unwrap_or_default()
        ));
        // A directory is warm while its files are unchanged; a branch may
        // have moved, so git sources always run their (cheap, cached) step.
        let fingerprint = match source {
            Source::Path(dir) => super::dir_fingerprint(dir),
            _ => String::new(),
        };
        let answer_file = self
            .answers
            .join(format!("{volume}.{key}-{fingerprint}.json"));
        if !matches!(source, Source::Git { .. }) {
            if let Some(InstallAnswer::Launch {
                argv,
                workdir,
                runtime: rt,
                env,
            }) = std::fs::read(&answer_file)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                return Ok(Plan::Ready(Acquired {
                    launch: Launch {
                        argv,
                        workdir,
                        runtime: rt.or(Some(runtime)),
                        env,
                        deps: None,
                    },
                    runtime,
                    volume,
                }));
            }
        }
        let (source_arg, upload) = match source {
            Source::Path(dir) => (
                format!("path:{CACHE_MOUNT}/{UPLOAD_NAME}"),
                Some((dir.clone(), PathBuf::from(CACHE_MOUNT), UPLOAD_NAME.into())),
            ),
            other => (other.to_string(), None),
        };
        let mut argv = vec![
            "meshbox".to_owned(),
            "install".to_owned(),
            "--cache".to_owned(),
            CACHE_MOUNT.to_owned(),
            "--image-runtime".to_owned(),
            runtime.to_string(),
        ];
        if let Some(rt) = explicit {
            argv.extend(["--runtime".to_owned(), rt.to_string()]);
        }
        if let Some(c) = req.command {
            argv.push("--command-json".into());
            argv.push(serde_json::to_string(c).unwrap_or_default());
        }
        if let Some(t) = req.install_timeout {
            argv.push("--install-timeout".into());
            argv.push(t.as_secs().max(1).to_string());
        }
        // The installer inside starts its steps from a clean environment.
        for (k, v) in req.install_env {
            argv.push("--install-env".into());
            argv.push(format!("{k}={v}"));
        }
        argv.push(source_arg);
        argv.push("--".into());
        argv.extend(req.args.iter().cloned());
        let mut env = crate::environ::from_runner(&[
            crate::environ::PROXY,
            crate::environ::CA_FILES,
            crate::environ::REGISTRY,
        ]);
        // Host paths mean nothing inside the image: its own bundle is baked in.
        for k in crate::environ::CA_FILES {
            env.remove(*k);
        }
        env.extend(req.install_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let (Source::Path(_), Some(plan)) = (source, req.plan) {
            env.insert(
                PLAN_VAR.to_owned(),
                serde_json::to_string(plan).unwrap_or_default(),
            );
        }
        Ok(Plan::Install(InstallStep {
            runtime,
            volume,
            argv,
            env,
            upload,
            answer_file,
        }))
    }

    /// Reads a finished step's stdout: the launch (remembered for the next
    /// deploy), or the runtime to plan again with.
    pub fn finish(&self, step: &InstallStep, stdout: &[u8]) -> Result<Finished, AcquireError> {
        let text = String::from_utf8_lossy(stdout);
        let last = text
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or("");
        let answer: InstallAnswer =
            serde_json::from_str(last).map_err(|_| AcquireError::NoAnswer {
                output: super::tail(stdout),
            })?;
        match answer {
            InstallAnswer::NeedsRuntime { needs_runtime } => {
                Ok(Finished::NeedsRuntime(needs_runtime))
            }
            InstallAnswer::Launch {
                argv,
                workdir,
                runtime,
                env,
            } => {
                if let Some(dir) = step.answer_file.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let remembered = InstallAnswer::Launch {
                    argv: argv.clone(),
                    workdir: workdir.clone(),
                    runtime,
                    env: env.clone(),
                };
                let _ = std::fs::write(
                    &step.answer_file,
                    serde_json::to_vec(&remembered).unwrap_or_default(),
                );
                Ok(Finished::Ready(Acquired {
                    launch: Launch {
                        argv,
                        workdir,
                        runtime: runtime.or(Some(step.runtime)),
                        env,
                        deps: None,
                    },
                    runtime: step.runtime,
                    volume: step.volume.clone(),
                }))
            }
        }
    }

    /// Forgets every remembered answer that points into `volume` (it was
    /// removed): the next plan installs again.
    pub fn forget(&self, volume: &str) {
        let Ok(entries) = std::fs::read_dir(&self.answers) else {
            return;
        };
        let prefix = format!("{volume}.");
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(
        source: &'a Source,
        args: &'a [String],
        env: &'a BTreeMap<String, String>,
    ) -> AcquireRequest<'a> {
        AcquireRequest {
            source,
            runtime: None,
            command: None,
            args,
            install_env: env,
            install_timeout: None,
            plan: None,
        }
    }

    #[test]
    fn a_path_source_carries_its_plan_into_the_install_container() {
        let d = tempfile::tempdir().unwrap();
        let s = SandboxedInstalls::new(d.path().join("answers"));
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("server.py"), "").unwrap();
        let plan = super::super::DirPlan::detect(src.path(), None, None).unwrap();
        // The host's look decides the image, as it decides the entry.
        std::fs::remove_file(src.path().join("server.py")).unwrap();
        let source = Source::Path(src.path().to_path_buf());
        let env = BTreeMap::new();
        let mut r = req(&source, &[], &env);
        r.plan = Some(&plan);
        let Plan::Install(step) = s.plan(&r, None).unwrap() else {
            panic!("cold source planned as warm")
        };
        assert_eq!(step.runtime, Runtime::Python);
        let sent: super::super::DirPlan = serde_json::from_str(&step.env[PLAN_VAR]).unwrap();
        assert_eq!(sent, plan);
    }

    #[test]
    fn cold_then_warm() {
        let d = tempfile::tempdir().unwrap();
        let s = SandboxedInstalls::new(d.path().to_path_buf());
        let source: Source = "npm:left-pad@1.3.0".parse().unwrap();
        let env = BTreeMap::from([("PUPPETEER_SKIP_DOWNLOAD".to_owned(), "1".to_owned())]);
        let args = vec!["stdio".to_owned()];
        let Plan::Install(step) = s.plan(&req(&source, &args, &env), None).unwrap() else {
            panic!("cold source planned as warm")
        };
        assert_eq!(step.runtime, Runtime::Node);
        assert!(step.volume.starts_with("meshbox-src-"));
        assert_eq!(step.env["PUPPETEER_SKIP_DOWNLOAD"], "1");
        assert!(step
            .argv
            .windows(2)
            .any(|w| w == ["--install-env", "PUPPETEER_SKIP_DOWNLOAD=1"]));
        assert_eq!(step.argv[..2], ["meshbox", "install"]);
        assert_eq!(step.argv.last().unwrap(), "stdio");
        assert!(
            !step.argv.contains(&"--runtime".to_owned()),
            "{:?}",
            step.argv
        );
        let out = br#"installing...
{"argv":["node","/cache/npm/x/bin.js","stdio"],"workdir":"/cache/npm/x","runtime":"node"}
"#;
        let Finished::Ready(a) = s.finish(&step, out).unwrap() else {
            panic!()
        };
        assert_eq!(a.launch.argv[0], "node");
        let Plan::Ready(warm) = s.plan(&req(&source, &args, &env), None).unwrap() else {
            panic!("second plan not warm")
        };
        assert_eq!(warm, a);
        s.forget(&a.volume);
        assert!(matches!(
            s.plan(&req(&source, &args, &env), None).unwrap(),
            Plan::Install(_)
        ));
    }

    #[test]
    fn git_without_runtime_can_ask_for_another_image() {
        let d = tempfile::tempdir().unwrap();
        let s = SandboxedInstalls::new(d.path().to_path_buf());
        let source: Source = "git:https://example.com/x.git".parse().unwrap();
        let env = BTreeMap::new();
        let Plan::Install(step) = s.plan(&req(&source, &[], &env), None).unwrap() else {
            panic!()
        };
        assert_eq!(step.runtime, Runtime::Node);
        let f = s.finish(&step, br#"{"needs_runtime":"python"}"#).unwrap();
        assert_eq!(f, Finished::NeedsRuntime(Runtime::Python));
        let Plan::Install(step) = s
            .plan(&req(&source, &[], &env), Some(Runtime::Python))
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(step.runtime, Runtime::Python);
        assert!(step.argv.windows(2).any(|w| w == ["--runtime", "python"]));
        assert!(s.finish(&step, b"garbage").is_err());
    }
}
