//! `POST /sql`: the protocol of Neon's HTTP endpoint, as the
//! `@neondatabase/serverless` driver speaks it. What a request asks for is
//! read in [`request`]; the request is admitted from its headers, then its
//! body is read and run on a pooled connection.

pub mod request;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use authgres_jwt::FailureClass;
use authgres_wire::{
    Admitted, CheckoutError, Classify as _, ClientState, Refusal, Settings, Transport,
};
use axum::body::Body;
use axum::extract::{ConnectInfo, Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt as _;
use serde_json::{Value, json};

use tokio::time::Instant;

use crate::query::{self, BatchOptions, ExecError, Statement};
use crate::{ConnectionTicket, HttpConfig, HttpState};

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

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

/// Handles one request.
pub async fn handle(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(ticket): Extension<ConnectionTicket>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let config = state.config();
    let ran = run(&state, &config, peer, &ticket, &headers, body).await;
    ticket.set_state(ClientState::Idle);
    match ran {
        Ok(value) => match serde_json::to_vec(&value) {
            Ok(bytes) if bytes.len() > config.max_response_bytes => Failure::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "54000",
                format!(
                    "response is larger than the limit of {} bytes",
                    config.max_response_bytes
                ),
            )
            .into_response(),
            Ok(bytes) => (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                bytes,
            )
                .into_response(),
            Err(error) => Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "XX000",
                error.to_string(),
            )
            .into_response(),
        },
        Err(failure) => failure.into_response(),
    }
}

async fn run(
    state: &HttpState,
    config: &HttpConfig,
    peer: SocketAddr,
    ticket: &ConnectionTicket,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, Failure> {
    let target = request::target(headers)?;
    let proxy = &state.proxy;
    let settings = proxy.settings();
    let asked = authgres_wire::Request {
        role: &target.role,
        database: &target.database,
        peer: peer.ip(),
        encrypted: state.tls,
        transport: Transport::Http,
    };
    let admitted = authgres_wire::admit(
        &settings.config.admission,
        &settings.verifier,
        proxy.metrics(),
        &asked,
        target.token.as_deref(),
        SystemTime::now(),
    )
    .await;
    let metrics = proxy.metrics();
    let admitted = match admitted {
        Ok(admitted) => {
            metrics.login(Transport::Http, Ok(()));
            admitted
        }
        Err(refusal) => {
            metrics.login(Transport::Http, Err(&refusal));
            return Err(refused(&refusal));
        }
    };
    ticket.authenticated();
    ticket.set_state(ClientState::Active);
    // Only an admitted request gets its body read.
    let body = read_body(config, body).await?;
    let (statements, batch) = request::statements(headers, &body)?;
    let (array_mode, raw) = (target.array_mode, target.raw);
    let claims = admitted.identity.as_ref().map(|i| &*i.claims_json);
    let run = Run {
        state,
        settings: &settings,
        config,
    };
    let results = execute(&run, &admitted, claims, &statements, batch.as_ref()).await?;
    let mut rendered: Vec<Value> = results
        .iter()
        .map(|r| query::result_json(r, array_mode, raw))
        .collect();
    Ok(match batch {
        Some(_) => json!({ "results": rendered }),
        None => rendered.pop().unwrap_or(Value::Null),
    })
}

/// Reads a request's body within the size limit and the body timeout.
async fn read_body(config: &HttpConfig, body: Body) -> Result<Bytes, Failure> {
    let limit = config.max_request_bytes;
    let limited = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(config.body_timeout, limited.collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(error)) if error.is::<http_body_util::LengthLimitError>() => Err(Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "54000",
            format!("request body is larger than the limit of {limit} bytes"),
        )),
        Ok(Err(_)) => Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "08P01",
            "the request body could not be read",
        )),
        Err(_) => Err(Failure::new(
            StatusCode::REQUEST_TIMEOUT,
            "08P01",
            format!(
                "the request body did not arrive within {}s",
                config.body_timeout.as_secs_f64()
            ),
        )),
    }
}

