//! Acquiring sources into the cache: npm packages, PyPI requirements, git
//! repositories, and dependency installs for local directories.
//!
//! Every external program runs as a [`step`](super::step): an argv array
//! (never a shell), a curated environment (the runner's proxy, CA and
//! registry settings, the system CA store trusted in addition to each
//! tool's own, the operator's `--install-env`, then the spec's
//! `install_env`), its own process group, the request's install timeout.
//! Installs are keyed by resolved identity (`name@version`, the requirement,
//! the commit sha, a directory and the fingerprint of its manifests), locked
//! per entry across processes, and marked complete only when done, so a
//! second deploy of the same thing downloads nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::detect::{package_json_entry, DirPlan};
use super::step::{self, EntryLock, Step};
use super::{pypi_name, AcquireError, AcquireRequest, Launch, Source};
use crate::model::Runtime;

/// Marker written last into a cache entry: its presence means "complete".
pub(super) const COMPLETE: &str = ".meshbox-complete";
/// One update of an install, for a terminal or a service's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update<'a> {
    /// Step `n` of `total` (both from 1) begins: what it does.
    Step { n: u32, total: u32, text: &'a str },
    /// A line that is not a step of its own (a step's end).
    Line(&'a str),
}

impl<'a> Update<'a> {
    pub fn text(&self) -> &'a str {
        match self {
            Update::Step { text, .. } | Update::Line(text) => text,
        }
    }
}

/// Where install updates go. Any `Fn(&str)` is one (it gets each update's text).
pub trait ProgressSink: Send + Sync {
    fn update(&self, u: Update<'_>);
}

impl<F: Fn(&str) + Send + Sync> ProgressSink for F {
    fn update(&self, u: Update<'_>) {
        self(u.text())
    }
}

/// Receives install updates, for a terminal or a service's log.
pub type Progress = Arc<dyn ProgressSink>;

pub fn quiet() -> Progress {
    Arc::new(|_: &str| {})
}

pub(super) fn step(progress: &Progress, n: u32, total: u32, text: &str) {
    progress.update(Update::Step { n, total, text });
}

#[derive(Debug, Clone)]
pub struct InstallConfig {
    /// Root of the cache: `npm/`, `pypi/`, `git/`, `path/` live below it.
    pub cache_dir: PathBuf,
    /// Budget of one install step (a clone, an `npm install`, ...) when the
    /// request gives none.
    pub timeout: Duration,
    /// How long an unpinned npm spec (`latest`, `^1`) stays resolved.
    pub resolve_ttl: Duration,
    /// PATH for installers.
    pub path: String,
    /// The operator's extra install environment (`--install-env`, literals);
    /// a spec's `install_env` wins over it.
    pub env: BTreeMap<String, String>,
}

impl InstallConfig {
    pub fn new(cache_dir: PathBuf) -> Self {
        InstallConfig {
            cache_dir,
            timeout: Duration::from_secs(600),
            resolve_ttl: Duration::from_secs(3600),
            path: crate::environ::runner_path(),
            env: BTreeMap::new(),
        }
    }
}

pub struct Installer {
    pub(super) config: InstallConfig,
    env: BTreeMap<String, String>,
}

/// One acquisition's settings: its step budget, environment and progress.
pub(super) struct Cx<'a> {
    pub timeout: Duration,
    pub env: BTreeMap<String, String>,
    pub progress: &'a Progress,
}

pub use crate::model::stable_hash as fnv;

/// The last lines of an installer's output, for error messages.
pub fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(15);
    let mut out = lines[start..].join("\n");
    if out.len() > 4000 {
        let mut cut = out.len() - 4000;
        while !out.is_char_boundary(cut) {
            cut += 1;
        }
        out = out[cut..].to_owned();
    }
    out
}

