//! The one HTTP error type: 4xx carry their message, 5xx log the detail.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tracing::error;

use crate::supervisor::{ErrorKind, ServiceKey, SupervisorError};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("this token does not reach this route")]
    Forbidden,
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(axum::http::Method),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden => StatusCode::FORBIDDEN,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Supervisor(e) => match e.kind() {
                ErrorKind::Invalid => StatusCode::BAD_REQUEST,
                ErrorKind::NotFound => StatusCode::NOT_FOUND,
                ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
                ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
                ErrorKind::Upstream { .. } | ErrorKind::BadGateway => StatusCode::BAD_GATEWAY,
                ErrorKind::Conflict => StatusCode::CONFLICT,
                ErrorKind::Forbidden => StatusCode::FORBIDDEN,
                ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    /// The service an error is about, for its log line.
    fn service(&self) -> Option<&ServiceKey> {
        match self {
            ApiError::Supervisor(
                SupervisorError::NotFound { key }
                | SupervisorError::NotRunning { key, .. }
                | SupervisorError::StartFailed { key, .. }
                | SupervisorError::Superseded { key }
                | SupervisorError::Call { key, .. },
            ) => Some(key),
            _ => None,
        }
    }

    /// The JSON body: `{"error": …}` plus `logs` or `code` where they apply.
    pub fn body(&self) -> Value {
        let message = crate::error_chain(self);
        let ApiError::Supervisor(e) = self else {
            return json!({ "error": message });
        };
        let mut v = json!({ "error": message });
        if !e.logs().is_empty() || matches!(e, SupervisorError::StartFailed { .. }) {
            v["logs"] = json!(e.logs());
        }
        if let ErrorKind::Upstream { code, data } = e.kind() {
            v["code"] = json!(code);
            if let Some(d) = data {
                v["data"] = d;
            }
        }
        v
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            match self.service() {
                Some(k) => error!(
                    mesh = %k.mesh,
                    service = %k.name,
                    status = status.as_u16(),
                    error = %crate::error_chain(&self),
                    "request failed"
                ),
                None => {
                    error!(status = status.as_u16(), error = %crate::error_chain(&self), "request failed")
                }
            }
        }
        (status, Json(self.body())).into_response()
    }
}
