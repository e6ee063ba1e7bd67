//! Which of the runner's own environment variables may reach what it starts.
//!
//! The one place that lists them: servers get the proxy and CA-bundle
//! variables (a server calling an external API behind a corporate proxy
//! needs them), installers also get the registry-index settings. None of
//! them is a credential; tokens and everything else stay out. Ground floor:
//! imports nothing of this crate.

use std::collections::BTreeMap;

/// Proxy variables: servers and installers.
pub const PROXY: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
];

/// CA-bundle variables: servers and installers. Host paths, meaningless
/// inside an image.
pub const CA_FILES: &[&str] = &[
    "NODE_EXTRA_CA_CERTS",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "PIP_CERT",
    "GIT_SSL_CAINFO",
];

/// The runner variables a server gets: [`PROXY`] and [`CA_FILES`].
pub const PROXY_AND_CA: &[&[&str]] = &[PROXY, CA_FILES];

/// Registry settings: installers only.
pub const REGISTRY: &[&str] = &[
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_FIND_LINKS",
    "PIP_DEFAULT_TIMEOUT",
    "UV_INDEX_URL",
    "UV_EXTRA_INDEX_URL",
    "npm_config_registry",
    "NPM_CONFIG_REGISTRY",
];

/// The named variables that are set in this process's environment.
pub fn from_runner(names: &[&[&str]]) -> BTreeMap<String, String> {
    names
        .iter()
        .flat_map(|list| list.iter())
        .filter_map(|k| std::env::var(k).ok().map(|v| ((*k).to_owned(), v)))
        .collect()
}

/// PATH of the runner, or a standard one.
pub fn runner_path() -> String {
    std::env::var("PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into())
}

/// The system's CA bundle, when there is one: installers and servers trust
/// it in addition to their own (TLS-intercepting proxies put their CA there).
pub fn system_ca_bundle() -> Option<&'static str> {
    [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
        "/etc/ssl/cert.pem",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_hold_no_secrets_and_no_duplicates() {
        let mut all: Vec<&str> = PROXY
            .iter()
            .chain(CA_FILES)
            .chain(REGISTRY)
            .copied()
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n);
        assert!(all
            .iter()
            .all(|k| !k.contains("TOKEN") && !k.contains("SECRET")));
    }
}