fn exact_semver(v: &str) -> bool {
    let core = v.split(['-', '+']).next().unwrap_or("");
    let parts: Vec<&str> = core.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

fn is_sha(r: &str) -> bool {
    r.len() == 40 && r.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(super) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AcquireError + '_ {
    move |source| AcquireError::Read {
        path: path.to_path_buf(),
        source,
    }
}

/// The environment every install step starts from: the runner's proxy, CA
/// and registry settings, and the system CA store trusted by each tool in
/// addition to its own (npm through `NODE_EXTRA_CA_CERTS`, which adds; pip
/// through `PIP_CERT`, uv through its native-TLS switch), unless the runner
/// already names a bundle.
fn base_env(config: &InstallConfig, ca_bundle: Option<&str>) -> BTreeMap<String, String> {
    let home = config.cache_dir.join("home");
    let mut env = BTreeMap::from([
        ("PATH".to_owned(), config.path.clone()),
        ("HOME".to_owned(), home.to_string_lossy().into_owned()),
        ("LANG".to_owned(), "C.UTF-8".to_owned()),
        ("GIT_TERMINAL_PROMPT".to_owned(), "0".to_owned()),
        // Only these transports; `ext::` and friends are refused by git itself too.
        ("GIT_ALLOW_PROTOCOL".to_owned(), "https:ssh:file".to_owned()),
        ("GIT_CONFIG_NOSYSTEM".to_owned(), "1".to_owned()),
        ("npm_config_update_notifier".to_owned(), "false".to_owned()),
        ("PIP_DISABLE_PIP_VERSION_CHECK".to_owned(), "1".to_owned()),
    ]);
    env.extend(crate::environ::from_runner(&[
        crate::environ::PROXY,
        crate::environ::CA_FILES,
        crate::environ::REGISTRY,
    ]));
    if let Some(bundle) = ca_bundle {
        // The system bundle holds the public roots as well, so PIP_CERT
        // (which replaces pip's own) loses nothing.
        for k in ["NODE_EXTRA_CA_CERTS", "PIP_CERT"] {
            env.entry(k.to_owned()).or_insert_with(|| bundle.to_owned());
        }
        env.entry("UV_NATIVE_TLS".to_owned())
            .or_insert_with(|| "1".to_owned());
    }
    env
}

impl Installer {
    pub fn new(config: InstallConfig) -> Self {
        let env = base_env(&config, crate::environ::system_ca_bundle());
        Installer { config, env }
    }

    pub fn cache_dir(&self) -> &Path {
        &self.config.cache_dir
    }

    /// The environment of `req`'s steps: the base, the operator's extra
    /// install environment, then the spec's (which wins).
    fn step_env(&self, req: &AcquireRequest<'_>) -> BTreeMap<String, String> {
        let mut env = self.env.clone();
        env.extend(self.config.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(req.install_env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env
    }

    /// Locks one cache entry against concurrent installs (other meshbox
    /// processes included), waiting at most one step's budget.
    pub(super) async fn lock(&self, cx: &Cx<'_>, key: &str) -> Result<EntryLock, AcquireError> {
        step::lock_entry(&self.config.cache_dir.join("locks"), key, cx.timeout).await
    }

    /// Runs one install step; its stdout on success, its stderr tail on failure.
    pub(super) async fn run(
        &self,
        cx: &Cx<'_>,
        what: &str,
        argv: &[&str],
        cwd: Option<&Path>,
    ) -> Result<Vec<u8>, AcquireError> {
        let home = self.config.cache_dir.join("home");
        std::fs::create_dir_all(&home).map_err(io_err(&home))?;
        step::run(Step {
            what,
            argv,
            cwd,
            env: &cx.env,
            timeout: cx.timeout,
        })
        .await
    }

    /// Acquires a source and resolves how to start it. With `image_runtime`
    /// (inside an install container of that runtime's image), a `git:` source
    /// without a runtime that needs another image stops after its clone with
    /// [`AcquireError::NeedsRuntime`].
    pub async fn acquire(
        &self,
        req: &AcquireRequest<'_>,
        image_runtime: Option<Runtime>,
        progress: &Progress,
    ) -> Result<Launch, AcquireError> {
        let AcquireRequest {
            source,
            runtime,
            command,
            args,
            plan,
            ..
        } = *req;
        let cx = Cx {
            timeout: req.install_timeout.unwrap_or(self.config.timeout),
            env: self.step_env(req),
            progress,
        };
        match source {
            Source::Path(dir) => self.local(&cx, dir, plan, runtime, command, args).await,
            Source::Npm { name, version } => {
                self.npm(&cx, name, version.as_deref(), runtime, command, args)
                    .await
            }
            Source::Pypi { requirement } => self.pypi(&cx, requirement, command, args).await,
            Source::Git { url, reference } => {
                let dir = self.git(&cx, url, reference.as_deref()).await?;
                let plan = DirPlan::detect(&dir, runtime, command)?;
                if let (Some(image), None) = (image_runtime, runtime) {
                    if let Some(needs) = plan.runtime.filter(|rt| *rt != image) {
                        return Err(AcquireError::NeedsRuntime { needs, image });
                    }
                }
                self.local(&cx, &dir, Some(&plan), runtime, command, args)
                    .await
            }
            Source::Image(_) => Err(AcquireError::Unsupported { kind: "image" }),
        }
    }
    // ---- npm ----------------------------------------------------------------

    async fn npm_resolve(
        &self,
        cx: &Cx<'_>,
        name: &str,
        spec: &str,
    ) -> Result<String, AcquireError> {
        if exact_semver(spec) {
            return Ok(spec.to_owned());
        }
        let alias_dir = self.config.cache_dir.join("npm/.resolved");
        let alias = alias_dir.join(fnv(&format!("{name}@{spec}")));
        if let Ok(meta) = std::fs::metadata(&alias) {
            let fresh = meta
                .modified()
                .ok()
                .and_then(|m| SystemTime::now().duration_since(m).ok())
                .is_some_and(|age| age < self.config.resolve_ttl);
            if fresh {
                if let Ok(v) = std::fs::read_to_string(&alias) {
                    if exact_semver(v.trim()) {
                        return Ok(v.trim().to_owned());
                    }
                }
            }
        }
        let target = format!("{name}@{spec}");
        let out = self
            .run(
                cx,
                &format!("npm view {target}"),
                &["npm", "view", "--json", &target, "version"],
                None,
            )
            .await?;
        let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
        let version = match v {
            Value::String(s) => Some(s),
            Value::Array(a) => a.last().and_then(Value::as_str).map(str::to_owned),
            _ => None,
        }
        .filter(|s| exact_semver(s))
        .ok_or_else(|| AcquireError::Install {
            what: format!("npm view {target}"),
            status: "no version".into(),
            tail: format!("no published version of {name} matches `{spec}`"),
        })?;
        std::fs::create_dir_all(&alias_dir).map_err(io_err(&alias_dir))?;
        // Written aside and renamed: a concurrent reader never sees half of it.
        let part = alias.with_extension(format!("part-{}", std::process::id()));
        std::fs::write(&part, &version).map_err(io_err(&part))?;
        std::fs::rename(&part, &alias).map_err(io_err(&alias))?;
        Ok(version)
    }

    async fn npm(
        &self,
        cx: &Cx<'_>,
        name: &str,
        version: Option<&str>,
        runtime: Option<Runtime>,
        command: Option<&[String]>,
        args: &[String],
    ) -> Result<Launch, AcquireError> {
        let progress = cx.progress;
        let spec = version.unwrap_or("latest");
        let resolved = self.npm_resolve(cx, name, spec).await?;
        let ident = format!("{name}@{resolved}");
        let dir = self
            .config
            .cache_dir
            .join("npm")
            .join(format!("{}@{resolved}", name.replace('/', "+")));
        let _lock = self.lock(cx, &format!("npm:{ident}")).await?;
        if !dir.join(COMPLETE).exists() {
            step(progress, 1, 1, &format!("installing npm {ident}"));
            let tmp = self
                .config
                .cache_dir
                .join("npm")
                .join(format!(".tmp-{}", fnv(&ident)));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
            let tmp_s = tmp.to_string_lossy().into_owned();
            let res = self
                .run(
                    cx,
                    &format!("npm install {ident}"),
                    &[
                        "npm",
                        "install",
                        "--prefix",
                        &tmp_s,
                        "--no-audit",
                        "--no-fund",
                        "--omit=dev",
                        "--no-save",
                        "--no-package-lock",
                        "--loglevel=error",
                        &ident,
                    ],
                    Some(&tmp),
                )
                .await;
            if let Err(e) = res {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            std::fs::write(tmp.join(COMPLETE), &ident).map_err(io_err(&tmp))?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
            progress.update(Update::Line(&format!("installed npm {ident}")));
        }
        let pkg_dir = dir.join("node_modules").join(name);
        if let Some(cmd) = command {
            let mut argv = cmd.to_vec();
            argv.extend(args.iter().cloned());
            return Ok(Launch {
                argv,
                workdir: pkg_dir,
                runtime: runtime.or(Some(Runtime::Node)),
                ..Launch::default()
            });
        }
        let pj = pkg_dir.join("package.json");
        let text = std::fs::read(&pj).map_err(io_err(&pj))?;
        let pkg: Value = serde_json::from_slice(&text).map_err(|e| AcquireError::NoEntry {
            dir: pkg_dir.clone(),
            hint: format!("package.json is not valid JSON: {e}"),
        })?;
        let has_bin = pkg.get("bin").is_some();
        let entry = package_json_entry(&pkg)
            .map_err(|e| AcquireError::NoEntry {
                dir: pkg_dir.clone(),
                hint: e.to_string(),
            })?
            .filter(|_| has_bin)
            .ok_or_else(|| AcquireError::NoEntry {
                dir: pkg_dir.clone(),
                hint: format!("{name} has no `bin` to run; give `command`"),
            })?;
        let entry_path = pkg_dir.join(&entry);
        if !entry_path.starts_with(&pkg_dir) || entry.contains("..") || !entry_path.is_file() {
            return Err(AcquireError::NoEntry {
                dir: pkg_dir,
                hint: format!("bin `{entry}` is missing or outside the package"),
            });
        }
        let mut argv = vec!["node".to_owned(), entry_path.to_string_lossy().into_owned()];
        argv.extend(args.iter().cloned());
        Ok(Launch {
            argv,
            workdir: pkg_dir,
            runtime: Some(Runtime::Node),
            ..Launch::default()
        })
    }

    // ---- PyPI ---------------------------------------------------------------

    /// Creates a venv at `venv` and installs `what` (pip arguments) into it.
    pub(super) async fn venv_install(
        &self,
        cx: &Cx<'_>,
        venv: &Path,
        what: &[&str],
        cwd: Option<&Path>,
    ) -> Result<(), AcquireError> {
        let venv_s = venv.to_string_lossy().into_owned();
        let python = venv.join("bin/python").to_string_lossy().into_owned();
        if which("uv", &self.config.path).is_some() {
            self.run(cx, "uv venv", &["uv", "venv", "--quiet", &venv_s], cwd)
                .await?;
            let mut argv = vec!["uv", "pip", "install", "--quiet", "--python", &python];
            argv.extend_from_slice(what);
            self.run(cx, "uv pip install", &argv, cwd).await?;
        } else {
            self.run(
                cx,
                "python3 -m venv",
                &["python3", "-m", "venv", &venv_s],
                cwd,
            )
            .await?;
            let mut argv = vec![
                python.as_str(),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-input",
                "--disable-pip-version-check",
            ];
            argv.extend_from_slice(what);
            self.run(cx, "pip install", &argv, cwd).await?;
        }
        Ok(())
    }

    async fn pypi(
        &self,
        cx: &Cx<'_>,
        requirement: &str,
        command: Option<&[String]>,
        args: &[String],
    ) -> Result<Launch, AcquireError> {
        let progress = cx.progress;
        let dist = pypi_name(requirement);
        let key = requirement.to_ascii_lowercase();
        let dir = self.config.cache_dir.join("pypi").join(format!(
            "{}-{}",
            dist.to_ascii_lowercase(),
            fnv(&key)
        ));
        let _lock = self.lock(cx, &format!("pypi:{key}")).await?;
        if !dir.join(COMPLETE).exists() {
            step(progress, 1, 1, &format!("installing PyPI {requirement}"));
            // venvs are not relocatable: build in place, mark complete last.
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.parent().expect("has parent")).map_err(io_err(&dir))?;
            if let Err(e) = self.venv_install(cx, &dir, &[requirement], None).await {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
            std::fs::write(dir.join(COMPLETE), requirement).map_err(io_err(&dir))?;
            progress.update(Update::Line(&format!("installed PyPI {requirement}")));
        }
        let mut argv = match command {
            Some(cmd) => cmd.to_vec(),
            None => python_entry(&dir, dist)?,
        };
        argv.extend(args.iter().cloned());
        Ok(Launch {
            argv,
            workdir: dir,
            runtime: Some(Runtime::Python),
            ..Launch::default()
        })
    }

    // ---- git ----------------------------------------------------------------

    /// Clones `url` at `reference` into the cache, keyed by commit sha.
    async fn git(
        &self,
        cx: &Cx<'_>,
        url: &str,
        reference: Option<&str>,
    ) -> Result<PathBuf, AcquireError> {
        let progress = cx.progress;
        let sha = match reference {
            Some(r) if is_sha(r) => r.to_ascii_lowercase(),
            _ => {
                let want = reference.unwrap_or("HEAD");
                let out = self
                    .run(
                        cx,
                        &format!("git ls-remote {url}"),
                        &["git", "ls-remote", "--", url, want],
                        None,
                    )
                    .await?;
                let text = String::from_utf8_lossy(&out);
                // Prefer an exact branch/tag match, peeled tags (^{}) first.
                let mut best: Option<(u8, String)> = None;
                for line in text.lines() {
                    let Some((sha, name)) = line.split_once('\t') else {
                        continue;
                    };
                    let rank = if name.ends_with("^{}") {
                        0
                    } else if name == want || name == format!("refs/heads/{want}") {
                        1
                    } else {
                        2
                    };
                    if is_sha(sha) && best.as_ref().is_none_or(|(r, _)| rank < *r) {
                        best = Some((rank, sha.to_owned()));
                    }
                }
                best.map(|(_, s)| s).ok_or_else(|| AcquireError::Install {
                    what: format!("git ls-remote {url}"),
                    status: "no such ref".into(),
                    tail: format!("`{want}` not found in {url}"),
                })?
            }
        };
        let dir = self.config.cache_dir.join("git").join(&sha);
        let _lock = self.lock(cx, &format!("git:{sha}")).await?;
        if dir.join(".git").exists() {
            return Ok(dir);
        }
        step(progress, 1, 1, &format!("cloning {url} at {}", &sha[..12]));
        let tmp = self
            .config
            .cache_dir
            .join("git")
            .join(format!(".tmp-{sha}"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        let tmp_s = tmp.to_string_lossy().into_owned();
        let steps: Vec<(String, Vec<&str>)> = match reference {
            // A commit: fetch exactly it.
            Some(r) if is_sha(r) => vec![
                ("git init".into(), vec!["git", "init", "--quiet", &tmp_s]),
                (
                    format!("git fetch {url}"),
                    vec![
                        "git",
                        "-C",
                        &tmp_s,
                        "fetch",
                        "--quiet",
                        "--depth",
                        "1",
                        "--no-tags",
                        "--",
                        url,
                        &sha,
                    ],
                ),
                (
                    "git checkout".into(),
                    vec![
                        "git",
                        "-C",
                        &tmp_s,
                        "checkout",
                        "--quiet",
                        "--detach",
                        "FETCH_HEAD",
                    ],
                ),
            ],
            branch => {
                let mut argv = vec!["git", "clone", "--quiet", "--depth", "1", "--no-tags"];
                if let Some(b) = branch {
                    argv.extend(["--branch", b]);
                }
                argv.extend(["--", url, &tmp_s]);
                vec![(format!("git clone {url}"), argv)]
            }
        };
        for (what, argv) in steps {
            if let Err(e) = self.run(cx, &what, &argv, None).await {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        }
        // The ref may have moved since ls-remote: key by what was checked out.
        let head = self
            .run(
                cx,
                "git rev-parse",
                &["git", "-C", &tmp_s, "rev-parse", "HEAD"],
                None,
            )
            .await
            .map(|o| String::from_utf8_lossy(&o).trim().to_owned())
            .unwrap_or_default();
        let dir = if is_sha(&head) && head != sha {
            self.config.cache_dir.join("git").join(&head)
        } else {
            dir
        };
        if dir.join(".git").exists() {
            let _ = std::fs::remove_dir_all(&tmp);
            return Ok(dir);
        }
        std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
        Ok(dir)
    }
}

pub(super) fn which(tool: &str, path: &str) -> Option<PathBuf> {
    path.split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.is_file())
}

/// Normalized distribution name (PEP 503): lowercase, runs of -_. as one `-`.
fn normalize(name: &str) -> String {
    let mut out = String::new();
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// `[console_scripts]` names from an entry_points.txt.
fn console_scripts(text: &str) -> Vec<String> {
    let mut inside = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == "[console_scripts]";
        } else if inside {
            if let Some((k, _)) = line.split_once('=') {
                out.push(k.trim().to_owned());
            }
        }
    }
    out
}

/// The console script named like the distribution, else the only one, else
/// `python -m <module>`; read from the installed dist-info metadata.
pub(super) fn python_entry(venv: &Path, dist: &str) -> Result<Vec<String>, AcquireError> {
    let want = normalize(dist);
    let python = venv.join("bin/python").to_string_lossy().into_owned();
    let mut scripts = Vec::new();
    if let Ok(libs) = std::fs::read_dir(venv.join("lib")) {
        for lib in libs.flatten() {
            let site = lib.path().join("site-packages");
            let Ok(entries) = std::fs::read_dir(&site) else {
                continue;
            };
            for e in entries.flatten() {
                let fname = e.file_name().to_string_lossy().into_owned();
                let Some(stem) = fname.strip_suffix(".dist-info") else {
                    continue;
                };
                let name = stem.rsplit_once('-').map_or(stem, |(n, _)| n);
                if normalize(name) == want {
                    if let Ok(text) = std::fs::read_to_string(e.path().join("entry_points.txt")) {
                        scripts = console_scripts(&text);
                    }
                }
            }
        }
    }
    let pick = scripts
        .iter()
        .find(|s| normalize(s) == want)
        .or(if scripts.len() == 1 {
            scripts.first()
        } else {
            None
        });
    if let Some(script) = pick {
        let p = venv.join("bin").join(script);
        if p.is_file() && !script.contains('/') {
            return Ok(vec![p.to_string_lossy().into_owned()]);
        }
    }
    Ok(vec![python, "-m".into(), want.replace('-', "_")])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert!(exact_semver("1.2.3") && exact_semver("2026.8.31") && exact_semver("1.0.0-rc.1"));
        assert!(!exact_semver("^1.2") && !exact_semver("latest") && !exact_semver("1.2"));
        assert_eq!(normalize("MCP_Server.time"), "mcp-server-time");
        assert_eq!(
            console_scripts(
                "[console_scripts]\nmcp-server-time = mcp_server_time:main\n[gui_scripts]\nx = y"
            ),
            vec!["mcp-server-time"]
        );
        assert_eq!(fnv("a"), fnv("a"));
        assert_ne!(fnv("a"), fnv("b"));
        assert!(is_sha(&"a".repeat(40)) && !is_sha("main"));
        assert_eq!(tail(b"a\n\nb\n"), "a\nb");
    }

    #[test]
    fn installers_trust_the_system_store_unless_the_runner_names_a_bundle() {
        let config = InstallConfig::new(PathBuf::from("/cache"));
        let env = base_env(&config, Some("/etc/ssl/certs/ca-certificates.crt"));
        for k in ["NODE_EXTRA_CA_CERTS", "PIP_CERT"] {
            let want = std::env::var(k)
                .unwrap_or_else(|_| "/etc/ssl/certs/ca-certificates.crt".to_owned());
            assert_eq!(env[k], want, "{k}");
        }
        assert!(env.contains_key("UV_NATIVE_TLS"));
        let env = base_env(&config, None);
        if std::env::var_os("PIP_CERT").is_none() {
            assert!(!env.contains_key("PIP_CERT"));
        }
        assert_eq!(env["HOME"], "/cache/home");
    }

    #[test]
    fn python_entry_falls_back_to_module() {
        let d = tempfile::tempdir().unwrap();
        let argv = python_entry(d.path(), "my-server").unwrap();
        assert_eq!(argv[1..], ["-m".to_owned(), "my_server".to_owned()]);
        let site = d
            .path()
            .join("lib/python3.11/site-packages/my_server-1.0.dist-info");
        std::fs::create_dir_all(&site).unwrap();
        std::fs::write(
            site.join("entry_points.txt"),
            "[console_scripts]\nmy-server = m:main\nother = m:o\n",
        )
        .unwrap();
        std::fs::create_dir_all(d.path().join("bin")).unwrap();
        std::fs::write(d.path().join("bin/my-server"), "").unwrap();
        let argv = python_entry(d.path(), "my_server").unwrap();
        assert!(argv[0].ends_with("bin/my-server"), "{argv:?}");
    }
}
