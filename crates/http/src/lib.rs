//! HTTP for authgres: the `/sql` endpoint of Neon's serverless driver and
//! the Postgres protocol over WebSocket at `/v2`.
//!
//! `POST /sql` ([`sql`]) takes the driver's headers (`Neon-Connection-String`,
//! `Authorization: Bearer <jwt>`, `Neon-Array-Mode`, `Neon-Raw-Text-Output`,
//! `Neon-Batch-*`) and body (`{query, params}` or `{queries}`), admits the
//! request from its headers before reading the body, runs the statements on
//! a pooled upstream connection with the identity attached for the
//! transaction only ([`query`]), and answers in Neon's JSON shape
//! ([`render`]). `GET /v2` upgrades to a WebSocket carrying the Postgres
//! protocol as a byte stream ([`ws`]), served by the same session code as
//! TCP. Every HTTP connection holds a place in the proxy's one connection
//! budget, counted as unauthenticated until a request on it (or its
//! WebSocket session) authenticates, and an entry in the client registry;
//! headers and bodies are read under deadlines. Every response carries the
//! CORS headers browsers need, and `OPTIONS` answers preflight; every
//! response is counted by route and status. Behind a TCP balancer listed in
//! `proxy_protocol_from`, a connection's PROXY protocol v2 header is read
//! first and names the client for all of this.
//!
//! When the proxy drains, the listener stops accepting, idle kept-alive
//! connections close, requests in flight complete and their connections
//! close after the response; WebSocket sessions drain like TCP ones.

pub mod query;
pub mod render;
pub mod sql;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use authgres_wire::front_door::{self, Door, EntryRules, Guest, TurnedAway};
use authgres_wire::{
    ClientHandle, ClientState, PoolLimits, Proxy, ProxyProtocolFrom, ServerPools, Ticket,
    Transport, UpstreamPool,
};
use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, State};
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt as _;
use tower::ServiceExt as _;

/// Default request and response limit (10 MiB), as Neon's.
pub const DEFAULT_MAX_BYTES: usize = 10 * 1024 * 1024;
/// Default upstream connections per (database, role) kept for `/sql`.
pub const DEFAULT_POOL_SIZE: usize = 20;
/// Default time a client has to send a request's headers.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a client has to send a request's body.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default budget of request body bytes held at once by all `/sql`
/// requests together: two bodies of the default largest size.
pub const DEFAULT_MAX_REQUEST_BYTES_TOTAL: usize = 2 * DEFAULT_MAX_BYTES;
/// Default time a request's own statements may run, all together: long
/// enough for real work, short enough that a forgotten request does not
/// hold a backend for ever.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(60);

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body; larger ones get 413.
    pub max_request_bytes: usize,
    /// Request body bytes all `/sql` requests may hold at once; a request
    /// waits (up to the body timeout) for its share before its body is
    /// read. Fixed until a restart.
    pub max_request_bytes_total: usize,
    /// Largest response; larger ones get 507.
    pub max_response_bytes: usize,
    /// Upstream pool limits for /sql.
    pub pool: PoolLimits,
    /// Time allowed for a request's headers (also the idle time allowed
    /// between requests on a kept-alive connection).
    pub header_timeout: Duration,
    /// Time allowed for a request's body.
    pub body_timeout: Duration,
    /// Time a request's own statements may run, all together; then they
    /// are cancelled on the server (the proxy's own exchanges on the
    /// connection keep the upstream `internal_query_timeout`).
    pub statement_timeout: Duration,
    /// Peers (load balancers) whose connections begin with a PROXY
    /// protocol v2 header naming the client's address, read within
    /// `header_timeout`.
    pub proxy_protocol_from: ProxyProtocolFrom,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: DEFAULT_MAX_BYTES,
            max_request_bytes_total: DEFAULT_MAX_REQUEST_BYTES_TOTAL,
            max_response_bytes: DEFAULT_MAX_BYTES,
            pool: PoolLimits {
                max_per_key: DEFAULT_POOL_SIZE,
                ..PoolLimits::default()
            },
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            proxy_protocol_from: ProxyProtocolFrom::default(),
        }
    }
}

