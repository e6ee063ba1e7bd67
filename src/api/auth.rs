//! Bearer tokens shared by the REST API and the MCP gateway: the admin token
//! reaches everything, a mesh-scoped token only its own mesh's
//! `/v1/meshes/{mesh}/…` routes and `/mcp/{mesh}…` endpoints.
//!
//! Owns token parsing (`--mesh-tokens-file`), comparison and the middleware
//! that puts the caller's [`Principal`] into the request's extensions. It
//! never looks at bodies.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};
use crate::model::{validate_name, NameError, Principal};

/// The tokens a daemon accepts.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    admin: Option<Arc<str>>,
    /// (mesh, token) pairs.
    mesh: Arc<[(String, String)]>,
}

/// A `--mesh-tokens-file` line that is not `MESH TOKEN`.
#[derive(Debug, thiserror::Error)]
pub enum MeshTokensError {
    #[error("line {line}: expected `MESH TOKEN`")]
    Shape { line: usize },
    #[error("line {line}")]
    Mesh {
        line: usize,
        #[source]
        source: NameError,
    },
    #[error("line {line}: a token appears twice")]
    Duplicate { line: usize },
}

/// Parses `MESH TOKEN` lines; blank lines and `#` comments are skipped.
pub fn parse_mesh_tokens(text: &str) -> Result<Vec<(String, String)>, MeshTokensError> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut parts = l.split_whitespace();
        let (Some(mesh), Some(token), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(MeshTokensError::Shape { line });
        };
        validate_name("mesh", mesh).map_err(|source| MeshTokensError::Mesh { line, source })?;
        if !seen.insert(token.to_owned()) {
            return Err(MeshTokensError::Duplicate { line });
        }
        out.push((mesh.to_owned(), token.to_owned()));
    }
    Ok(out)
}

impl Tokens {
    pub fn new(admin: Option<String>, mesh: Vec<(String, String)>) -> Self {
        Tokens {
            admin: admin.map(Arc::from),
            mesh: mesh.into(),
        }
    }

    /// Whether any token is configured (else every caller is [`Principal::Open`]).
    pub fn enabled(&self) -> bool {
        self.admin.is_some() || !self.mesh.is_empty()
    }

    /// Who presents `given`; `None` when it matches no token.
    pub fn identify(&self, given: &str) -> Option<Principal> {
        if !self.enabled() {
            return Some(Principal::Open);
        }
        // Every token is compared, so the time taken says nothing about which matched.
        let mut found = None;
        if let Some(admin) = &self.admin {
            if constant_time_eq(given.as_bytes(), admin.as_bytes()) {
                found = Some(Principal::Admin);
            }
        }
        for (mesh, token) in self.mesh.iter() {
            if constant_time_eq(given.as_bytes(), token.as_bytes()) && found.is_none() {
                found = Some(Principal::Mesh(mesh.clone()));
            }
        }
        found
    }
}

/// Whether `principal` may use `path` (a raw, still percent-encoded path:
/// an encoded mesh segment never equals a plain name, so it is refused).
pub fn allowed(principal: &Principal, path: &str) -> bool {
    let Principal::Mesh(mesh) = principal else {
        return true;
    };
    let mut segs = path.trim_start_matches('/').split('/');
    match (segs.next(), segs.next(), segs.next()) {
        (Some("v1"), Some("meshes"), Some(m)) => m == mesh,
        (Some("mcp"), Some(m), _) => m == mesh,
        _ => false,
    }
}

/// Routes anyone may call.
fn is_public(path: &str) -> bool {
    path == "/v1/health" || path == "/metrics"
}

/// Compares in time independent of where the first difference is.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

pub(super) async fn auth(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let principal = if !state.tokens.enabled() {
        Principal::Open
    } else if is_public(path) {
        return next.run(req).await;
    } else {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        match state.tokens.identify(given) {
            Some(p) => p,
            None => return ApiError::Unauthorized.into_response(),
        }
    };
    if !allowed(&principal, path) {
        return ApiError::Forbidden.into_response();
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_compare() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn mesh_tokens_file() {
        let t = parse_mesh_tokens("# comment\n\nacme s3cret\n  beta   tok2 \n").unwrap();
        assert_eq!(
            t,
            vec![
                ("acme".into(), "s3cret".into()),
                ("beta".into(), "tok2".into())
            ]
        );
        assert!(matches!(
            parse_mesh_tokens("acme").unwrap_err(),
            MeshTokensError::Shape { line: 1 }
        ));
        assert!(matches!(
            parse_mesh_tokens("acme a b").unwrap_err(),
            MeshTokensError::Shape { line: 1 }
        ));
        assert!(matches!(
            parse_mesh_tokens("ok t\n../x t2").unwrap_err(),
            MeshTokensError::Mesh { line: 2, .. }
        ));
        assert!(matches!(
            parse_mesh_tokens("a t\nb t").unwrap_err(),
            MeshTokensError::Duplicate { line: 2 }
        ));
    }

    #[test]
    fn identify_and_scope() {
        let t = Tokens::new(Some("adm".into()), vec![("acme".into(), "m1".into())]);
        assert_eq!(t.identify("adm"), Some(Principal::Admin));
        assert_eq!(t.identify("m1"), Some(Principal::Mesh("acme".into())));
        assert_eq!(t.identify("nope"), None);
        assert_eq!(t.identify(""), None);
        let m = Principal::Mesh("acme".into());
        for ok in [
            "/v1/meshes/acme/services",
            "/v1/meshes/acme/services/x/call",
            "/mcp/acme",
            "/mcp/acme/time",
        ] {
            assert!(allowed(&m, ok), "{ok}");
        }
        for no in [
            "/v1/meshes/beta/services",
            "/v1/meshes/acmex/services",
            "/mcp/beta/time",
            "/mcp/acme%2e",
            "/mcp/%61cme/time",
            "/load",
            "/v1/meshes",
            "/health",
        ] {
            assert!(!allowed(&m, no), "{no}");
        }
        assert!(allowed(&Principal::Admin, "/load"));
        assert!(Tokens::default().identify("x") == Some(Principal::Open));
    }
}
