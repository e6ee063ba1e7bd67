//! Acquisition: parsing source strings, installing what they name, and
//! finding how to start it.
//!
//! This module owns the source grammar (`path:`, `npm:`, `pypi:`, `git:`,
//! `image:`) and every check on it, runtime and entry detection, host installs
//! into the cache ([`Installer`]) and the plan of an install that runs inside
//! a sandbox ([`sandboxed`]), ending in a [`Launch`] (argv and working
//! directory). It never starts a server and knows no backend: the supervisor
//! asks it for a launch and then the orchestrator for a sandbox, and the
//! install container runs this same code (`meshbox install`).

mod detect;
pub mod install;
mod local;
pub mod sandboxed;
mod step;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::model::{shown, Runtime};

#[cfg(test)]
pub(crate) use detect::looks;
pub use detect::{detect_runtime, DirPlan, Entry};
pub use install::{fnv, tail, InstallConfig, Installer, Progress, ProgressSink, Update};

/// What to acquire, as the supervisor (or `meshbox run`, or `meshbox install`
/// inside an install container) asks for it. Parsed once; borrowed.
#[derive(Debug, Clone, Copy)]
pub struct AcquireRequest<'a> {
    pub source: &'a Source,
    pub runtime: Option<Runtime>,
    /// Replaces the detected entry.
    pub command: Option<&'a [String]>,
    pub args: &'a [String],
    /// Extra environment of install steps (literals).
    pub install_env: &'a std::collections::BTreeMap<String, String>,
    /// Budget of one install step; the installer's default when `None`.
    pub install_timeout: Option<std::time::Duration>,
    /// A `path:` source's entry, when it was already detected (at
    /// validation): never looked for again.
    pub plan: Option<&'a DirPlan>,
}

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("invalid source: {0}")]
    Invalid(String),
    #[error("source directory `{}` does not exist or is not a directory", .0.display())]
    MissingDir(PathBuf),
    #[error("no entry point found in `{}`: {hint}", dir.display())]
    NoEntry { dir: PathBuf, hint: String },
    #[error("{kind} sources are not supported by this backend")]
    Unsupported { kind: &'static str },
    #[error("failed to read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} failed ({status}){}", if tail.is_empty() { String::new() } else { format!(":\n{tail}") })]
    Install {
        what: String,
        status: String,
        /// The installer's last stderr lines.
        tail: String,
    },
    #[error("{what} did not finish within {secs}s")]
    InstallTimeout { what: String, secs: u64 },
    #[error("{tool} not found on PATH: {hint}")]
    MissingTool { tool: String, hint: String },
    #[error("the install step gave no launch answer{}", if output.is_empty() { String::new() } else { format!(":\n{output}") })]
    NoAnswer { output: String },
    /// Installing in an image of another runtime than the source needs.
    #[error("source needs the {needs} runtime, not {image}")]
    NeedsRuntime { needs: Runtime, image: Runtime },
}

/// A parsed, validated source string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Path(PathBuf),
    Npm {
        name: String,
        version: Option<String>,
    },
    Pypi {
        requirement: String,
    },
    Git {
        url: String,
        reference: Option<String>,
    },
    Image(String),
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Path(_) => "path",
            Source::Npm { .. } => "npm",
            Source::Pypi { .. } => "pypi",
            Source::Git { .. } => "git",
            Source::Image(_) => "image",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Path(p) => write!(f, "path:{}", p.display()),
            Source::Npm {
                name,
                version: Some(v),
            } => write!(f, "npm:{name}@{v}"),
            Source::Npm {
                name,
                version: None,
            } => write!(f, "npm:{name}"),
            Source::Pypi { requirement } => write!(f, "pypi:{requirement}"),
            Source::Git {
                url,
                reference: Some(r),
            } => write!(f, "git:{url}#{r}"),
            Source::Git {
                url,
                reference: None,
            } => write!(f, "git:{url}"),
            Source::Image(i) => write!(f, "image:{i}"),
        }
    }
}