/// What every request handler shares.
pub struct HttpState {
    /// The wire proxy: settings, verifier, claims key, WebSocket sessions.
    pub proxy: Arc<Proxy>,
    /// Upstream connections for /sql, by server.
    pub pool: ServerPools,
    /// Limits; a reload replaces them.
    config: RwLock<Arc<HttpConfig>>,
    /// The HTTPS certificate; a reload replaces it. `None`: plain HTTP.
    acceptor: RwLock<Option<tokio_rustls::TlsAcceptor>>,
    /// Whether the listener is HTTPS (fixed until a restart).
    pub tls: bool,
    /// Request body bytes held at once, all requests together.
    bodies: sql::BodyBudget,
}

impl HttpState {
    /// State for a listener in front of `proxy`, HTTPS with `acceptor`.
    /// Run [`HttpState::maintenance`] beside it.
    pub fn new(
        proxy: Arc<Proxy>,
        config: HttpConfig,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
    ) -> Arc<Self> {
        let upstream = proxy.settings().config.upstream.clone();
        let metrics = Arc::clone(proxy.metrics());
        let gates = Arc::clone(proxy.gates());
        let pool = UpstreamPool::new("http", upstream, config.pool, metrics, gates);
        let pool = ServerPools::new(pool, Arc::clone(proxy.reported_pools()));
        Arc::new(Self {
            proxy,
            pool,
            bodies: sql::BodyBudget::new(config.max_request_bytes_total),
            config: RwLock::new(Arc::new(config)),
            tls: acceptor.is_some(),
            acceptor: RwLock::new(acceptor),
        })
    }

