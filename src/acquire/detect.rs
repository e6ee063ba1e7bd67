//! Runtime and entry detection for a server's directory.

use std::path::{Component, Path};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{AcquireError, Launch};
use crate::model::Runtime;

/// bun lockfile/bunfig → bun, package.json → node, pyproject/requirements/*.py → python.
pub fn detect_runtime(dir: &Path) -> Option<Runtime> {
    let has = |f: &str| dir.join(f).exists();
    if has("bun.lockb") || has("bun.lock") || has("bunfig.toml") {
        Some(Runtime::Bun)
    } else if has("package.json") {
        Some(Runtime::Node)
    } else if has("pyproject.toml") || has("requirements.txt") || has("server.py") || has("main.py")
    {
        Some(Runtime::Python)
    } else {
        None
    }
}

/// A relative path that stays inside its directory.
fn inside(rel: &str) -> bool {
    let p = Path::new(rel);
    !rel.is_empty()
        && p.components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// A package with several bins, none of which meshbox can pick.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("package.json has several bins and none is named like `{base}`: {}; give `command`", bins.join(", "))]
pub(crate) struct AmbiguousBins {
    pub base: String,
    pub bins: Vec<String>,
}

/// The entry from package.json: the `bin` named like the package (its
/// basename for scoped names), else the only `bin`, else the one containing
/// the basename, else an error listing the bins; `main` when there is no `bin`.
pub(crate) fn package_json_entry(pkg: &Value) -> Result<Option<String>, AmbiguousBins> {
    let name = pkg.get("name").and_then(Value::as_str).unwrap_or("");
    let base = name.rsplit('/').next().unwrap_or(name);
    match pkg.get("bin") {
        Some(Value::String(s)) => return Ok(Some(s.clone())),
        Some(Value::Object(bins)) if !bins.is_empty() => {
            if let Some(Value::String(s)) = bins.get(base).or_else(|| bins.get(name)) {
                return Ok(Some(s.clone()));
            }
            if bins.len() == 1 {
                if let Some(Value::String(s)) = bins.values().next() {
                    return Ok(Some(s.clone()));
                }
            }
            // The one containing the basename (the shortest, when several do).
            let mut containing: Vec<(&String, &Value)> = bins
                .iter()
                .filter(|(k, _)| !base.is_empty() && k.contains(base))
                .collect();
            containing.sort_by_key(|(k, _)| k.len());
            match containing.as_slice() {
                [(_, Value::String(s)), ..]
                    if containing.len() == 1 || containing[1].0.len() > containing[0].0.len() =>
                {
                    return Ok(Some(s.clone()));
                }
                _ => {}
            }
            return Err(AmbiguousBins {
                base: base.to_owned(),
                bins: bins.keys().cloned().collect(),
            });
        }
        _ => {}
    }
    Ok(pkg.get("main").and_then(Value::as_str).map(str::to_owned))
}

fn read_package_json(dir: &Path) -> Result<Option<Value>, AcquireError> {
    let path = dir.join("package.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| AcquireError::NoEntry {
                dir: dir.to_path_buf(),
                hint: format!("package.json is not valid JSON: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AcquireError::Read { path, source }),
    }
}

/// `[project.scripts]` names of a pyproject.toml, in order.
pub(crate) fn pyproject_scripts(text: &str) -> Vec<String> {
    let mut in_scripts = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_scripts = line == "[project.scripts]";
            continue;
        }
        if in_scripts {
            if let Some((k, _)) = line.split_once('=') {
                let k = k.trim().trim_matches('"').trim_matches('\'');
                if !k.is_empty() && !k.starts_with('#') {
                    out.push(k.to_owned());
                }
            }
        }
    }
    out
}

/// How a directory's server starts, decided by one look at the directory
/// ([`DirPlan::detect`], at validation or else at preparation) and then
/// resolved against what the install made ([`DirPlan::launch`]) without
/// looking for an entry again. It crosses into an install container as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirPlan {
    pub runtime: Option<Runtime>,
    pub entry: Entry,
}

/// The entry a [`DirPlan`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entry {
    /// The spec's `command`: replaces any entry.
    Command(Vec<String>),
    /// A file of the directory, run by its runtime (`node f`, `bun run f`,
    /// python: the environment's interpreter).
    File(String),
    /// A python project's `[project.scripts]`, which its install puts into
    /// the environment's `bin` (the first one there is run); `fallback`, a
    /// server file of the directory, when the install made none.
    Scripts {
        names: Vec<String>,
        fallback: Option<String>,
    },
    /// Made by the package's `build` script: found in the build's output.
    Built,
}

