//! Runner images: node, python and bun images built through bollard from a
//! tar.gz context (`tar` + `flate2`) holding the Dockerfile, the meshbox
//! binary itself (so install steps run meshbox's own acquisition code inside
//! the sandbox) and an optional extra CA bundle.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bollard::query_parameters::BuildImageOptionsBuilder;
use bollard::Docker;
use flate2::write::GzEncoder;
use futures_util::StreamExt;

use crate::model::runner_image;
use crate::model::Runtime;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("failed to read `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to pack the build context")]
    Pack(#[source] std::io::Error),
    #[error("cannot reach the docker engine")]
    Engine(#[source] bollard::errors::Error),
    #[error("building {image} failed: {message}")]
    Build { image: String, message: String },
}

/// The Dockerfile of a runtime, embedded so the binary can build anywhere.
pub fn dockerfile(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Node => include_str!("../images/node/Dockerfile"),
        Runtime::Python => include_str!("../images/python/Dockerfile"),
        Runtime::Bun => include_str!("../images/bun/Dockerfile"),
    }
}

#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// Overrides the Dockerfile's `BASE_IMAGE` (e.g. a local Debian base).
    pub base_image: Option<String>,
    /// A PEM bundle added to the image's trust store.
    pub ca_bundle: Option<PathBuf>,
    /// The meshbox binary to put in the image (default: this executable).
    pub binary: Option<PathBuf>,
}

fn add_file(
    tar: &mut tar::Builder<GzEncoder<Vec<u8>>>,
    name: &str,
    data: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, name, data)
}

/// The gzipped build context of a runtime's image.
pub fn context(runtime: Runtime, opts: &BuildOptions) -> Result<Vec<u8>, ImageError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| ImageError::Read {
            path: p.to_path_buf(),
            source,
        })
    };
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().map_err(|source| ImageError::Read {
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?,
    };
    let bin = read(&binary)?;
    let ca = match &opts.ca_bundle {
        Some(p) => read(p)?,
        None => Vec::new(),
    };
    let mut tar = tar::Builder::new(GzEncoder::new(Vec::new(), flate2::Compression::fast()));
    add_file(
        &mut tar,
        "Dockerfile",
        dockerfile(runtime).as_bytes(),
        0o644,
    )
    .map_err(ImageError::Pack)?;
    add_file(&mut tar, "meshbox", &bin, 0o755).map_err(ImageError::Pack)?;
    add_file(&mut tar, "ca-bundle.pem", &ca, 0o644).map_err(ImageError::Pack)?;
    let gz = tar.into_inner().map_err(ImageError::Pack)?;
    gz.finish().map_err(ImageError::Pack)
}

/// Builds one runner image; `progress` gets the build's output lines.
pub async fn build(
    docker: &Docker,
    runtime: Runtime,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<String, ImageError> {
    let image = runner_image(runtime);
    let ctx = context(runtime, opts)?;
    let mut args = HashMap::new();
    if let Some(b) = &opts.base_image {
        args.insert("BASE_IMAGE".to_owned(), b.clone());
    }
    let options = BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(&image)
        .rm(true)
        .forcerm(true)
        .buildargs(&args)
        .build();
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(ctx.into())));
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(detail) = info.error_detail {
                    return Err(ImageError::Build {
                        image,
                        message: detail.message.unwrap_or_default(),
                    });
                }
                if let Some(s) = info.stream {
                    for line in s.lines().filter(|l| !l.trim().is_empty()) {
                        progress(line);
                    }
                }
            }
            Err(e) => {
                return Err(ImageError::Build {
                    image,
                    message: e.to_string(),
                })
            }
        }
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn context_holds_dockerfile_binary_and_ca() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("meshbox");
        std::fs::write(&bin, b"\x7fELF fake").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, b"-----BEGIN CERTIFICATE-----\n").unwrap();
        let ctx = context(
            Runtime::Python,
            &BuildOptions {
                ca_bundle: Some(ca),
                binary: Some(bin),
                ..Default::default()
            },
        )
        .unwrap();
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(&ctx[..]));
        let mut seen = HashMap::new();
        for e in tar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            let mode = e.header().mode().unwrap();
            let mut body = Vec::new();
            e.read_to_end(&mut body).unwrap();
            seen.insert(name, (mode, body));
        }
        assert!(String::from_utf8_lossy(&seen["Dockerfile"].1).contains("ARG BASE_IMAGE=python"));
        assert_eq!(seen["meshbox"], (0o755, b"\x7fELF fake".to_vec()));
        assert!(seen["ca-bundle.pem"].1.starts_with(b"-----BEGIN"));
    }
}