    /// The limits in force now.
    pub fn config(&self) -> Arc<HttpConfig> {
        Arc::clone(&self.config.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts new limits and, on an HTTPS listener, a new certificate in
    /// force for new connections and requests. Whether the listener is
    /// HTTPS and the size of the body budget stay as they were: changing
    /// them takes a restart.
    pub fn reload(&self, config: HttpConfig, acceptor: Option<tokio_rustls::TlsAcceptor>) {
        if acceptor.is_some() == self.tls {
            *self
                .acceptor
                .write()
                .unwrap_or_else(PoisonError::into_inner) = acceptor;
        }
        self.pool.set_limits(config.pool);
        *self.config.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
    }

    fn acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        self.acceptor
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Closes the `/sql` pool's idle connections on time; completes when
    /// the state is gone.
    pub fn maintenance(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        authgres_wire::reap(Arc::downgrade(self.pool.upstream()))
    }
}

/// An HTTP connection's place in the connection budget and the client
/// registry, shared with the requests on it: a WebSocket takes both over
/// for its session, a `/sql` request marks them.
#[derive(Clone, Default)]
pub struct ConnectionTicket(Arc<Mutex<Option<(Ticket, ClientHandle)>>>);

impl ConnectionTicket {
    fn new(ticket: Ticket, client: ClientHandle) -> Self {
        Self(Arc::new(Mutex::new(Some((ticket, client)))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Ticket, ClientHandle)>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request on the connection authenticated.
    pub fn authenticated(&self) {
        if let Some((ticket, _)) = self.lock().as_mut() {
            ticket.authenticated();
        }
    }

    /// Records what the connection is doing.
    pub fn set_state(&self, state: ClientState) {
        if let Some((_, client)) = self.lock().as_ref() {
            client.set_state(state);
        }
    }

    fn take(&self) -> Option<(Ticket, ClientHandle)> {
        self.lock().take()
    }
}

/// Who sent a request: the connection's client (as a PROXY header named
/// it), the load balancer that relayed it if one did, and the
/// connection's place in the client registry. Made once a connection by
/// `serve`; [`respond`] hands it to `/sql` by reference and, as a request
/// extension, to the router (which serves the WebSocket routes).
pub struct Caller {
    /// The client's address.
    pub peer: SocketAddr,
    /// The load balancer whose PROXY header named the client.
    pub relayed_by: Option<std::net::IpAddr>,
    /// The connection's ticket and registry entry.
    pub ticket: ConnectionTicket,
    /// The token the connection's last `/sql` request presented, for the
    /// next request's verification ([`authgres_jwt::LastToken`]).
    last_token: Mutex<authgres_jwt::LastToken>,
}

impl Caller {
    /// Takes the connection's last token for a request, leaving none for
    /// another request in flight meanwhile (HTTP/1 sends none).
    fn take_last_token(&self) -> authgres_jwt::LastToken {
        std::mem::take(
            &mut *self
                .last_token
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Hands the last token back after a request.
    fn put_last_token(&self, last: authgres_jwt::LastToken) {
        *self
            .last_token
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = last;
    }
}

/// The WebSocket routes: they read the [`Caller`] [`respond`] puts in
/// each request, so they are served only through it (`/sql` is answered
/// before them).
fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/v2", get(websocket))
        .route("/", get(websocket))
        .with_state(state)
}

/// Answers one request of a connection: `/sql` directly, as the hot path
/// it is (no router, no extractors, no middleware futures: they were a
/// tenth of a request's work), the rest through the router. Every
/// response gets its CORS headers ([`cors`]) and is counted by route and
/// status.
async fn respond(
    door: Arc<HttpDoor>,
    caller: Arc<Caller>,
    mut request: Request<hyper::body::Incoming>,
) -> Result<Response, std::convert::Infallible> {
    let state = &door.state;
    let preflight = request.method() == Method::OPTIONS;
    let route = match request.uri().path() {
        "/sql" => "sql",
        "/v2" | "/" => "websocket",
        _ => "other",
    };
    let mut response = match (route, request.method()) {
        ("sql", &Method::POST) => sql::handle(state, &caller, request).await,
        ("sql", &Method::OPTIONS) => StatusCode::NO_CONTENT.into_response(),
        ("sql", _) => (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, HeaderValue::from_static("POST,OPTIONS"))],
        )
            .into_response(),
        _ => {
            request.extensions_mut().insert(Arc::clone(&caller));
            match door.app.clone().oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    };
    cors(response.headers_mut(), preflight);
    state
        .proxy
        .metrics()
        .http_response(route, response.status().as_u16());
    Ok(response)
}

/// The CORS headers: every response says any origin may read it, and the
/// answer to a preflight (`OPTIONS`) that `/sql` may be posted to with the
/// Neon driver's headers. Browsers read the rest only from a preflight's
/// answer, so other responses are spared them.
fn cors(headers: &mut HeaderMap, preflight: bool) {
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    if !preflight {
        return;
    }
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, OPTIONS"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(
            "Authorization, Content-Type, Neon-Connection-String, Neon-Raw-Text-Output, \
             Neon-Array-Mode, Neon-Batch-Isolation-Level, Neon-Batch-Read-Only, \
             Neon-Batch-Deferrable, Neon-Pool-Opt-In",
        ),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
}

/// The `Sec-WebSocket-Key` of a well-formed WebSocket upgrade request.
fn upgrade_key(headers: &HeaderMap) -> Option<&str> {
    let has = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|part| part.trim().eq_ignore_ascii_case(token))
    };
    let version_13 = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    (has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade") && version_13)
        .then(|| headers.get(header::SEC_WEBSOCKET_KEY)?.to_str().ok())
        .flatten()
}

async fn websocket(
    State(state): State<Arc<HttpState>>,
    Extension(caller): Extension<Arc<Caller>>,
    mut request: Request<Body>,
) -> Response {
    let (peer, relayed_by, ticket) = (caller.peer, caller.relayed_by, &caller.ticket);
    let Some(accept) = upgrade_key(request.headers()).map(ws::accept_key) else {
        return (StatusCode::BAD_REQUEST, "expected a WebSocket upgrade").into_response();
    };
    let Some((ticket, client)) = ticket.take() else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let upgrade = hyper::upgrade::on(&mut request);
    let proxy = Arc::clone(&state.proxy);
    let tls = state.tls;
    state.proxy.drain().spawn_client(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let stream = ws::WsStream::new(TokioIo::new(upgraded));
                proxy
                    .serve_settled(stream, peer, relayed_by, tls, ticket, client)
                    .await;
            }
            Err(error) => tracing::debug!(%error, %peer, "WebSocket upgrade failed"),
        }
    });
    (
        StatusCode::SWITCHING_PROTOCOLS,
        [
            (header::UPGRADE, HeaderValue::from_static("websocket")),
            (header::CONNECTION, HeaderValue::from_static("Upgrade")),
        ],
        [(header::SEC_WEBSOCKET_ACCEPT, accept)],
    )
        .into_response()
}

