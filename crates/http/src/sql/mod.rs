//! `POST /sql`: the protocol of Neon's HTTP endpoint, as the
//! `@neondatabase/serverless` driver speaks it. What a request asks for is
//! read in [`request`]; the request is admitted from its headers, then its
//! body is read within the proxy's budget for bodies (`body`) and run on a
//! pooled connection.

mod body;
mod failure;
pub mod request;

pub(crate) use body::BodyBudget;
pub use failure::Failure;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use authgres_wire::{Admitted, ClientState, Settings, Transport};
use axum::body::Body;
use axum::extract::{ConnectInfo, Extension, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::query::{self, BatchOptions, ExecError};
use crate::{ConnectionTicket, HttpConfig, HttpState};

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
    let asked = authgres_wire::LoginRequest {
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
            return Err(Failure::from(&refusal));
        }
    };
    if proxy.gates().is_disabled(&admitted.database) {
        return Err(Failure::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "57P03",
            format!(
                "database \"{}\" does not allow connections now: an operator disabled it",
                admitted.database
            ),
        ));
    }
    ticket.authenticated();
    ticket.set_state(ClientState::Active);
    // Only an admitted request gets its body read, and only within the
    // budget; the reservation is held until the request is answered.
    let (body, reservation) = body::read(config, &state.bodies, body).await?;
    let (statements, batch) = request::statements(headers, &body)?;
    // Each is a copy of the one before: only the last is kept.
    drop(body);
    let encoded = query::encode(&statements).map_err(Failure::from)?;
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
            .map_err(Failure::from)?;
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
                return Err(Failure::from(error));
            }
        }
    };
    drop(request);
    let outcome = query::finish(pooled.conn(), in_flight, query_limits).await;
    // A connection whose exchange failed is marked broken and closed.
    pooled.release();
    outcome.map_err(Failure::from)
}

/// What a request runs with: the settings it started with.
struct Run<'a> {
    state: &'a HttpState,
    settings: &'a Settings,
    config: &'a HttpConfig,
}
