//! Secret environment values: `{"file": "/abs/path"}` in a spec's `env`.
//!
//! Owns the rule of DESIGN.md "Secrets": a secret file is accepted only when
//! its path resolves (symlinks followed) inside one of the operator's secret
//! directories ([`SecretPolicy::Dirs`]; `meshbox run` uses
//! [`SecretPolicy::Anywhere`], its user being the operator), is a regular file
//! of at most [`MAX_SECRET_BYTES`], and is read with a bounded read off the
//! async runtime. Opening never follows a last symlink, never blocks on a
//! FIFO or device, and the file type is checked on the opened descriptor
//! before a byte is read. Errors name the key, never the value.
//!
//! Deploy-time validation ([`check_env`]) opens and inspects but reads
//! nothing (a file not there yet passes: the service fails at start and
//! heals when it appears); the value is read when the service starts
//! ([`resolve_env`]).
//! Secret values never reach the store, logs or the API: nothing here logs,
//! and the values live only in the environment handed to the sandbox.
//! Ground floor: imports only `config`.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::{EnvValue, SpecError};

/// Largest secret file accepted.
pub const MAX_SECRET_BYTES: u64 = 64 * 1024;

/// Where secret files may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretPolicy {
    /// Only inside these directories (the daemon's `--secrets-dir`).
    Dirs(Vec<PathBuf>),
    /// Any file the invoking user can read (`meshbox run`: the user is the
    /// operator); still a regular file, still bounded.
    Anywhere,
}

/// Why a secret file is refused. Never carries the file's content.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("secret file is outside the operator's secret directories")]
    OutsideDirs,
    #[error("secret file does not exist")]
    Missing,
    #[error("secret file is not a regular file")]
    NotRegular,
    #[error("secret file is larger than {MAX_SECRET_BYTES} bytes")]
    TooLarge,
    #[error("secret file is not UTF-8 text or contains a NUL byte")]
    NotText,
    #[error("cannot read the secret file")]
    Unreadable(#[source] std::io::Error),
}

/// A refused secret, naming the env key.
#[derive(Debug, thiserror::Error)]
#[error("env `{key}`")]
pub struct SecretError {
    pub key: String,
    #[source]
    pub refusal: Refusal,
}

impl From<SecretError> for SpecError {
    /// A refused secret at deploy time is bad input on the field `env.KEY`.
    fn from(e: SecretError) -> Self {
        SpecError::field(format!("env.{}", e.key), e.refusal.to_string())
    }
}