/// Runs the request on a pooled connection; one that turns out dead (the
/// server restarted) or fails its reset is replaced while nothing of the
/// request has run, until the checkout timeout.
async fn execute(
    run: &Run<'_>,
    admitted: &Admitted,
    claims: Option<&str>,
    statements: &[Statement],
    batch: Option<&BatchOptions>,
) -> Result<Vec<query::StatementResult>, Failure> {
    let state = run.state;
    let limits = state.pool.limits();
    let give_up = Instant::now() + limits.checkout_timeout;
    let password = run.settings.config.password(&admitted.role);
    loop {
        let mut pooled = state
            .pool
            .checkout(&admitted.database, &admitted.role, password, 0)
            .await
            .map_err(checkout_failure)?;
        let outcome = query::execute(
            pooled.conn(),
            &run.settings.claims_key,
            claims,
            statements,
            batch,
            query::Limits {
                max_bytes: run.config.max_response_bytes,
                internal_timeout: limits.internal_query_timeout,
                statement_timeout: run.config.statement_timeout,
                upstream: state.pool.config(),
            },
        )
        .await;
        let failure = match outcome {
            Ok(results) => {
                pooled.release();
                return Ok(results);
            }
            Err(ExecError::Readying(error))
                if error.worth_another_connection() && Instant::now() < give_up =>
            {
                tracing::debug!(%error, "pooled connection unusable for /sql; trying another");
                continue;
            }
            Err(ExecError::Db(error)) => db_failure(&error),
            Err(error @ (ExecError::Isolation(_) | ExecError::Encode(_))) => {
                Failure::new(StatusCode::BAD_REQUEST, "08P01", error.to_string())
            }
            Err(ExecError::StatementTimeout(limit)) => Failure::new(
                StatusCode::BAD_REQUEST,
                "57014",
                format!(
                    "canceling statement due to statement timeout: the statements of a request \
                     may run for {}s",
                    limit.as_secs_f64()
                ),
            ),
            Err(ExecError::TooLarge(limit)) => Failure::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "54000",
                format!("response is larger than the limit of {limit} bytes"),
            ),
            Err(ExecError::Readying(error) | ExecError::Upstream(error)) => {
                tracing::warn!(%error, "upstream failed during /sql");
                Failure::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "08006",
                    "the database connection failed",
                )
            }
        };
        // A connection whose exchange failed is marked broken and closed.
        pooled.release();
        return Err(failure);
    }
}

/// What a request runs with: the settings it started with.
struct Run<'a> {
    state: &'a HttpState,
    settings: &'a Settings,
    config: &'a HttpConfig,
}

/// A refused login as Neon's driver reads it. Neon's own endpoint answers a
/// failed login (bad password or JWT) with HTTP 400, like any error the
/// client caused, and the driver builds a `NeonDbError` (with `code`) only
/// from a 400 body: a 401 would lose the SQLSTATE. Only our side failing
/// (the provider's keys out of reach) is a 5xx.
fn refused(refusal: &Refusal) -> Failure {
    let status = match refusal {
        Refusal::Token(error) if error.class() == FailureClass::KeysUnavailable => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        Refusal::UnknownDatabase(_)
        | Refusal::UnknownRole(_)
        | Refusal::CleartextRefused(_)
        | Refusal::MissingToken(..)
        | Refusal::ClaimedRoleNotServed(_)
        | Refusal::Token(_) => StatusCode::BAD_REQUEST,
    };
    match refusal.client_view() {
        Some(view) => Failure::new(status, view.code.code(), view.message),
        None => Failure::new(status, "28000", refusal.to_string()),
    }
}

/// No connection: the pool stayed busy, or the database is unreachable.
fn checkout_failure(error: CheckoutError) -> Failure {
    match error {
        CheckoutError::Timeout(waited) => Failure::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "53300",
            format!(
                "no database connection became free within {}s: the pool for this database \
                 and role is busy",
                waited.as_secs_f64()
            ),
        ),
        CheckoutError::Upstream(error) => {
            tracing::warn!(%error, "no upstream connection for /sql");
            let message = error
                .client_view()
                .map_or_else(|| error.to_string(), |view| view.message);
            Failure::new(StatusCode::SERVICE_UNAVAILABLE, "08001", message)
        }
    }
}

/// A Postgres error as Neon reports it: HTTP 400 with every field.
fn db_failure(error: &authgres_wire::ServerError) -> Failure {
    let names: [(u8, &str); 17] = [
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
    for (code, name) in names {
        if let Some(value) = error.field(code) {
            body.insert(name.to_owned(), Value::String(value.to_owned()));
        }
    }
    Failure {
        status: StatusCode::BAD_REQUEST,
        body: Value::Object(body),
    }
}
