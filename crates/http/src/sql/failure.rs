//! What `/sql` answers when a request fails: an HTTP status and a JSON
//! body with a SQLSTATE, in the shape Neon's driver reads. Each error type
//! that can end a request converts into a [`Failure`] here, so the status
//! rule lives beside the error it words.
//!
//! Neon's own endpoint answers whatever the client caused (a failed login
//! included) with HTTP 400, and the driver builds a `NeonDbError` (with
//! `code`) only from a 400 body; only the service failing is a 5xx.

use authgres_jwt::FailureClass;
use authgres_wire::{CheckoutError, Classify as _, LimitRefusal, Refusal, ServerError};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::query::ExecError;

/// An error answer: status and a JSON body with at least `message`.
#[derive(Debug)]
pub struct Failure {
    status: StatusCode,
    body: Value,
}

impl Failure {
    /// A failure with `status` and the Postgres-style `code` and `message`.
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({"message": message.into(), "code": code}),
        }
    }
}

impl Failure {
    /// Its SQLSTATE, for the audit log.
    pub fn code(&self) -> Option<&str> {
        self.body.get("code").and_then(Value::as_str)
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

/// A request that did not produce results.
impl From<ExecError> for Failure {
    fn from(error: ExecError) -> Self {
        match error {
            ExecError::Db(error) => Self::from(&error),
            error @ (ExecError::Isolation(_) | ExecError::Encode(_)) => {
                Self::new(StatusCode::BAD_REQUEST, "08P01", error.to_string())
            }
            ExecError::StatementTimeout(limit) => Self::new(
                StatusCode::BAD_REQUEST,
                "57014",
                format!(
                    "canceling statement due to statement timeout: the statements of a \
                     request may run for {}s",
                    limit.as_secs_f64()
                ),
            ),
            ExecError::TooLarge(limit) => Self::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "54000",
                format!("response is larger than the limit of {limit} bytes"),
            ),
            ExecError::Readying(error) | ExecError::Upstream(error) => {
                tracing::warn!(%error, "upstream failed during /sql");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "08006",
                    "the database connection failed",
                )
            }
        }
    }
}

/// A refused login: 400 like any error the client caused, except when the
/// provider's keys are out of reach (our side failing).
impl From<&Refusal> for Failure {
    fn from(refusal: &Refusal) -> Self {
        let status = match refusal {
            Refusal::Token(error) if error.class() == FailureClass::KeysUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Refusal::UnknownDatabase(_)
            | Refusal::UnknownRole(_)
            | Refusal::CleartextRefused(_)
            | Refusal::TlsNotConfigured
            | Refusal::MissingToken(..)
            | Refusal::ClaimedRoleNotServed(_)
            | Refusal::NoRoute(_)
            | Refusal::Token(_) => StatusCode::BAD_REQUEST,
        };
        match refusal.client_view() {
            Some(view) => Self::new(status, view.code.code(), view.message),
            None => Self::new(status, "28000", refusal.to_string()),
        }
    }
}

/// A request over its user's or tenant's limit of transactions: 429, the
/// SQLSTATE (53400) and the words a Postgres client would get.
impl From<&LimitRefusal> for Failure {
    fn from(refusal: &LimitRefusal) -> Self {
        let status = StatusCode::TOO_MANY_REQUESTS;
        match refusal.client_view() {
            Some(view) => Self::new(status, view.code.code(), view.message),
            None => Self::new(status, "53400", refusal.to_string()),
        }
    }
}

/// No connection: the pool stayed busy, or the database is unreachable.
impl From<CheckoutError> for Failure {
    fn from(error: CheckoutError) -> Self {
        match error {
            CheckoutError::Timeout(waited) => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "53300",
                format!(
                    "no database connection became free within {}s: the pool for this \
                     database and role is busy",
                    waited.as_secs_f64()
                ),
            ),
            CheckoutError::Upstream(error) => {
                tracing::warn!(%error, "no upstream connection for /sql");
                let message = error
                    .client_view()
                    .map_or_else(|| error.to_string(), |view| view.message);
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "08001", message)
            }
        }
    }
}

/// A Postgres error as Neon reports it: HTTP 400 with every field.
impl From<&ServerError> for Failure {
    fn from(error: &ServerError) -> Self {
        const NAMES: [(u8, &str); 17] = [
            (b'M', "message"),
            (b'C', "code"),
            (b'D', "detail"),
            (b'H', "hint"),
            (b'P', "position"),
            (b'p', "internalPosition"),
            (b'q', "internalQuery"),
            (b'S', "severity"),
            (b'W', "where"),
            (b't', "table"),
            (b'c', "column"),
            (b's', "schema"),
            (b'd', "dataType"),
            (b'n', "constraint"),
            (b'F', "file"),
            (b'L', "line"),
            (b'R', "routine"),
        ];
        let mut body = serde_json::Map::new();
        for (code, name) in NAMES {
            if let Some(value) = error.field(code) {
                body.insert(name.to_owned(), Value::String(value.to_owned()));
            }
        }
        Self {
            status: StatusCode::BAD_REQUEST,
            body: Value::Object(body),
        }
    }
}
