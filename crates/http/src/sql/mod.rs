//! `POST /sql`: the protocol of Neon's HTTP endpoint, as the
//! `@neondatabase/serverless` driver speaks it. What a request asks for is
//! read in [`request`]; the request is admitted from its headers, then its
//! body is read within the proxy's budget for bodies (`body`) and run on a
//! pooled connection.
//!
//! Each admitted request counts as one transaction of its database and
//! role (transport `http`) with one query per statement, in the same
//! totals as the Postgres listener's, and as one against its identity's
//! limit of transactions (HTTP 429 over it); each request is logged at debug
//! (status, time, statements, rows: never the SQL or its parameters).

mod body;
mod failure;
pub mod request;

pub(crate) use body::BodyBudget;
pub use failure::Failure;

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use authgres_wire::audit::{Facts, Recorder};
use authgres_wire::metrics::Tally;
use authgres_wire::{
    Admitted, ClientState, Fairness, Proxy, SessionShape, Settings, Transport, Turn, UpstreamPool,
};
use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::query::{self, BatchOptions, ExecError};
use crate::{Caller, HttpConfig, HttpState};

/// Handles one `POST /sql` request from `caller`.
pub async fn handle(
    state: &HttpState,
    caller: &Caller,
    request: axum::http::Request<hyper::body::Incoming>,
) -> Response {
    let config = state.config();
    let started = Instant::now();
    let mut done = Done::default();
    let (parts, body) = request.into_parts();
    let body = Body::new(body);
    let mut last_token = caller.take_last_token();
    let ran = run(
        state,
        &config,
        caller,
        &mut last_token,
        &parts.headers,
        body,
        &mut done,
    )
    .await;
    caller.put_last_token(last_token);
    caller.ticket.set_state(ClientState::Idle);
    if let (Err(failure), Some(audit)) = (&ran, done.audit.as_mut()) {
        audit.error(failure.code().unwrap_or("?????"));
    }
    let response = respond(&config, ran);
    done.finish(&response, started.elapsed());
    response
}

/// What became of a request, for its counters and its log line.
#[derive(Default)]
struct Done {
    /// Set once admitted: its database and role, and their counters.
    admitted: Option<(String, String, Tally)>,
    /// Bytes of the body read.
    received: usize,
    /// Statements run.
    statements: usize,
    /// Rows returned or affected.
    rows: u64,
    /// How long its statements ran, checkout included.
    ran: Option<Duration>,
    /// Its audit line, when `[audit]` is on (made once admitted).
    audit: Option<Recorder>,
}

impl Done {
    /// Counts the request into its database and role's totals and logs
    /// it at debug (the statement count at trace). A transaction's time is
    /// the whole request's, a query's its share of the time the
    /// statements ran.
    fn finish(&mut self, response: &Response, took: Duration) {
        use hyper::body::Body as _;
        let status = response.status().as_u16();
        let sent = response.body().size_hint().exact().unwrap_or(0);
        let Some((database, role, tally)) = &self.admitted else {
            tracing::debug!(
                method = "POST",
                status,
                took_ms = millis(took),
                "/sql refused"
            );
            return;
        };
        if let Some(audit) = self.audit.as_mut() {
            audit.rows(self.rows);
            audit.finish(took, None);
        }
        tally.received(self.received);
        tally.sent(usize::try_from(sent).unwrap_or(usize::MAX));
        tally.transaction(took, tokio::time::Instant::now());
        if let Some(ran) = self.ran {
            let statements = u32::try_from(self.statements.max(1)).unwrap_or(u32::MAX);
            for _ in 0..self.statements {
                tally.query(ran / statements);
            }
        }
        tracing::debug!(
            method = "POST",
            status,
            took_ms = millis(took),
            database,
            role,
            rows = self.rows,
            "/sql request"
        );
        tracing::trace!(statements = self.statements, "/sql request's statements");
    }
}

fn millis(took: Duration) -> u64 {
    u64::try_from(took.as_millis()).unwrap_or(u64::MAX)
}

/// The response to a request's results (their JSON), or to why it has
/// none.
fn respond(config: &HttpConfig, ran: Result<Vec<u8>, Failure>) -> Response {
    match ran {
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
        Err(failure) => failure.into_response(),
    }
}

