//! The one HTTP error type: 4xx carry their message, 5xx log the detail.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tracing::error;

use crate::mcp::CallError;
use crate::supervisor::SupervisorError;

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
            ApiError::Supervisor(e) => match e {
                SupervisorError::Spec(_)
                | SupervisorError::Source(_)
                | SupervisorError::Unsupported(_) => StatusCode::BAD_REQUEST,
                SupervisorError::NotFound { .. } => StatusCode::NOT_FOUND,
                SupervisorError::NotRunning { .. } => StatusCode::SERVICE_UNAVAILABLE,
                SupervisorError::StartFailed { .. } => StatusCode::BAD_GATEWAY,
                SupervisorError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
                SupervisorError::Call { source, .. } => match source {
                    CallError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
                    CallError::Rpc { .. } | CallError::Protocol(_) => StatusCode::BAD_GATEWAY,
                    CallError::Exited(_) | CallError::Closed(_) => StatusCode::SERVICE_UNAVAILABLE,
                },
            },
        }
    }

    /// The JSON body: `{"error": …}` plus `logs` or `code` where they apply.
    pub fn body(&self) -> Value {
        let message = crate::error_chain(self);
        match self {
            ApiError::Supervisor(SupervisorError::StartFailed { logs, .. }) => {
                json!({"error": message, "logs": logs})
            }
            ApiError::Supervisor(SupervisorError::Call {
                source: CallError::Rpc { code, data, .. },
                ..
            }) => {
                let mut v = json!({"error": message, "code": code});
                if let Some(d) = data {
                    v["data"] = d.clone();
                }
                v
            }
            _ => json!({"error": message}),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            error!(status = status.as_u16(), error = %crate::error_chain(&self), "request failed");
        }
        (status, Json(self.body())).into_response()
    }
}
