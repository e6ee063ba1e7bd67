//! Runtime and entry detection for a server's directory.

use std::path::{Component, Path};

use serde_json::Value;

use super::AcquireError;
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

/// The command that starts the server in `dir` with `runtime` (a python
/// server with the directory's own `.venv`, when it has one).
pub fn detect_entry(dir: &Path, runtime: Runtime) -> Result<Vec<String>, AcquireError> {
    detect_entry_in(dir, runtime, None)
}

/// As [`detect_entry`], a python server with the environment `venv` (its
/// dependencies in meshbox's cache) instead of the directory's `.venv`.
pub fn detect_entry_in(
    dir: &Path,
    runtime: Runtime,
    venv: Option<&Path>,
) -> Result<Vec<String>, AcquireError> {
    let no_entry = |hint: String| AcquireError::NoEntry {
        dir: dir.to_path_buf(),
        hint,
    };
    match runtime {
        Runtime::Node | Runtime::Bun => {
            let mut candidates = Vec::new();
            if let Some(pkg) = read_package_json(dir)? {
                if let Some(e) = package_json_entry(&pkg).map_err(|e| no_entry(e.to_string()))? {
                    candidates.push(e);
                }
            }
            candidates.extend(
                [
                    "dist/index.js",
                    "build/index.js",
                    "index.js",
                    "src/index.js",
                ]
                .iter()
                .map(|s| s.to_string()),
            );
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
                    return Ok(match runtime {
                        Runtime::Bun => vec!["bun".into(), "run".into(), c],
                        _ => vec!["node".into(), c],
                    });
                }
            }
            Err(no_entry(
                "no package.json bin/main and none of dist/index.js, build/index.js, index.js, src/index.js exists".into(),
            ))
        }
        Runtime::Python => {
            let venv_bin = venv.map_or_else(|| dir.join(".venv/bin"), |v| v.join("bin"));
            if let Ok(text) = std::fs::read_to_string(dir.join("pyproject.toml")) {
                for script in pyproject_scripts(&text) {
                    let p = venv_bin.join(&script);
                    if inside(&script) && p.is_file() {
                        return Ok(vec![p.to_string_lossy().into_owned()]);
                    }
                }
            }
            let python = if venv_bin.join("python").exists() {
                venv_bin.join("python").to_string_lossy().into_owned()
            } else {
                "python3".into()
            };
            for c in [
                "server.py",
                "main.py",
                "src/server.py",
                "src/main.py",
                "__main__.py",
            ] {
                if dir.join(c).is_file() {
                    return Ok(vec![python, c.into()]);
                }
            }
            Err(no_entry(
                "no pyproject script installed and none of server.py, main.py, src/server.py, src/main.py exists".into(),
            ))
        }
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
        assert!(detect_entry(d.path(), Runtime::Node).is_err());
        std::fs::write(d.path().join("package.json"), r#"{"main":"srv.js"}"#).unwrap();
        std::fs::write(d.path().join("srv.js"), "").unwrap();
        assert_eq!(
            detect_entry(d.path(), Runtime::Node).unwrap(),
            vec!["node", "srv.js"]
        );
    }

    #[test]
    fn python_entry() {
        let d = tempfile::tempdir().unwrap();
        assert!(detect_entry(d.path(), Runtime::Python).is_err());
        std::fs::create_dir(d.path().join("src")).unwrap();
        std::fs::write(d.path().join("src/server.py"), "").unwrap();
        assert_eq!(
            detect_entry(d.path(), Runtime::Python).unwrap(),
            vec!["python3", "src/server.py"]
        );
        assert_eq!(
            pyproject_scripts(
                "[project]\nname='x'\n[project.scripts]\nmcp-x = \"x:main\"\n[tool.y]\nz=1\n"
            ),
            vec!["mcp-x"]
        );
    }
}
