//! `POST /sql`: the protocol of Neon's HTTP endpoint, as the
//! `@neondatabase/serverless` driver speaks it. What a request asks for is
//! read in [`request`]; the request is admitted from its headers, then its
//! body is read within the proxy's budget for bodies (`body`) and run on a
//! pooled connection.

mod body;
pub mod request;

pub(crate) use body::BodyBudget;

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
use serde_json::{Value, json};

use crate::query::{self, BatchOptions, ExecError};
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
    Extension(crate::RelayedBy(relayed_by)): Extension<crate::RelayedBy>,
    Extension(ticket): Extension<ConnectionTicket>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let config = state.config();
    let ran = run(&state, &config, (peer, relayed_by), &ticket, &headers, body).await;
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
    (peer, relayed_by): (SocketAddr, Option<std::net::IpAddr>),
    ticket: &ConnectionTicket,
    headers: &HeaderMap,
    body: Body,
) -> Result<Value, Failure> {
    let target = request::target(headers)?;
    // Over the limit is over the limit, before anyone is admitted.
    body::check_declared(config, &body)?;
    let proxy = &state.proxy;
    let settings = proxy.settings();
    let asked = authgres_wire::Request {
        role: &target.role,
        database: &target.database,
        peer: peer.ip(),
        relayed_by,
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
    // Only an admitted request gets its body read, and only within the
    // budget; the reservation is held until the request is answered.
    let (body, reservation) = body::read(config, &state.bodies, body).await?;
    let (statements, batch) = request::statements(headers, &body)?;
    // Each is a copy of the one before: only the last is kept.
    drop(body);
    let encoded = query::encode(&statements).map_err(exec_failure)?;
    drop(statements);
    let (array_mode, raw) = (target.array_mode, target.raw);
    let claims = admitted.identity.as_ref().map(|i| &*i.claims_json);
    let run = Run {
        state,
        settings: &settings,
        config,
    };
    let request = (encoded, reservation);
    let results = execute(&run, &admitted, claims, request, batch.as_ref()).await?;
    let mut rendered: Vec<Value> = results
        .iter()
        .map(|r| query::result_json(r, array_mode, raw))
        .collect();
    Ok(match batch {
        Some(_) => json!({ "results": rendered }),
        None => rendered.pop().unwrap_or(Value::Null),
    })
}

/// Runs the request on a pooled connection; one that turns out dead (the
/// server restarted) or fails its reset is replaced while nothing of the
/// request has run, until the checkout timeout. The request's text and its
/// share of the body budget are let go once it is sent.
async fn execute(
    run: &Run<'_>,
    admitted: &Admitted,
    claims: Option<&str>,
    request: (query::Encoded, body::Reservation),
    batch: Option<&BatchOptions>,
) -> Result<Vec<query::StatementResult>, Failure> {
    let state = run.state;
    let limits = state.pool.limits();
    let attempts = state.pool.attempts();
    let password = run.settings.config.password(&admitted.role);
    let query_limits = query::Limits {
        max_bytes: run.config.max_response_bytes,
        internal_timeout: limits.internal_query_timeout,
        statement_timeout: run.config.statement_timeout,
        upstream: state.pool.config(),
    };
    let (mut pooled, in_flight) = loop {
        let mut pooled = state
            .pool
            .checkout(&admitted.database, &admitted.role, password, 0)
            .await
            .map_err(checkout_failure)?;
        let started = query::start(
            pooled.conn(),
            &run.settings.claims_key,
            claims,
            &request.0,
            batch,
            query_limits,
        )
        .await;
        match started {
            Ok(in_flight) => break (pooled, in_flight),
            Err(ExecError::Readying(error)) if attempts.another(&error) => {}
            Err(error) => {
                // A connection whose exchange failed is marked broken and
                // closed.
                pooled.release();
                return Err(exec_failure(error));
            }
        }
    };
    drop(request);
    let outcome = query::finish(pooled.conn(), in_flight, query_limits).await;
    // A connection whose exchange failed is marked broken and closed.
    pooled.release();
    outcome.map_err(exec_failure)
}

/// A request that did not produce results, as the driver reads it.
fn exec_failure(error: ExecError) -> Failure {
    match error {
        ExecError::Db(error) => db_failure(&error),
        error @ (ExecError::Isolation(_) | ExecError::Encode(_)) => {
            Failure::new(StatusCode::BAD_REQUEST, "08P01", error.to_string())
        }
        ExecError::StatementTimeout(limit) => Failure::new(
            StatusCode::BAD_REQUEST,
            "57014",
            format!(
                "canceling statement due to statement timeout: the statements of a request \
                 may run for {}s",
                limit.as_secs_f64()
            ),
        ),
        ExecError::TooLarge(limit) => Failure::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "54000",
            format!("response is larger than the limit of {limit} bytes"),
        ),
        ExecError::Readying(error) | ExecError::Upstream(error) => {
            tracing::warn!(%error, "upstream failed during /sql");
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "08006",
                "the database connection failed",
            )
        }
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
        | Refusal::TlsNotConfigured
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