fn invalid(msg: impl Into<String>) -> AcquireError {
    AcquireError::Invalid(msg.into())
}

fn has_control_or_space(s: &str) -> bool {
    s.chars().any(|c| c.is_control() || c.is_whitespace())
}

impl FromStr for Source {
    type Err = AcquireError;

    fn from_str(s: &str) -> Result<Self, AcquireError> {
        if s.len() > 2048 {
            return Err(invalid("source string is longer than 2048 bytes"));
        }
        if s.contains('\0') {
            return Err(invalid("source string contains a NUL byte"));
        }
        let (kind, rest) = s.split_once(':').ok_or_else(|| {
            invalid("expected one of path:<absolute dir>, npm:<pkg>[@<version>], pypi:<requirement>, git:<url>[#<ref>], image:<ref>")
        })?;
        match kind {
            "path" => parse_path(rest),
            "npm" => parse_npm(rest),
            "pypi" => parse_pypi(rest),
            "git" => parse_git(rest),
            "image" => parse_image(rest),
            other => Err(invalid(format!(
                "unknown source kind `{}` (expected path, npm, pypi, git or image)",
                shown(other, 32)
            ))),
        }
    }
}

fn parse_path(rest: &str) -> Result<Source, AcquireError> {
    let p = Path::new(rest);
    if !p.is_absolute() {
        return Err(invalid("path: sources need an absolute directory"));
    }
    if p.components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(invalid("path: sources may not contain `..`"));
    }
    if rest.chars().any(char::is_control) {
        return Err(invalid("path contains control characters"));
    }
    Ok(Source::Path(p.to_path_buf()))
}

/// npm's own name rules: optional `@scope/`, lowercase URL-safe characters,
/// no leading dot or underscore, at most 214 characters.
fn valid_npm_name(name: &str) -> bool {
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && !p.starts_with('_')
            // Never an option to npm's argv.
            && !p.starts_with('-')
            && p.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'-' | b'.' | b'_' | b'~')
            })
    };
    if name.len() > 214 {
        return false;
    }
    match name.strip_prefix('@') {
        Some(scoped) => match scoped.split_once('/') {
            Some((scope, pkg)) => part_ok(scope) && part_ok(pkg),
            None => false,
        },
        None => part_ok(name),
    }
}

fn valid_version_spec(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && !v.starts_with('-')
        && v.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'.' | b'-' | b'+' | b'_' | b'~' | b'^' | b'*' | b'x')
        })
}

fn parse_npm(rest: &str) -> Result<Source, AcquireError> {
    // `@scope/pkg@1.2.3`: the version separator is the last `@` past index 0.
    let at = rest
        .char_indices()
        .skip(1)
        .filter(|(_, c)| *c == '@')
        .last();
    let (name, version) = match at {
        Some((i, _)) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };
    if !valid_npm_name(name) {
        return Err(invalid(format!(
            "`{}` is not a valid npm package name",
            shown(name, 80)
        )));
    }
    if let Some(v) = version {
        if !valid_version_spec(v) {
            return Err(invalid(format!(
                "`{}` is not a valid npm version",
                shown(v, 80)
            )));
        }
    }
    Ok(Source::Npm {
        name: name.to_owned(),
        version: version.map(str::to_owned),
    })
}

/// The distribution name of a requirement (`mcp-server-time==0.6` → `mcp-server-time`).
pub fn pypi_name(requirement: &str) -> &str {
    let end = requirement
        .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        .unwrap_or(requirement.len());
    &requirement[..end]
}