/// Node and bun entries looked for after package.json's.
const NODE_FILES: &[&str] = &[
    "dist/index.js",
    "build/index.js",
    "index.js",
    "src/index.js",
];
/// Python server files, in order.
const PYTHON_FILES: &[&str] = &[
    "server.py",
    "main.py",
    "src/server.py",
    "src/main.py",
    "__main__.py",
];

#[cfg(test)]
thread_local! {
    /// Looks taken by [`DirPlan::detect`] on this thread, per directory.
    static LOOKS: std::cell::RefCell<std::collections::HashMap<std::path::PathBuf, usize>> =
        Default::default();
}

/// How many times [`DirPlan::detect`] looked at `dir` on this thread.
#[cfg(test)]
pub(crate) fn looks(dir: &Path) -> usize {
    LOOKS.with(|l| l.borrow().get(dir).copied().unwrap_or(0))
}

impl DirPlan {
    /// Looks at `dir` once: its runtime (`runtime`, else detected), and the
    /// spec's `command` or the entry found, or the install that makes one (a
    /// `build` script; a python project's console scripts).
    pub fn detect(
        dir: &Path,
        runtime: Option<Runtime>,
        command: Option<&[String]>,
    ) -> Result<DirPlan, AcquireError> {
        #[cfg(test)]
        LOOKS.with(|l| *l.borrow_mut().entry(dir.to_path_buf()).or_default() += 1);
        if !dir.is_dir() {
            return Err(AcquireError::MissingDir(dir.to_path_buf()));
        }
        let runtime = runtime.or_else(|| detect_runtime(dir));
        let no_entry = |hint: String| AcquireError::NoEntry {
            dir: dir.to_path_buf(),
            hint,
        };
        let entry = match (command, runtime) {
            (Some(cmd), _) => Entry::Command(cmd.to_vec()),
            (None, None) => return Err(no_entry(
                "no package.json, pyproject.toml, requirements.txt or bun lockfile; give `command`"
                    .into(),
            )),
            (None, Some(rt @ (Runtime::Node | Runtime::Bun))) => node_entry(dir, rt)?,
            (None, Some(Runtime::Python)) => python_entry(dir)?,
        };
        Ok(DirPlan { runtime, entry })
    }

    /// The launch in `dir` (the directory looked at, or a build's output
    /// for [`Entry::Built`], which is looked at there), with the python
    /// environment `venv` (else the directory's own `.venv`, else `python3`).
    pub fn launch(
        &self,
        dir: &Path,
        args: &[String],
        venv: Option<&Path>,
    ) -> Result<Launch, AcquireError> {
        let venv_bin = venv.map_or_else(|| dir.join(".venv/bin"), |v| v.join("bin"));
        let python = || {
            let p = venv_bin.join("python");
            if p.exists() {
                p.to_string_lossy().into_owned()
            } else {
                "python3".into()
            }
        };
        let file = |f: &str| -> Vec<String> {
            match self.runtime {
                Some(Runtime::Bun) => vec!["bun".into(), "run".into(), f.into()],
                Some(Runtime::Python) => vec![python(), f.into()],
                _ => vec!["node".into(), f.into()],
            }
        };
        let mut argv = match &self.entry {
            Entry::Command(cmd) => cmd.clone(),
            Entry::File(f) => file(f),
            Entry::Scripts { names, fallback } => {
                match names.iter().map(|n| venv_bin.join(n)).find(|p| p.is_file()) {
                    Some(p) => vec![p.to_string_lossy().into_owned()],
                    None => match fallback {
                        Some(f) => file(f),
                        None => {
                            return Err(AcquireError::NoEntry {
                                dir: dir.to_path_buf(),
                                hint: format!(
                                    "the install made none of its scripts ({})",
                                    names.join(", ")
                                ),
                            })
                        }
                    },
                }
            }
            Entry::Built => {
                let rt = self.runtime.unwrap_or(Runtime::Node);
                let built = DirPlan {
                    runtime: Some(rt),
                    entry: node_entry(dir, rt)?,
                };
                return match built.entry {
                    Entry::Built => Err(AcquireError::NoEntry {
                        dir: dir.to_path_buf(),
                        hint: "the build made no entry".into(),
                    }),
                    _ => built.launch(dir, args, venv),
                };
            }
        };
        argv.extend(args.iter().cloned());
        Ok(Launch {
            argv,
            workdir: dir.to_path_buf(),
            runtime: self.runtime,
            ..Launch::default()
        })
    }
}

