//! Local directories (`path:` sources, and git clones in the cache): their
//! dependencies go into meshbox's cache, never into the directory.
//!
//! A cache entry is keyed by the directory and a fingerprint of its
//! manifests and lockfiles (of all its files, when the install or a build
//! consumes the code itself), so a changed manifest installs again and an
//! unchanged one installs nothing. The user's files — an existing `.venv`,
//! `node_modules`, everything else — are only ever read: node servers run
//! from the directory with `NODE_PATH` and an ES-module resolve hook
//! pointing at the cached `node_modules`; python servers run from the
//! directory with the cached venv's python; a `build` script runs in a copy
//! in the cache, which the server then runs from. A directory that already
//! has its own `node_modules` is used as it is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::install::{io_err, step, Cx, Installer, COMPLETE};
use super::{dir_fingerprint, fnv, AcquireError, DirPlan, Entry, Launch};
use crate::model::Runtime;

/// Files whose content decides a node directory's dependencies.
const NODE_MANIFESTS: &[&str] = &[
    "package.json",
    "package-lock.json",
    "npm-shrinkwrap.json",
    ".npmrc",
    "bun.lock",
    "bun.lockb",
    "bunfig.toml",
];
/// Names never copied into a build copy.
const NOT_COPIED: &[&str] = &[".git", "node_modules", ".venv", "__pycache__"];

/// Registered with `node --import`: ES modules of the directory that import
/// a package it does not have resolve it from the cached `node_modules`
/// (CommonJS finds them through `NODE_PATH`).
const ESM_HOOK: &str = r#"// meshbox: resolve packages from the dependency cache (NODE_PATH).
import * as mod from 'node:module';
import { pathToFileURL } from 'node:url';
const deps = (process.env.NODE_PATH || '').split(':')[0];
if (deps && typeof mod.register === 'function') {
  const parentURL = new URL('../', pathToFileURL(deps + '/')).href;
  const hook = String.raw`
let base;
export function initialize(data) { base = data.parentURL; }
export async function resolve(specifier, context, next) {
  try { return await next(specifier, context); } catch (e) {
    if (e?.code !== 'ERR_MODULE_NOT_FOUND' || /^(\.|\/|[a-zA-Z][a-zA-Z0-9+.-]*:)/.test(specifier)) throw e;
    return next(specifier, { ...context, parentURL: base });
  }
}`;
  mod.register('data:text/javascript,' + encodeURIComponent(hook), { data: { parentURL } });
}
"#;

/// Content hash of the manifests of `dir` that exist (name and bytes).
fn manifest_fingerprint(dir: &Path, names: &[&str]) -> String {
    let mut acc = String::new();
    for n in names {
        if let Ok(bytes) = std::fs::read(dir.join(n)) {
            acc.push_str(n);
            acc.push('\0');
            acc.push_str(&fnv(&String::from_utf8_lossy(&bytes)));
            acc.push_str(&bytes.len().to_string());
            acc.push('\n');
        }
    }
    fnv(&acc)
}