fn parse_pypi(rest: &str) -> Result<Source, AcquireError> {
    let name = pypi_name(rest);
    let name_ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    let tail = &rest[name.len()..];
    // Optional extras, then an optional version specifier; no markers, urls or spaces.
    let (extras, spec) = match tail.strip_prefix('[') {
        Some(t) => match t.split_once(']') {
            Some((e, s)) => (Some(e), s),
            None => return Err(invalid("pypi: unclosed `[` in extras")),
        },
        None => (None, tail),
    };
    let extras_ok = extras.is_none_or(|e| {
        e.split(',').all(|x| {
            !x.is_empty()
                && x.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        })
    });
    let spec_ok = spec.is_empty()
        || (matches!(spec.as_bytes()[0], b'=' | b'<' | b'>' | b'~' | b'!')
            && spec.bytes().all(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(
                        b,
                        b'=' | b'<' | b'>' | b'~' | b'!' | b'.' | b',' | b'*' | b'+'
                    )
            }));
    if name_ok && extras_ok && spec_ok {
        Ok(Source::Pypi {
            requirement: rest.to_owned(),
        })
    } else {
        Err(invalid(format!(
            "`{}` is not a valid PyPI requirement (name[extras]specifier, e.g. mcp-server-time==0.6.2)",
            shown(rest, 80)
        )))
    }
}

fn valid_git_ref(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= 255
        && !r.starts_with('-')
        && !r.starts_with('/')
        && !r.contains("..")
        && !r.ends_with(".lock")
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/'))
}

fn parse_git(rest: &str) -> Result<Source, AcquireError> {
    let (url, reference) = match rest.rsplit_once('#') {
        Some((u, r)) => (u, Some(r)),
        None => (rest, None),
    };
    if url.is_empty() || url.starts_with('-') {
        return Err(invalid("git: url must not be empty or start with `-`"));
    }
    if has_control_or_space(url) {
        return Err(invalid(
            "git: url must not contain whitespace or control characters",
        ));
    }
    let uri_char = |c: char| c.is_ascii_alphanumeric() || "-._~:/?#[]@!$&'()*+,;=%".contains(c);
    if !url.chars().all(uri_char) {
        return Err(invalid(
            "git: url may only contain URL characters (RFC 3986)",
        ));
    }
    if url.contains("::") {
        return Err(invalid(
            "git: remote helpers (`ext::`, `fd::`, ...) are not allowed",
        ));
    }
    let scheme_ok = ["https://", "ssh://", "file://"].iter().any(|s| {
        url.strip_prefix(s)
            .is_some_and(|tail| !tail.is_empty() && !tail.starts_with('-'))
    }) || is_scp_like(url);
    if !scheme_ok {
        return Err(invalid(
            "git: url must use https://, ssh://, file:// or git@host:path",
        ));
    }
    if let Some(r) = reference {
        if !valid_git_ref(r) {
            return Err(invalid(format!(
                "git: `{}` is not a valid ref (letters, digits, . _ - /; not starting with - or /; no ..)",
                shown(r, 80)
            )));
        }
    }
    Ok(Source::Git {
        url: url.to_owned(),
        reference: reference.map(str::to_owned),
    })
}

/// `git@host:path` (the scp-like form git accepts), with a plain user and host.
fn is_scp_like(url: &str) -> bool {
    let Some((userhost, path)) = url.split_once(':') else {
        return false;
    };
    let Some((user, host)) = userhost.split_once('@') else {
        return false;
    };
    let word = |s: &str| {
        !s.is_empty()
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    };
    word(user) && word(host) && !path.is_empty() && !path.starts_with('-') && !path.starts_with('/')
}

fn parse_image(rest: &str) -> Result<Source, AcquireError> {
    let ok = !rest.is_empty()
        && rest.len() <= 255
        && !rest.starts_with('-')
        && rest.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/' | b':' | b'@')
        });
    if ok {
        Ok(Source::Image(rest.to_owned()))
    } else {
        Err(invalid("image: not a valid image reference"))
    }
}