/// What a connection the budget has no room for is told.
const FULL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// What a peer in `proxy_protocol_from` that sent no usable PROXY header
/// is told, in a 400 response.
const NO_PROXY_HEADER: &str =
    "this address is in [http] proxy_protocol_from: send a PROXY protocol v2 header first\n";

/// Serves HTTP (HTTPS when the state has a certificate) on `listener`
/// until the proxy drains; connections run on as tasks of the drain and
/// close once their request in flight is answered. The front door lets
/// connections in: a peer in `[http] proxy_protocol_from` has its PROXY
/// header read first, within the header timeout, and is served as the
/// client it names.
pub async fn serve(state: Arc<HttpState>, listener: tokio::net::TcpListener) {
    let app = router(Arc::clone(&state));
    front_door::serve(Arc::new(HttpDoor { state, app }), listener).await;
}

/// The HTTP listener's side of the front door.
struct HttpDoor {
    state: Arc<HttpState>,
    app: Router,
}

impl Door for HttpDoor {
    fn proxy(&self) -> &Arc<Proxy> {
        &self.state.proxy
    }

    fn transport(&self) -> Transport {
        Transport::Http
    }

    fn entry_rules(&self) -> EntryRules {
        let config = self.state.config();
        EntryRules {
            proxy_protocol_from: config.proxy_protocol_from.clone(),
            timeout: config.header_timeout,
        }
    }

    fn span(&self, _peer: SocketAddr, _relayed_by: Option<std::net::IpAddr>) -> tracing::Span {
        // Requests log with their own fields; a WebSocket session opens
        // its own span.
        tracing::Span::none()
    }

    async fn serve(self: Arc<Self>, guest: Guest) {
        let Guest {
            tcp,
            peer,
            relayed_by,
            ticket,
            client,
            ..
        } = guest;
        let _ = tcp.set_nodelay(true);
        let caller = Arc::new(Caller {
            peer,
            relayed_by,
            ticket: ConnectionTicket::new(ticket, client),
            last_token: Mutex::default(),
        });
        // A request's handles are two reference counts: the door (state
        // and router together) and the caller.
        let door = Arc::clone(&self);
        let service = hyper::service::service_fn(move |request| {
            respond(Arc::clone(&door), Arc::clone(&caller), request)
        });
        let header_timeout = self.state.config().header_timeout;
        let proxy = &self.state.proxy;
        let result = match self.state.acceptor() {
            Some(acceptor) => {
                match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        serve_connection(TokioIo::new(stream), service, header_timeout, proxy).await
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%error, %peer, "HTTPS handshake failed");
                        return;
                    }
                    Err(_) => return,
                }
            }
            None => serve_connection(TokioIo::new(tcp), service, header_timeout, proxy).await,
        };
        if let Err(error) = result {
            tracing::debug!(%error, %peer, "HTTP connection ended");
        }
    }

    async fn turn_away(self: Arc<Self>, mut tcp: tokio::net::TcpStream, why: TurnedAway) {
        let response = match why {
            TurnedAway::Full(_) => FULL.to_vec(),
            TurnedAway::ProxyHeader(_) => format!(
                "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-type: text/plain\r\n\
                 content-length: {}\r\n\r\n{NO_PROXY_HEADER}",
                NO_PROXY_HEADER.len()
            )
            .into_bytes(),
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.write_all(&response)).await;
    }
}

/// Serves one connection; a drain lets the request in flight finish and
/// then closes it (an idle one at once), a forced drain closes it now.
async fn serve_connection<I, S>(
    io: I,
    service: S,
    header_timeout: Duration,
    proxy: &Proxy,
) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<hyper::body::Incoming>,
            Response = Response,
            Error = std::convert::Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(connection);
    let drain = proxy.drain();
    tokio::select! {
        served = connection.as_mut() => return served,
        () = drain.draining() => connection.as_mut().graceful_shutdown(),
    }
    tokio::select! {
        served = connection => served,
        () = drain.closing() => Ok(()),
    }
}