/// A node or bun directory's entry: package.json's `bin`/`main`, else the
/// first of [`NODE_FILES`] (bun: and `index.ts`), else its `build` script's.
fn node_entry(dir: &Path, runtime: Runtime) -> Result<Entry, AcquireError> {
    let no_entry = |hint: String| AcquireError::NoEntry {
        dir: dir.to_path_buf(),
        hint,
    };
    let pkg = read_package_json(dir)?;
    let mut candidates = Vec::new();
    if let Some(pkg) = &pkg {
        if let Some(e) = package_json_entry(pkg).map_err(|e| no_entry(e.to_string()))? {
            candidates.push(e);
        }
    }
    candidates.extend(NODE_FILES.iter().map(|s| s.to_string()));
    if runtime == Runtime::Bun {
        candidates.extend(["index.ts", "src/index.ts"].iter().map(|s| s.to_string()));
    }
    for c in candidates {
        if !inside(&c) {
            return Err(no_entry(format!(
                "entry `{c}` points outside the directory"
            )));
        }
        if dir.join(&c).is_file() {
            return Ok(Entry::File(c));
        }
    }
    if pkg.is_some_and(|p| {
        p.pointer("/scripts/build")
            .and_then(Value::as_str)
            .is_some()
    }) {
        return Ok(Entry::Built);
    }
    Err(no_entry(
        "no package.json bin/main and none of dist/index.js, build/index.js, index.js, src/index.js exists".into(),
    ))
}