impl SecretPolicy {
    /// The path `file` resolves to, when the policy allows it.
    fn resolve(&self, file: &Path) -> Result<PathBuf, Refusal> {
        let resolved = std::fs::canonicalize(file);
        let dirs = match self {
            SecretPolicy::Anywhere => {
                return resolved.map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Refusal::Missing,
                    _ => Refusal::Unreadable(e),
                })
            }
            SecretPolicy::Dirs(dirs) => dirs,
        };
        let Ok(real) = resolved else {
            // Say "missing" only where the caller may look: a path outside
            // the directories is refused the same way whether it exists or not.
            return Err(if dirs.iter().any(|d| file.starts_with(d)) {
                Refusal::Missing
            } else {
                Refusal::OutsideDirs
            });
        };
        let inside = dirs
            .iter()
            .any(|d| std::fs::canonicalize(d).is_ok_and(|d| real.starts_with(&d) && real != d));
        if inside {
            Ok(real)
        } else {
            Err(Refusal::OutsideDirs)
        }
    }

    /// Opens an allowed secret file without following a last symlink and
    /// without blocking (FIFOs, devices), then checks what was opened.
    fn open(&self, file: &Path) -> Result<File, Refusal> {
        let real = self.resolve(file)?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&real)
            .map_err(|e| match e.raw_os_error() {
                // The last component turned into a symlink after resolution.
                Some(libc::ELOOP) => Refusal::NotRegular,
                _ if e.kind() == std::io::ErrorKind::NotFound => Refusal::Missing,
                _ => Refusal::Unreadable(e),
            })?;
        let meta = f.metadata().map_err(Refusal::Unreadable)?;
        if !meta.file_type().is_file() {
            return Err(Refusal::NotRegular);
        }
        if meta.len() > MAX_SECRET_BYTES {
            return Err(Refusal::TooLarge);
        }
        Ok(f)
    }

    /// Checks a secret file as a deploy does: allowed, a regular file, small
    /// enough. Reads nothing. A file missing inside the directories passes:
    /// the service fails at start and heals in place once it appears.
    pub fn check(&self, file: &Path) -> Result<(), Refusal> {
        match self.open(file) {
            Ok(_) | Err(Refusal::Missing) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Reads a secret file: at most [`MAX_SECRET_BYTES`], trailing newlines
    /// cut. Blocking: call it off the async runtime.
    pub fn read(&self, file: &Path) -> Result<String, Refusal> {
        let f = self.open(file)?;
        let mut buf = Vec::new();
        f.take(MAX_SECRET_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(Refusal::Unreadable)?;
        if buf.len() as u64 > MAX_SECRET_BYTES {
            // It grew after the check.
            return Err(Refusal::TooLarge);
        }
        let text = String::from_utf8(buf).map_err(|_| Refusal::NotText)?;
        if text.contains('\0') {
            return Err(Refusal::NotText);
        }
        Ok(text.trim_end_matches(['\n', '\r']).to_owned())
    }
}

/// Checks every file value of a spec's env (deploy-time validation).
pub fn check_env(
    env: &BTreeMap<String, EnvValue>,
    policy: &SecretPolicy,
) -> Result<(), SecretError> {
    for (key, v) in env {
        if let EnvValue::File { file } = v {
            policy.check(file).map_err(|refusal| SecretError {
                key: key.clone(),
                refusal,
            })?;
        }
    }
    Ok(())
}

/// The env with every file value read, on a blocking thread.
pub async fn resolve_env(
    env: &BTreeMap<String, EnvValue>,
    policy: &SecretPolicy,
) -> Result<BTreeMap<String, String>, SecretError> {
    let has_files = env.values().any(|v| matches!(v, EnvValue::File { .. }));
    if !has_files {
        return Ok(literals(env));
    }
    let env = env.clone();
    let policy = policy.clone();
    tokio::task::spawn_blocking(move || {
        env.iter()
            .map(|(key, v)| {
                let value = match v {
                    EnvValue::Literal(s) => s.clone(),
                    EnvValue::File { file } => {
                        policy.read(file).map_err(|refusal| SecretError {
                            key: key.clone(),
                            refusal,
                        })?
                    }
                };
                Ok((key.clone(), value))
            })
            .collect()
    })
    .await
    .unwrap_or_else(|e| {
        Err(SecretError {
            key: String::new(),
            refusal: Refusal::Unreadable(std::io::Error::other(e)),
        })
    })
}

fn literals(env: &BTreeMap<String, EnvValue>) -> BTreeMap<String, String> {
    env.iter()
        .filter_map(|(k, v)| match v {
            EnvValue::Literal(s) => Some((k.clone(), s.clone())),
            EnvValue::File { .. } => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(p: &Path) -> BTreeMap<String, EnvValue> {
        BTreeMap::from([(
            "API_KEY".to_owned(),
            EnvValue::File {
                file: p.to_path_buf(),
            },
        )])
    }

    fn mkfifo(p: &Path) {
        let ok = std::process::Command::new("mkfifo")
            .arg(p)
            .status()
            .expect("mkfifo")
            .success();
        assert!(ok);
    }

    #[tokio::test]
    async fn reads_a_file_inside_the_dirs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("k"), "s3cret\n").unwrap();
        let policy = SecretPolicy::Dirs(vec![d.path().to_path_buf()]);
        check_env(&file(&d.path().join("k")), &policy).unwrap();
        let env = resolve_env(&file(&d.path().join("k")), &policy)
            .await
            .unwrap();
        assert_eq!(env["API_KEY"], "s3cret");
    }

    #[test]
    fn refusals_name_the_key_and_never_block() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("secrets");
        std::fs::create_dir(&dir).unwrap();
        let policy = SecretPolicy::Dirs(vec![dir.clone(), PathBuf::from("/dev")]);
        mkfifo(&dir.join("fifo"));
        std::fs::write(dir.join("big"), vec![b'x'; 70_000]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("out")).unwrap();
        std::fs::write(d.path().join("beside"), "x").unwrap();
        let cases = [
            (dir.join("fifo"), Refusal::NotRegular),
            (PathBuf::from("/dev/zero"), Refusal::NotRegular),
            (dir.join("big"), Refusal::TooLarge),
            (dir.join("out"), Refusal::OutsideDirs),
            (PathBuf::from("/etc/shadow"), Refusal::OutsideDirs),
            (d.path().join("beside"), Refusal::OutsideDirs),
            // Existence outside the directories is not revealed.
            (PathBuf::from("/nonexistent/x"), Refusal::OutsideDirs),
        ];
        let same =
            |a: &Refusal, b: &Refusal| std::mem::discriminant(a) == std::mem::discriminant(b);
        for (path, want) in cases {
            let e = check_env(&file(&path), &policy).unwrap_err();
            assert_eq!(e.key, "API_KEY");
            assert!(
                same(&e.refusal, &want),
                "{}: {:?}",
                path.display(),
                e.refusal
            );
            let spec: SpecError = e.into();
            assert!(spec.to_string().contains("env.API_KEY"), "{spec}");
            // Reading refuses the same way (and returns: no FIFO wait).
            let r = policy.read(&path).unwrap_err();
            assert!(same(&r, &want), "{}: {r:?}", path.display());
        }
        // The directory itself is not a secret file.
        assert!(policy.check(&dir).is_err());
        // Missing inside the directories: accepted now, refused when read.
        check_env(&file(&dir.join("nope")), &policy).unwrap();
        assert!(matches!(
            policy.read(&dir.join("nope")),
            Err(Refusal::Missing)
        ));
    }

    #[test]
    fn anywhere_still_checks_type_and_size() {
        let d = tempfile::tempdir().unwrap();
        mkfifo(&d.path().join("fifo"));
        std::fs::write(d.path().join("ok"), "v").unwrap();
        let p = SecretPolicy::Anywhere;
        assert!(matches!(
            p.read(&d.path().join("fifo")),
            Err(Refusal::NotRegular)
        ));
        assert!(matches!(
            p.read(Path::new("/dev/zero")),
            Err(Refusal::NotRegular)
        ));
        assert_eq!(p.read(&d.path().join("ok")).unwrap(), "v");
    }

    #[test]
    fn values_are_never_in_messages() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("k"), b"hunter2\0zz").unwrap();
        let p = SecretPolicy::Dirs(vec![d.path().to_path_buf()]);
        let e = p.read(&d.path().join("k")).unwrap_err();
        assert!(matches!(e, Refusal::NotText));
        assert!(!format!("{e} {e:?}").contains("hunter2"));
    }
}