/// How to start a server: argv and working directory, plus what was detected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Launch {
    pub argv: Vec<String>,
    pub workdir: PathBuf,
    pub runtime: Option<Runtime>,
    /// Environment the launch needs (a `path:` source's cached dependencies:
    /// `NODE_PATH`, ...); the spec's env wins over it.
    pub env: std::collections::BTreeMap<String, String>,
    /// A directory besides `workdir` the server reads: those dependencies.
    pub deps: Option<PathBuf>,
}

/// Paths, sizes and mtimes of a directory's files (skipping `.git`,
/// `node_modules`, `.venv`, `__pycache__`): changes when its content does.
pub fn dir_fingerprint(dir: &Path) -> String {
    let mut acc = String::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = rd.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            if matches!(
                e.file_name().to_str(),
                Some(".git" | "node_modules" | ".venv" | "__pycache__")
            ) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            let mtime = meta
                .modified()
                .ok()
                .and_then(|m| m.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            acc.push_str(&format!("{}|{}|{mtime}\n", e.path().display(), meta.len()));
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    fnv(&acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> Source {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }
    fn bad(s: &str) {
        assert!(s.parse::<Source>().is_err(), "{s:?} accepted");
    }

    #[test]
    fn npm() {
        assert_eq!(
            ok("npm:@modelcontextprotocol/server-everything"),
            Source::Npm {
                name: "@modelcontextprotocol/server-everything".into(),
                version: None
            }
        );
        assert_eq!(
            ok("npm:left-pad@1.3.0"),
            Source::Npm {
                name: "left-pad".into(),
                version: Some("1.3.0".into())
            }
        );
        assert_eq!(
            ok("npm:@a/b@^2"),
            Source::Npm {
                name: "@a/b".into(),
                version: Some("^2".into())
            }
        );
        for s in [
            "npm:../../x",
            "npm:",
            "npm:A",
            "npm:.x",
            "npm:a b",
            "npm:a;rm",
            "npm:@a",
            "npm:a@",
            "npm:a@-x",
            "npm:a@1 2",
        ] {
            bad(s);
        }
    }

    #[test]
    fn pypi() {
        ok("pypi:mcp-server-time");
        ok("pypi:mcp-server-time==0.6.2");
        ok("pypi:mcp[cli]>=1.0,<2");
        for s in [
            "pypi:",
            "pypi:foo; rm -rf /",
            "pypi:-e x",
            "pypi:foo @ http://x",
            "pypi:../x",
            "pypi:a[",
            "pypi:a b",
        ] {
            bad(s);
        }
    }

    #[test]
    fn git() {
        ok("git:https://example.com/a/b.git");
        ok("git:https://example.com/a/b.git#v1.2");
        ok("git:file:///tmp/repo#main");
        ok("git:git@github.com:a/b.git");
        ok("git:ssh://git@host/a");
        for s in [
            "git:ext::sh -c touch% /tmp/pwned",
            "git:--upload-pack=touch /tmp/x",
            "git:https://x/y#--upload-pack=evil",
            "git:https://x/y#a..b",
            "git:http://plain/insecure",
            "git:https://x/ y",
            "git:fd::17",
            "git:/local/path",
            "git:https://-x",
            "git:https://x/y\n",
            "git:https://x/`id`",
            "git:https://x/y|z",
        ] {
            bad(s);
        }
    }

    #[test]
    fn paths_and_kinds() {
        assert_eq!(ok("path:/srv/x"), Source::Path("/srv/x".into()));
        bad("path:relative/dir");
        bad("path:/a/../etc");
        bad("nope:x");
        bad("plain");
        ok("image:ghcr.io/a/b:1");
        bad("image:-x");
    }

    #[test]
    fn display_round_trips() {
        for s in [
            "npm:@a/b@1.0.0",
            "pypi:x==1",
            "git:https://h/r#main",
            "path:/x",
            "image:a:b",
        ] {
            assert_eq!(ok(s).to_string(), s);
        }
    }
}