/// `file://` URL of an absolute path, percent-encoding what a URL (and
/// `NODE_OPTIONS`' space splitting) cannot hold.
fn file_url(p: &Path) -> String {
    let mut out = String::from("file://");
    for b in p.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Copies `from` into `to` (regular files, directories and symlinks; not
/// `.git`, `node_modules`, `.venv`, `__pycache__`).
fn copy_tree(from: &Path, to: &Path) -> Result<(), AcquireError> {
    std::fs::create_dir_all(to).map_err(io_err(to))?;
    for e in std::fs::read_dir(from).map_err(io_err(from))? {
        let e = e.map_err(io_err(from))?;
        let name = e.file_name();
        if NOT_COPIED.iter().any(|n| name == *n) {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        let ty = e.file_type().map_err(io_err(&src))?;
        if ty.is_dir() {
            copy_tree(&src, &dst)?;
        } else if ty.is_symlink() {
            let target = std::fs::read_link(&src).map_err(io_err(&src))?;
            std::os::unix::fs::symlink(target, &dst).map_err(io_err(&dst))?;
        } else if ty.is_file() {
            std::fs::copy(&src, &dst).map_err(io_err(&src))?;
        }
    }
    Ok(())
}

impl Installer {
    /// The cache entry for `dir`'s dependencies under fingerprint `fp`.
    fn entry(&self, dir: &Path, kind: &str, fp: &str) -> PathBuf {
        self.config
            .cache_dir
            .join("path")
            .join(format!("{}-{kind}-{fp}", fnv(&dir.to_string_lossy())))
    }

    /// Fills the cache entry `entry` once with `fill` (into a fresh
    /// directory), under the entry's lock; complete only when `fill` was.
    async fn fill_once<F, Fut>(
        &self,
        cx: &Cx<'_>,
        entry: &Path,
        fill: F,
    ) -> Result<(), AcquireError>
    where
        F: FnOnce(PathBuf) -> Fut,
        Fut: std::future::Future<Output = Result<(), AcquireError>>,
    {
        let _lock = self.lock(cx, &entry.to_string_lossy()).await?;
        if entry.join(COMPLETE).exists() {
            return Ok(());
        }
        // Built in place: venvs and node_modules bins are not relocatable.
        let _ = std::fs::remove_dir_all(entry);
        std::fs::create_dir_all(entry).map_err(io_err(entry))?;
        if let Err(e) = fill(entry.to_path_buf()).await {
            let _ = std::fs::remove_dir_all(entry);
            return Err(e);
        }
        std::fs::write(entry.join(COMPLETE), "").map_err(io_err(entry))
    }

    /// Dependencies of a local directory into the cache; how to start it:
    /// by `plan`, looked for in the directory now when there is none yet.
    pub(super) async fn local(
        &self,
        cx: &Cx<'_>,
        dir: &Path,
        plan: Option<&DirPlan>,
        runtime: Option<Runtime>,
        command: Option<&[String]>,
        args: &[String],
    ) -> Result<Launch, AcquireError> {
        let detected;
        let plan = match plan {
            Some(p) => p,
            None => {
                detected = DirPlan::detect(dir, runtime, command)?;
                &detected
            }
        };
        if !dir.is_dir() {
            return Err(AcquireError::MissingDir(dir.to_path_buf()));
        }
        match plan.runtime {
            Some(rt @ (Runtime::Node | Runtime::Bun)) => {
                self.local_node(cx, dir, rt, plan, args).await
            }
            Some(Runtime::Python) => self.local_python(cx, dir, plan, args).await,
            None => plan.launch(dir, args, None),
        }
    }

    /// Installs node dependencies into `entry` from copies of the manifests
    /// in `src` (`dev`: with devDependencies, for a build).
    async fn node_install(
        &self,
        cx: &Cx<'_>,
        src: &Path,
        entry: &Path,
        rt: Runtime,
        dev: bool,
    ) -> Result<(), AcquireError> {
        if src != entry {
            for n in NODE_MANIFESTS {
                let from = src.join(n);
                if from.is_file() {
                    std::fs::copy(&from, entry.join(n)).map_err(io_err(&from))?;
                }
            }
        }
        let has = |f: &str| entry.join(f).exists();
        if rt == Runtime::Bun {
            let mut argv = vec!["bun", "install"];
            if !dev {
                argv.push("--production");
            }
            return self
                .run(cx, "bun install", &argv, Some(entry))
                .await
                .map(drop);
        }
        let (what, mut argv) = if has("package-lock.json") || has("npm-shrinkwrap.json") {
            ("npm ci", vec!["npm", "ci"])
        } else {
            (
                "npm install",
                vec!["npm", "install", "--no-save", "--no-package-lock"],
            )
        };
        argv.extend(["--no-audit", "--no-fund", "--loglevel=error"]);
        if !dev {
            argv.push("--omit=dev");
        }
        self.run(cx, what, &argv, Some(entry)).await.map(drop)
    }

    async fn local_node(
        &self,
        cx: &Cx<'_>,
        dir: &Path,
        rt: Runtime,
        plan: &DirPlan,
        args: &[String],
    ) -> Result<Launch, AcquireError> {
        let pkg: Value = std::fs::read(dir.join("package.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let has = |k: &str| {
            pkg.get(k)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
        };
        if plan.entry == Entry::Built {
            // The build writes its output: it runs in a copy in the cache.
            let entry = self.entry(dir, "build", &dir_fingerprint(dir));
            self.fill_once(cx, &entry, |entry| async move {
                step(
                    cx.progress,
                    1,
                    1,
                    &format!("building {} in the cache", dir.display()),
                );
                copy_tree(dir, &entry)?;
                if has("dependencies") || has("devDependencies") {
                    self.node_install(cx, &entry, &entry, rt, true).await?;
                }
                let runner = if rt == Runtime::Bun { "bun" } else { "npm" };
                self.run(
                    cx,
                    &format!("{runner} run build"),
                    &[runner, "run", "build"],
                    Some(&entry),
                )
                .await
                .map(drop)
            })
            .await?;
            return plan.launch(&entry, args, None);
        }
        let mut launch = plan.launch(dir, args, None)?;
        if !has("dependencies") || dir.join("node_modules").exists() {
            return Ok(launch);
        }
        let entry = self.entry(dir, "node", &manifest_fingerprint(dir, NODE_MANIFESTS));
        self.fill_once(cx, &entry, |entry| async move {
            step(
                cx.progress,
                1,
                1,
                &format!("installing dependencies of {}", dir.display()),
            );
            self.node_install(cx, dir, &entry, rt, false).await
        })
        .await?;
        let hook = self.config.cache_dir.join("path/esm-deps.mjs");
        if std::fs::read_to_string(&hook).ok().as_deref() != Some(ESM_HOOK) {
            let part = hook.with_extension(format!("part-{}", std::process::id()));
            std::fs::write(&part, ESM_HOOK).map_err(io_err(&part))?;
            std::fs::rename(&part, &hook).map_err(io_err(&hook))?;
        }
        let modules = entry.join("node_modules");
        launch.env = BTreeMap::from([
            (
                "NODE_PATH".to_owned(),
                modules.to_string_lossy().into_owned(),
            ),
            (
                "NODE_OPTIONS".to_owned(),
                format!("--import={}", file_url(&hook)),
            ),
        ]);
        launch.deps = Some(self.config.cache_dir.join("path"));
        Ok(launch)
    }

    async fn local_python(
        &self,
        cx: &Cx<'_>,
        dir: &Path,
        plan: &DirPlan,
        args: &[String],
    ) -> Result<Launch, AcquireError> {
        let reqs = dir.join("requirements.txt").is_file();
        let project = dir.join("pyproject.toml").is_file() || dir.join("setup.py").is_file();
        if !reqs && !project {
            return plan.launch(dir, args, None);
        }
        // Requirements: their content decides. A project installs its own
        // code: every file does.
        let fp = if reqs {
            manifest_fingerprint(dir, &["requirements.txt"])
        } else {
            dir_fingerprint(dir)
        };
        let entry = self.entry(dir, "python", &fp);
        let venv = entry.join("venv");
        self.fill_once(cx, &entry, |entry| {
            let venv = venv.clone();
            async move {
                step(
                    cx.progress,
                    1,
                    1,
                    &format!("installing dependencies of {}", dir.display()),
                );
                if reqs {
                    let file = dir.join("requirements.txt");
                    let file = file.to_string_lossy();
                    self.venv_install(cx, &venv, &["-r", &file], Some(dir))
                        .await
                } else {
                    // Built from a copy: build backends write into the tree.
                    let src = entry.join("src");
                    copy_tree(dir, &src)?;
                    let src_s = src.to_string_lossy().into_owned();
                    let r = self.venv_install(cx, &venv, &[&src_s], Some(&entry)).await;
                    let _ = std::fs::remove_dir_all(&src);
                    r
                }
            }
        })
        .await?;
        let mut launch = plan.launch(dir, args, Some(&venv))?;
        launch.deps = Some(entry);
        Ok(launch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_follow_manifest_content_only() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("package.json"),
            r#"{"dependencies":{"a":"1"}}"#,
        )
        .unwrap();
        let a = manifest_fingerprint(d.path(), NODE_MANIFESTS);
        std::fs::write(d.path().join("index.js"), "changed code").unwrap();
        assert_eq!(manifest_fingerprint(d.path(), NODE_MANIFESTS), a);
        std::fs::write(d.path().join("package-lock.json"), "{}").unwrap();
        let b = manifest_fingerprint(d.path(), NODE_MANIFESTS);
        assert_ne!(a, b);
        std::fs::write(
            d.path().join("package.json"),
            r#"{"dependencies":{"a":"2"}}"#,
        )
        .unwrap();
        assert_ne!(manifest_fingerprint(d.path(), NODE_MANIFESTS), b);
    }

    #[test]
    fn file_urls_survive_node_options_splitting() {
        assert_eq!(file_url(Path::new("/a b/c%.mjs")), "file:///a%20b/c%25.mjs");
    }

    #[test]
    fn tree_copies_skip_dependency_dirs() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        std::fs::create_dir_all(src.join("node_modules/x")).unwrap();
        std::fs::create_dir_all(src.join("lib")).unwrap();
        std::fs::write(src.join("lib/a.js"), "a").unwrap();
        std::os::unix::fs::symlink("lib/a.js", src.join("link.js")).unwrap();
        copy_tree(&src, &d.path().join("dst")).unwrap();
        assert_eq!(
            std::fs::read_to_string(d.path().join("dst/link.js")).unwrap(),
            "a"
        );
        assert!(!d.path().join("dst/node_modules").exists());
    }
}
