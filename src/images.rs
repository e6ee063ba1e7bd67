//! Runner images: node, python and bun images built through bollard from a
//! tar.gz context (`tar` + `flate2`) holding the Dockerfile, the meshbox
//! binary itself (so install steps run meshbox's own acquisition code inside
//! the sandbox) and an optional extra CA bundle.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bollard::query_parameters::BuildImageOptionsBuilder;
use bollard::Docker;
use flate2::write::GzEncoder;
use futures_util::StreamExt;

use crate::model::{runner_image, Runtime, RUNNER_VERSION_LABEL};
use crate::orchestrator::docker::stream;

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
    /// The build itself failed; `message` is the engine's account of it.
    #[error("building {image} failed: {message}")]
    Build { image: String, message: String },
    #[error("the build request for {image} failed")]
    Request {
        image: String,
        #[source]
        source: bollard::errors::Error,
    },
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
    tar: &mut tar::Builder<impl Write>,
    name: &str,
    size: u64,
    data: impl Read,
    mode: u32,
) -> std::io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, name, data)
}

/// An input file of the context, opened, with its size.
fn open(path: &Path) -> Result<(std::fs::File, u64), ImageError> {
    let read = |source| ImageError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let size = file.metadata().map_err(read)?.len();
    Ok((file, size))
}

/// Writes the gzipped build context of a runtime's image to `w`: the
/// Dockerfile, the meshbox binary and the CA bundle (possibly empty), read
/// as they are packed.
pub fn write_context(
    runtime: Runtime,
    opts: &BuildOptions,
    w: impl Write,
) -> Result<(), ImageError> {
    let binary = match &opts.binary {
        Some(b) => b.clone(),
        None => std::env::current_exe().map_err(|source| ImageError::Read {
            path: PathBuf::from("/proc/self/exe"),
            source,
        })?,
    };
    let (bin, bin_size) = open(&binary)?;
    let ca = opts.ca_bundle.as_deref().map(open).transpose()?;
    let mut tar = tar::Builder::new(GzEncoder::new(w, flate2::Compression::fast()));
    let dockerfile = dockerfile(runtime).as_bytes();
    add_file(
        &mut tar,
        "Dockerfile",
        dockerfile.len() as u64,
        dockerfile,
        0o644,
    )
    .map_err(ImageError::Pack)?;
    add_file(&mut tar, "meshbox", bin_size, bin, 0o755).map_err(ImageError::Pack)?;
    match ca {
        Some((file, size)) => add_file(&mut tar, "ca-bundle.pem", size, file, 0o644),
        None => add_file(&mut tar, "ca-bundle.pem", 0, std::io::empty(), 0o644),
    }
    .map_err(ImageError::Pack)?;
    let gz = tar.into_inner().map_err(ImageError::Pack)?;
    gz.finish()
        .and_then(|mut w| w.flush())
        .map_err(ImageError::Pack)
}

/// The engine's options for building `image`: the base image as a build
/// argument, and the version label ([`RUNNER_VERSION_LABEL`]) of the meshbox
/// that goes in.
fn build_options(image: &str, opts: &BuildOptions) -> bollard::query_parameters::BuildImageOptions {
    let mut args = HashMap::new();
    if let Some(b) = &opts.base_image {
        args.insert("BASE_IMAGE".to_owned(), b.clone());
    }
    let labels = HashMap::from([(
        RUNNER_VERSION_LABEL.to_owned(),
        env!("CARGO_PKG_VERSION").to_owned(),
    )]);
    BuildImageOptionsBuilder::default()
        .dockerfile("Dockerfile")
        .t(image)
        .rm(true)
        .forcerm(true)
        .buildargs(&args)
        .labels(&labels)
        .build()
}

/// Builds one runner image; `progress` gets the build's output lines.
pub async fn build(
    docker: &Docker,
    runtime: Runtime,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<String, ImageError> {
    let image = runner_image(runtime);
    // The context is packed on the blocking pool as the request sends it.
    let packing = opts.clone();
    let (ctx, packer) = stream::produced(move |w| write_context(runtime, &packing, w));
    let options = build_options(&image, opts);
    let built = follow(
        docker.build_image(options, None, Some(bollard::body_try_stream(ctx))),
        &image,
        progress,
    )
    .await;
    let packed = packer
        .await
        .map_err(|e| ImageError::Pack(std::io::Error::other(e)))?;
    match (built, packed) {
        (Ok(()), Ok(())) => Ok(image),
        // A context that could not be packed explains the failed build;
        // a broken pipe only says the build ended first.
        (_, Err(e)) if !matches!(&e, ImageError::Pack(io) if stream::cut_short(io)) => Err(e),
        (Err(e), _) | (Ok(()), Err(e)) => Err(e),
    }
}

/// Follows a build's output to its end: progress lines, or the error.
async fn follow(
    mut stream: impl futures_util::Stream<Item = Result<bollard::models::BuildInfo, bollard::errors::Error>>
        + Unpin,
    image: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(detail) = info.error_detail {
                    return Err(ImageError::Build {
                        image: image.to_owned(),
                        message: detail.message.unwrap_or_default(),
                    });
                }
                if let Some(s) = info.stream {
                    for line in s.lines().filter(|l| !l.trim().is_empty()) {
                        progress(line);
                    }
                }
            }
            Err(source) => {
                return Err(ImageError::Request {
                    image: image.to_owned(),
                    source,
                })
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn images_are_labelled_with_the_meshbox_that_builds_them() {
        let o = build_options(
            "meshbox/runner-node:latest",
            &BuildOptions {
                base_image: Some("local/node".into()),
                ..BuildOptions::default()
            },
        );
        let labels = o.labels.expect("labels");
        assert_eq!(labels[RUNNER_VERSION_LABEL], env!("CARGO_PKG_VERSION"));
        assert_eq!(o.buildargs.expect("build args")["BASE_IMAGE"], "local/node");
        assert_eq!(
            crate::model::RunnerBuild::of(Some(&labels)),
            crate::model::RunnerBuild::Current
        );
    }

    #[test]
    fn context_holds_dockerfile_binary_and_ca() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("meshbox");
        std::fs::write(&bin, b"\x7fELF fake").unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, b"-----BEGIN CERTIFICATE-----\n").unwrap();
        let mut ctx = Vec::new();
        write_context(
            Runtime::Python,
            &BuildOptions {
                ca_bundle: Some(ca),
                binary: Some(bin),
                ..Default::default()
            },
            &mut ctx,
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