/// A python directory's entry: its project's console scripts (installed by
/// the install), else the first of [`PYTHON_FILES`].
fn python_entry(dir: &Path) -> Result<Entry, AcquireError> {
    let file = PYTHON_FILES
        .iter()
        .find(|c| dir.join(c).is_file())
        .map(|c| c.to_string());
    let names: Vec<String> = std::fs::read_to_string(dir.join("pyproject.toml"))
        .map(|t| pyproject_scripts(&t))
        .unwrap_or_default()
        .into_iter()
        .filter(|n| inside(n))
        .collect();
    match (names.is_empty(), file) {
        (false, fallback) => Ok(Entry::Scripts { names, fallback }),
        (true, Some(f)) => Ok(Entry::File(f)),
        (true, None) => Err(AcquireError::NoEntry {
            dir: dir.to_path_buf(),
            hint: "no pyproject script and none of server.py, main.py, src/server.py, src/main.py exists".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn runtime_detection() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(detect_runtime(d.path()), None);
        std::fs::write(d.path().join("server.py"), "").unwrap();
        assert_eq!(detect_runtime(d.path()), Some(Runtime::Python));
        std::fs::write(d.path().join("package.json"), "{}").unwrap();
        assert_eq!(detect_runtime(d.path()), Some(Runtime::Node));
        std::fs::write(d.path().join("bunfig.toml"), "").unwrap();
        assert_eq!(detect_runtime(d.path()), Some(Runtime::Bun));
    }

    #[test]
    fn bins() {
        let p = json!({"name": "@s/tool", "bin": {"other": "o.js", "tool": "t.js"}});
        assert_eq!(package_json_entry(&p).unwrap().as_deref(), Some("t.js"));
        let p = json!({"name": "x", "bin": {"only": "o.js"}});
        assert_eq!(package_json_entry(&p).unwrap().as_deref(), Some("o.js"));
        let p = json!({"name": "x", "bin": {"a": "a.js", "b": "b.js"}});
        let e = package_json_entry(&p).unwrap_err().to_string();
        assert!(e.contains("a, b"), "{e}");
        // None named like the package: the one containing its basename.
        let p = json!({"name": "@wonderwhy-er/desktop-commander",
            "bin": {"setup": "s.js", "desktop-commander-server": "d.js"}});
        assert_eq!(package_json_entry(&p).unwrap().as_deref(), Some("d.js"));
        let p = json!({"name": "@s/mcp", "bin": {"mcp-server": "a.js", "mcp-server-cli": "b.js", "z": "z.js"}});
        assert_eq!(package_json_entry(&p).unwrap().as_deref(), Some("a.js"));
        // Two equally close: no guess.
        let p = json!({"name": "@s/mcp", "bin": {"mcp-a": "a.js", "mcp-b": "b.js"}});
        let e = package_json_entry(&p).unwrap_err().to_string();
        assert!(e.contains("mcp-a, mcp-b"), "{e}");
        let p = json!({"name": "x", "bin": "cli.js", "main": "m.js"});
        assert_eq!(package_json_entry(&p).unwrap().as_deref(), Some("cli.js"));
        let p = json!({"name": "x", "main": "m.js"});
        assert_eq!(package_json_entry(&p).unwrap().as_deref(), Some("m.js"));
    }

    #[test]
    fn node_entry_and_escape() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("package.json"),
            r#"{"main":"../../etc/passwd"}"#,
        )
        .unwrap();
        assert!(DirPlan::detect(d.path(), None, None).is_err());
        std::fs::write(d.path().join("package.json"), r#"{"main":"srv.js"}"#).unwrap();
        std::fs::write(d.path().join("srv.js"), "").unwrap();
        let plan = DirPlan::detect(d.path(), None, None).unwrap();
        assert_eq!(plan.entry, Entry::File("srv.js".into()));
        let launch = plan.launch(d.path(), &["-v".into()], None).unwrap();
        assert_eq!(launch.argv, vec!["node", "srv.js", "-v"]);
        assert_eq!(launch.runtime, Some(Runtime::Node));
    }

    #[test]
    fn python_entry() {
        let d = tempfile::tempdir().unwrap();
        assert!(DirPlan::detect(d.path(), Some(Runtime::Python), None).is_err());
        std::fs::create_dir(d.path().join("src")).unwrap();
        std::fs::write(d.path().join("src/server.py"), "").unwrap();
        let plan = DirPlan::detect(d.path(), Some(Runtime::Python), None).unwrap();
        assert_eq!(
            plan.launch(d.path(), &[], None).unwrap().argv,
            vec!["python3", "src/server.py"]
        );
        assert_eq!(
            pyproject_scripts(
                "[project]\nname='x'\n[project.scripts]\nmcp-x = \"x:main\"\n[tool.y]\nz=1\n"
            ),
            vec!["mcp-x"]
        );
    }

    #[test]
    fn a_build_script_or_console_scripts_promise_an_entry_the_install_makes() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("package.json"),
            r#"{"name":"x","scripts":{"build":"tsc"}}"#,
        )
        .unwrap();
        let plan = DirPlan::detect(d.path(), None, None).unwrap();
        assert_eq!(plan.entry, Entry::Built);
        // Resolved in the build's output, where the entry is looked for.
        let out = tempfile::tempdir().unwrap();
        assert!(plan.launch(out.path(), &[], None).is_err(), "no output yet");
        std::fs::create_dir(out.path().join("dist")).unwrap();
        std::fs::write(out.path().join("dist/index.js"), "").unwrap();
        assert_eq!(
            plan.launch(out.path(), &[], None).unwrap().argv,
            vec!["node", "dist/index.js"]
        );

        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("pyproject.toml"),
            "[project]\nname = \"x\"\n[project.scripts]\nx-server = \"x:main\"\n",
        )
        .unwrap();
        let plan = DirPlan::detect(d.path(), None, None).unwrap();
        assert_eq!(
            plan.entry,
            Entry::Scripts {
                names: vec!["x-server".into()],
                fallback: None
            }
        );
        let venv = tempfile::tempdir().unwrap();
        assert!(plan.launch(d.path(), &[], Some(venv.path())).is_err());
        std::fs::create_dir(venv.path().join("bin")).unwrap();
        std::fs::write(venv.path().join("bin/x-server"), "").unwrap();
        assert_eq!(
            plan.launch(d.path(), &[], Some(venv.path())).unwrap().argv,
            vec![venv
                .path()
                .join("bin/x-server")
                .to_string_lossy()
                .into_owned()]
        );
        // Without scripts nor a server file there is nothing to run.
        std::fs::write(d.path().join("pyproject.toml"), "[project]\nname = \"x\"\n").unwrap();
        assert!(DirPlan::detect(d.path(), None, None).is_err());
    }

    #[test]
    fn plans_cross_into_install_containers_as_json() {
        let plan = DirPlan {
            runtime: Some(Runtime::Python),
            entry: Entry::Scripts {
                names: vec!["a".into()],
                fallback: Some("server.py".into()),
            },
        };
        let text = serde_json::to_string(&plan).unwrap();
        assert_eq!(serde_json::from_str::<DirPlan>(&text).unwrap(), plan);
    }
}
