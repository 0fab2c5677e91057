//! HTTP for authgres: the `/sql` endpoint of Neon's serverless driver and
//! the Postgres protocol over WebSocket at `/v2`.
//!
//! `POST /sql` ([`sql`]) takes the driver's headers (`Neon-Connection-String`,
//! `Authorization: Bearer <jwt>`, `Neon-Array-Mode`, `Neon-Raw-Text-Output`,
//! `Neon-Batch-*`) and body (`{query, params}` or `{queries}`), verifies the
//! token, runs the statements on a pooled upstream connection with the
//! identity attached for the transaction only ([`query`]), and answers in
//! Neon's JSON shape ([`render`]). `GET /v2` upgrades to a WebSocket whose
//! binary frames carry the Postgres protocol ([`ws`]), served by the same
//! session code as TCP. Every response carries the CORS headers browsers
//! need, and `OPTIONS` answers preflight.

pub mod query;
pub mod render;
pub mod sql;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use authgres_wire::{PoolLimits, Proxy, UpstreamPool};
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State, WebSocketUpgrade};
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::TokioIo;
use tower::ServiceExt as _;

/// Default request and response limit (10 MiB), as Neon's.
pub const DEFAULT_MAX_BYTES: usize = 10 * 1024 * 1024;
/// Default upstream connections per (database, role) kept for `/sql`.
pub const DEFAULT_POOL_SIZE: usize = 20;

/// HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body; larger ones get 413.
    pub max_request_bytes: usize,
    /// Largest response; larger ones get 507.
    pub max_response_bytes: usize,
    /// Upstream pool limits for /sql.
    pub pool: PoolLimits,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_request_bytes: DEFAULT_MAX_BYTES,
            max_response_bytes: DEFAULT_MAX_BYTES,
            pool: PoolLimits {
                max_per_key: DEFAULT_POOL_SIZE,
                ..PoolLimits::default()
            },
        }
    }
}

/// What every request handler shares.
pub struct HttpState {
    /// The wire proxy: config, verifier, claims key, WebSocket sessions.
    pub proxy: Arc<Proxy>,
    /// Upstream connections for /sql.
    pub pool: Arc<UpstreamPool>,
    /// Limits.
    pub config: HttpConfig,
    /// Whether the listener is HTTPS.
    pub tls: bool,
}

impl HttpState {
    /// State for a listener in front of `proxy`. Run
    /// [`HttpState::maintenance`] beside it.
    pub fn new(proxy: Arc<Proxy>, config: HttpConfig, tls: bool) -> Arc<Self> {
        let pool = UpstreamPool::new(proxy.config().upstream.clone(), config.pool);
        Arc::new(Self {
            proxy,
            pool,
            config,
            tls,
        })
    }

    /// Closes the `/sql` pool's idle connections on time; completes when
    /// the state is gone.
    pub fn maintenance(self: &Arc<Self>) -> impl Future<Output = ()> + Send + 'static {
        authgres_wire::reap(Arc::downgrade(&self.pool))
    }
}

/// The routes.
pub fn router(state: Arc<HttpState>) -> Router {
    Router::new()
        .route("/sql", post(sql::handle).options(preflight))
        .route("/v2", get(websocket))
        .route("/", get(websocket))
        .layer(DefaultBodyLimit::max(state.config.max_request_bytes))
        .layer(axum::middleware::map_response(cors))
        .with_state(state)
}

async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn cors(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
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
    response
}

async fn websocket(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let proxy = Arc::clone(&state.proxy);
    let tls = state.tls;
    upgrade
        .on_upgrade(move |socket| proxy.serve_settled(ws::WsStream::new(socket), peer, tls))
        .into_response()
}

/// Serves HTTP (or HTTPS with `tls`) on `listener` until `shutdown`.
pub async fn serve(
    state: Arc<HttpState>,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let app = router(state);
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = authgres_wire::server::accept(&listener) => accepted,
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    app.clone().oneshot(request)
                });
            let result = match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) => serve_connection(TokioIo::new(stream), service).await,
                    Err(error) => {
                        tracing::debug!(%error, %peer, "HTTPS handshake failed");
                        return;
                    }
                },
                None => serve_connection(TokioIo::new(tcp), service).await,
            };
            if let Err(error) = result {
                tracing::debug!(%error, %peer, "HTTP connection ended");
            }
        });
    }
}

async fn serve_connection<I, S>(io: I, service: S) -> Result<(), hyper::Error>
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
    hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .with_upgrades()
        .await
}