async fn run(
    state: &HttpState,
    config: &HttpConfig,
    caller: &Caller,
    last_token: &mut authgres_jwt::LastToken,
    headers: &HeaderMap,
    body: Body,
    done: &mut Done,
) -> Result<Vec<u8>, Failure> {
    let (peer, relayed_by, ticket) = (caller.peer, caller.relayed_by, &caller.ticket);
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
        Some(last_token),
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
            // At info, limited, as the Postgres listener's refusals: the
            // presented and expected iss/aud say why.
            proxy.log_refusal(peer, &refusal);
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
    let identity = admitted.identity.as_ref();
    let tally = metrics.tally_of(
        Transport::Http,
        &admitted.database,
        &admitted.role,
        identity,
    );
    done.admitted = Some((admitted.database.clone(), admitted.role.clone(), tally));
    let facts = Facts {
        transport: Transport::Http,
        encrypted: state.tls,
        identity,
        role: &admitted.role,
        database: &admitted.database,
        client: peer,
    };
    done.audit = proxy.audit_session(&settings, &facts).map(Recorder::new);
    ticket.authenticated();
    ticket.set_state(ClientState::Active);
    // Only an admitted request gets its body read, and only within the
    // budget; the reservation is held until the request is answered.
    let (body, reservation) = body::read(config, &state.bodies, body).await?;
    done.received = body.len();
    let (statements, batch) = request::statements(headers, &body)?;
    done.statements = statements.len();
    if let Some(audit) = done.audit.as_mut() {
        for statement in &statements {
            audit.statement(&statement.query);
        }
    }
    // Each is a copy of the one before: only the last is kept.
    drop(body);
    let encoded = query::encode(&statements).map_err(Failure::from)?;
    drop(statements);
    let (array_mode, raw) = (target.array_mode, target.raw);
    let claims = admitted.identity.as_ref().map(|i| &*i.claims_json);
    // Each request is a transaction against its identity's limit;
    // anonymous requests take turns in a busy pool by address.
    let _turn = limited(proxy, peer, &admitted)?;
    let address;
    let fair_key = match &admitted.identity {
        Some(identity) => identity.user_id.as_str(),
        None => {
            address = peer.ip().to_string();
            &address
        }
    };
    let run = Run {
        state,
        settings: &settings,
        config,
        fair: Fairness::new(fair_key),
    };
    let request = (encoded, reservation);
    let started = Instant::now();
    let results = execute(&run, &admitted, claims, request, batch.as_ref()).await;
    done.ran = Some(started.elapsed());
    let results = results?;
    done.rows = results
        .iter()
        .map(|r| r.row_count.unwrap_or(r.rows.len() as u64))
        .sum();
    Ok(render(&results, batch.is_some(), array_mode, raw))
}

/// The response body: a batch's results as `{"results": [...]}`, a single
/// statement's result on its own.
fn render(results: &[query::StatementResult], batch: bool, array_mode: bool, raw: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    if !batch {
        match results.last() {
            Some(result) => query::write_result(&mut out, result, array_mode, raw),
            None => out.extend_from_slice(b"null"),
        }
        return out;
    }
    out.extend_from_slice(b"{\"results\":[");
    for (i, result) in results.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        query::write_result(&mut out, result, array_mode, raw);
    }
    out.extend_from_slice(b"]}");
    out
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
    let pool = run.state.pool.get(admitted.destination.server.as_ref());
    let limits = pool.limits();
    let attempts = UpstreamPool::attempts(&limits, tokio::time::Instant::now());
    let password = || run.settings.config.password(&admitted.role);
    let query_limits = query::Limits {
        max_bytes: run.config.max_response_bytes,
        internal_timeout: limits.internal_query_timeout,
        statement_timeout: run.config.statement_timeout,
    };
    // A connection holding the same token's session, signed with the
    // same key, is preferred: it needs no reset and no attach (see
    // `query`).
    let shape = SessionShape::new(claims, &run.settings.claims_key, &[]);
    let caller = query::Caller {
        key: &run.settings.claims_key,
        claims,
        client: authgres_wire::next_client_id(),
        shape: shape.as_ref(),
    };
    let (mut pooled, in_flight) = loop {
        let mut pooled = pool
            .checkout_as(
                &admitted.database,
                &admitted.role,
                password,
                (caller.client, shape.as_deref()),
                run.fair,
            )
            .await
            .map_err(Failure::from)?;
        let started = query::start(pooled.conn(), caller, &request.0, batch, query_limits).await;
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
    /// Whose turn its checkout takes in a busy pool.
    fair: Fairness<'a>,
}

/// The request's place under its identity's limit of transactions
/// (`None`: anonymous, or no limit applies), or the 429 that refuses it
/// (counted, and logged as the listeners' refusals are).
fn limited(proxy: &Proxy, peer: SocketAddr, admitted: &Admitted) -> Result<Option<Turn>, Failure> {
    let Some(identity) = &admitted.identity else {
        return Ok(None);
    };
    let limiter = proxy.limiter();
    limiter
        .begin_request(identity, &admitted.role)
        .map_err(|refusal| {
            proxy
                .metrics()
                .identity_limit(Transport::Http, refusal.limit);
            proxy.log_refusal(peer, &refusal);
            Failure::from(&refusal)
        })
}
