//! The admin listener (`[admin] address`): what operators and their tools
//! ask of a running proxy.
//!
//! - `GET /metrics`: Prometheus text format (version 0.0.4).
//! - `GET /healthz`: 200 while the process serves HTTP at all (liveness).
//! - `GET /readyz`: 200 when this instance should get new clients: it is
//!   not draining. What every instance shares (the upstream accepting
//!   connections, each provider's keys loaded or within their staleness)
//!   does not make it unready: the body says `"degraded": true` and which
//!   check failed, and `authgres_degraded` is 1. Taking every instance out
//!   of a load balancer because the database is down would only turn a
//!   Postgres error naming the cause (08001) into a refused connection,
//!   and delay recovery by the probes' period. `GET /readyz?strict` is
//!   503 when degraded too, for a setup that has somewhere else to send
//!   clients (another region's instances).
//! - `GET /pools`, `GET /clients`: JSON, for the questions pgbouncer's
//!   `SHOW POOLS` and `SHOW CLIENTS` answer.
//! - `GET /identities`, `GET /tenants`: JSON, the heaviest users and
//!   tenants over the `[metrics]` window (`SHOW IDENTITIES`, `SHOW
//!   TENANTS`); `?limit=N` lists the first N (default 100).
//! - `POST /reload`: the same as SIGHUP; answers what took effect or why
//!   the new config was refused.
//!
//! It has no authentication: bind it to loopback, a private network, or a
//! Unix socket (`unix:PATH`, mode 0600). It has a connection budget and
//! timeouts of its own ([`Limits`]), so idle or slow admin connections
//! cannot take the file descriptors clients need, and `POST /reload`
//! refuses requests a browser marks as coming from a web page.

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use authgres_wire::control::ControlRequest;
use authgres_wire::{LogLimiter, Proxy};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::handover::PrivateSocket;

/// How long an upstream probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a probe's answer is reused: a probe storm makes one
/// connection per interval.
const PROBE_REUSE: Duration = Duration::from_secs(1);
/// How long `POST /reload` waits for the reload to be done.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection the budget has no room for may take to be told.
const REFUSE_TIMEOUT: Duration = Duration::from_millis(100);
/// How long to wait before accepting again after a failed accept (out of
/// file descriptors, most likely).
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// What a connection the budget has no room for is told.
const FULL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// The admin listener's own limits (`[admin]`); the defaults are the
/// config's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections held at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Time to send a request's headers, or on a kept-alive connection to
    /// start the next one.
    pub header_timeout: Duration,
    /// A connection with nothing read or written this long is closed.
    pub idle_timeout: Duration,
    /// `Host` names accepted besides IP addresses and `localhost`
    /// ([`host_refusal`]).
    pub allowed_hosts: Vec<String>,
    /// Whether every route but the health probes needs a console user's
    /// credentials (`/console` always does).
    pub require_auth: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Probes, a scraper and an operator, many times over.
            max_connections: 64,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            allowed_hosts: Vec::new(),
            require_auth: false,
        }
    }
}

/// Why a request's `Host` is refused, if it is: a web page whose DNS name
/// was rebound to this host sends its own name, and its reads of
/// `/clients` or `/metrics` count as same-origin to the browser (no
/// `Origin`, `Sec-Fetch-Site: same-origin`). Operators' tools and
/// scrapers give an address, `localhost`, or a name listed in
/// `[admin] allowed_hosts`; a request without `Host` (HTTP/1.0) is no
/// browser's.
pub fn host_refusal(host: Option<&str>, allowed: &[String]) -> Option<String> {
    let host = host?;
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    let accepted = name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(name));
    (!accepted).then(|| {
        format!(
            "refused: Host {host:?} is neither an address, localhost, nor a name in \
             [admin] allowed_hosts (a web page can rebind its own name to this host)"
        )
    })
}

impl Limits {
    /// The `[admin]` keys that differ in `new`.
    pub fn changed(&self, new: &Self) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.max_connections != new.max_connections {
            changed.push("[admin] max_connections");
        }
        if self.header_timeout != new.header_timeout {
            changed.push("[admin] header_timeout");
        }
        if self.idle_timeout != new.idle_timeout {
            changed.push("[admin] idle_timeout");
        }
        if self.allowed_hosts != new.allowed_hosts {
            changed.push("[admin] allowed_hosts");
        }
        if self.require_auth != new.require_auth {
            changed.push("[admin] require_auth");
        }
        changed
    }
}

/// The path of an `[admin] address` of the form `unix:PATH`.
pub fn unix_path(address: &str) -> Option<&Path> {
    address.strip_prefix("unix:").map(Path::new)
}

/// Where the admin listener accepts.
pub enum Listener {
    /// `host:port`.
    Tcp(TcpListener),
    /// `unix:PATH`, owner-only.
    Unix(PrivateSocket),
}

/// An accepted admin connection, TCP or Unix.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

impl Listener {
    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match self {
            Self::Tcp(tcp) => tcp
                .local_addr()
                .map_or_else(|error| error.to_string(), |a| a.to_string()),
            Self::Unix(unix) => format!("unix:{}", unix.path().display()),
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(match self {
            Self::Tcp(tcp) => {
                let (stream, _) = tcp.accept().await?;
                let _ = stream.set_nodelay(true);
                Box::new(stream)
            }
            Self::Unix(unix) => Box::new(unix.listener.accept().await?.0),
        })
    }
}

/// What the admin routes share.
pub struct Admin {
    proxy: Arc<Proxy>,
    registry: Registry,
    reloads: mpsc::Sender<ControlRequest>,
    /// The last upstream probe: when, and what it found.
    probe: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Admin {
    /// The admin side of `proxy`, exposing `registry`; reloads are asked
    /// of whoever holds the other end of `reloads`.
    pub fn new(
        proxy: Arc<Proxy>,
        registry: Registry,
        reloads: mpsc::Sender<ControlRequest>,
    ) -> Self {
        Self {
            proxy,
            registry,
            reloads,
            probe: Mutex::new(None),
        }
    }

    /// Whether the upstream accepts connections, probed at most once per
    /// [`PROBE_REUSE`].
    async fn upstream(&self) -> Result<(), String> {
        if let Some((at, found)) = &*self.probe.lock().unwrap_or_else(PoisonError::into_inner)
            && at.elapsed() < PROBE_REUSE
        {
            return found.clone();
        }
        let address = self.proxy.settings().config.upstream.address();
        let found = match tokio::time::timeout(PROBE_TIMEOUT, probe(&address)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("{address}: {error}")),
            Err(_) => Err(format!("{address}: no answer within {PROBE_TIMEOUT:?}")),
        };
        *self.probe.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((Instant::now(), found.clone()));
        found
    }
}

/// Asks the server whether it takes TLS (an SSLRequest): any answer means
/// the postmaster is up and accepting. No backend starts and nothing is
/// logged, unlike a login attempt.
async fn probe(address: &str) -> std::io::Result<()> {
    const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(&SSL_REQUEST).await?;
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await?;
    match answer[0] {
        b'S' | b'N' => Ok(()),
        other => Err(std::io::Error::other(format!(
            "unexpected answer {other:#04x} to an SSLRequest"
        ))),
    }
}

/// The routes. Those that show who is connected or change anything
/// answer only requests whose `Host` passes [`host_refusal`]; health
/// checks answer whatever name a balancer's probe gives.
fn router(admin: Arc<Admin>, allowed_hosts: Vec<String>, require_auth: bool) -> Router {
    let allowed_hosts: Arc<[String]> = allowed_hosts.into();
    let credentials = Arc::clone(&admin.proxy);
    Router::new()
        .route("/metrics", get(metrics))
        .route("/pools", get(pools))
        .route("/clients", get(clients))
        .route("/identities", get(identities))
        .route("/tenants", get(tenants))
        .route("/reload", post(reload))
        .route_layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let proxy = Arc::clone(&credentials);
                async move {
                    if !require_auth {
                        return next.run(request).await;
                    }
                    let needs_admin = request.method() == axum::http::Method::POST;
                    match crate::console_api::authorize(&proxy, request.headers(), needs_admin) {
                        Ok(_) => next.run(request).await,
                        Err(refused) => refused.into_response(),
                    }
                }
            },
        ))
        .route("/console", post(console))
        .route_layer(axum::middleware::from_fn(
            move |request: axum::extract::Request, next: axum::middleware::Next| {
                let allowed_hosts = Arc::clone(&allowed_hosts);
                async move {
                    let host = request
                        .headers()
                        .get(header::HOST)
                        .and_then(|host| host.to_str().ok())
                        .or_else(|| request.uri().authority().map(|a| a.as_str()));
                    match host_refusal(host, &allowed_hosts) {
                        Some(why) => (StatusCode::FORBIDDEN, why).into_response(),
                        None => next.run(request).await,
                    }
                }
            },
        ))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(admin)
}

/// Serves the admin routes on `listener` until the process exits, or
/// until `stop` turns true (a successor took the socket over), within
/// `limits`.
pub async fn serve(
    admin: Admin,
    listener: Listener,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let app = router(
        Arc::new(admin),
        limits.allowed_hosts.clone(),
        limits.require_auth,
    );
    let budget = Arc::new(Semaphore::new(limits.max_connections));
    let refusals = LogLimiter::default();
    loop {
        let accepted = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        let mut stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                tracing::warn!(%error, "the admin listener could not accept");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&budget).try_acquire_owned() else {
            if let Some(suppressed) = refusals.allow(Instant::now()) {
                tracing::warn!(
                    max_connections = limits.max_connections,
                    suppressed,
                    "admin connection refused: [admin] max_connections are open"
                );
            }
            let _ = tokio::time::timeout(REFUSE_TIMEOUT, stream.write_all(FULL)).await;
            continue;
        };
        let app = app.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let activity = Activity::new();
            let io = TokioIo::new(Watched {
                inner: stream,
                activity: Arc::clone(&activity),
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(io, TowerToHyperService::new(app));
            tokio::pin!(connection);
            tokio::select! {
                served = connection.as_mut() => {
                    if let Err(error) = served {
                        tracing::debug!(%error, "admin connection ended");
                    }
                }
                () = activity.idle_for(limits.idle_timeout) => {
                    tracing::debug!("admin connection idle: closed");
                }
                _ = stop.wait_for(|stop| *stop) => {}
            }
        });
    }
}

/// When a connection last moved a byte.
struct Activity {
    start: Instant,
    /// Milliseconds since `start`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            last: AtomicU64::new(0),
        })
    }

    fn moved(&self) {
        let since = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(since, Ordering::Relaxed);
    }

    /// Completes once no byte has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.last.load(Ordering::Relaxed);
            tokio::time::sleep_until(self.start + Duration::from_millis(last) + idle).await;
            if self.last.load(Ordering::Relaxed) == last {
                return;
            }
        }
    }
}

/// A stream that notes when it last read or wrote a byte.
struct Watched {
    inner: Box<dyn Stream>,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.moved();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(written)) = &polled
            && *written > 0
        {
            self.activity.moved();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
async fn metrics(State(admin): State<Arc<Admin>>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut text, &admin.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()).into_response(),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(admin): State<Arc<Admin>>, uri: axum::http::Uri) -> Response {
    let strict = uri.query().is_some_and(|query| {
        query
            .split('&')
            .any(|pair| pair == "strict" || pair.starts_with("strict="))
    });
    let draining = admin.proxy.drain().is_unready();
    let keys: Vec<_> = admin
        .proxy
        .settings()
        .verifier
        .key_status(SystemTime::now())
        .into_iter()
        .filter(|status| status.fetches_keys)
        .map(|status| (status.provider, status.usable))
        .collect();
    let keys_ready = keys.iter().all(|(_, usable)| *usable);
    // A draining proxy is not ready whatever the upstream says: skip the probe.
    let upstream = if draining {
        Err("not probed while draining".to_owned())
    } else {
        admin.upstream().await
    };
    let shared_ok = keys_ready && upstream.is_ok();
    let degraded = !draining && !shared_ok;
    if !draining {
        admin.proxy.metrics().set_degraded(degraded);
    }
    let ready = !draining && (!strict || !degraded);
    let body = json!({
        "ready": ready,
        "degraded": degraded,
        "draining": draining,
        "keys": keys.iter().map(|(provider, usable)| json!({"provider": provider, "usable": usable})).collect::<Vec<_>>(),
        "upstream": match &upstream { Ok(()) => "reachable".to_owned(), Err(why) => why.clone() },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn pools(State(admin): State<Arc<Admin>>) -> Response {
    let pools: Vec<_> = admin.proxy.pools().iter().map(|p| p.snapshot()).collect();
    axum::Json(json!({ "pools": pools })).into_response()
}

async fn clients(State(admin): State<Arc<Admin>>) -> Response {
    axum::Json(json!({ "clients": admin.proxy.clients().snapshot() })).into_response()
}

/// Rows `/identities` and `/tenants` list unless `?limit=` says otherwise.
const DEFAULT_TOP: usize = 100;

/// `?limit=N` of a listing.
#[derive(Debug, serde::Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn identities(admin: State<Arc<Admin>>, limit: axum::extract::Query<Limit>) -> Response {
    heaviest(
        admin,
        limit,
        "identities",
        authgres_wire::Metrics::top_identities,
    )
}

async fn tenants(admin: State<Arc<Admin>>, limit: axum::extract::Query<Limit>) -> Response {
    heaviest(admin, limit, "tenants", authgres_wire::Metrics::top_tenants)
}

/// A heaviest-first listing under `key`, `?limit=` rows long.
fn heaviest(
    State(admin): State<Arc<Admin>>,
    axum::extract::Query(limit): axum::extract::Query<Limit>,
    key: &str,
    top: fn(&authgres_wire::Metrics, usize) -> Vec<authgres_wire::IdentityUsage>,
) -> Response {
    let rows = top(admin.proxy.metrics(), limit.limit.unwrap_or(DEFAULT_TOP));
    axum::Json(json!({ key: rows })).into_response()
}

/// Why a request is refused as one a web page made, if it is: a browser
/// sends `Origin` with every POST a page makes (a form, `fetch`, a page
/// that rebinds its DNS name to this host), and `Sec-Fetch-Site` says
/// whose page it was. Operators' tools send neither.
fn from_a_web_page(headers: &HeaderMap) -> Option<String> {
    if let Some(origin) = headers.get(header::ORIGIN) {
        return Some(format!(
            "refused: a request with an Origin header ({}) comes from a web page",
            String::from_utf8_lossy(origin.as_bytes())
        ));
    }
    match headers.get("sec-fetch-site").map(|site| site.as_bytes()) {
        None | Some(b"same-origin" | b"none") => None,
        Some(site) => Some(format!(
            "refused: Sec-Fetch-Site {} marks a request made by a web page",
            String::from_utf8_lossy(site)
        )),
    }
}

/// A reload's refusal, as JSON.
fn not_reloaded(status: StatusCode, error: &str) -> Response {
    (
        status,
        axum::Json(json!({"reloaded": false, "error": error})),
    )
        .into_response()
}

/// `POST /console`: one console command, answered in JSON.
async fn console(State(admin): State<Arc<Admin>>, headers: HeaderMap, body: String) -> Response {
    if let Some(why) = from_a_web_page(&headers) {
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    crate::console_api::run(&admin.proxy, &headers, &body).await
}

async fn reload(State(admin): State<Arc<Admin>>, headers: HeaderMap) -> Response {
    if let Some(why) = from_a_web_page(&headers) {
        return not_reloaded(StatusCode::FORBIDDEN, &why);
    }
    const DRAINING: &str = "the proxy is draining: nothing is reloaded; \
                            start the new process with the new configuration";
    if admin.proxy.drain().is_unready() {
        return not_reloaded(StatusCode::SERVICE_UNAVAILABLE, DRAINING);
    }
    let (reply, outcome) = oneshot::channel();
    // The server stops taking reloads when it drains: the request or its
    // reply is dropped, and the answer says so.
    if admin
        .reloads
        .send(ControlRequest::Reload(reply))
        .await
        .is_err()
    {
        return not_reloaded(StatusCode::SERVICE_UNAVAILABLE, DRAINING);
    }
    match tokio::time::timeout(RELOAD_TIMEOUT, outcome).await {
        Ok(Ok(Ok(needs_restart))) => {
            axum::Json(json!({"reloaded": true, "needs_restart": needs_restart})).into_response()
        }
        Ok(Ok(Err(error))) => not_reloaded(StatusCode::UNPROCESSABLE_ENTITY, &error),
        Ok(Err(_)) => not_reloaded(StatusCode::SERVICE_UNAVAILABLE, DRAINING),
        Err(_) => not_reloaded(
            StatusCode::SERVICE_UNAVAILABLE,
            "no answer from the reload in time: see the proxy's log",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::host_refusal;

    #[test]
    fn addresses_localhost_and_listed_names_pass_and_other_names_do_not() {
        let allowed = vec!["authgres.internal".to_owned()];
        for host in [
            "127.0.0.1:9432",
            "[::1]:9432",
            "10.1.2.3",
            "localhost",
            "LOCALHOST:80",
            "authgres.internal:9432",
        ] {
            assert_eq!(host_refusal(Some(host), &allowed), None, "{host}");
        }
        assert_eq!(host_refusal(None, &allowed), None);
        for host in [
            "attacker.example:9432",
            "127.0.0.1.nip.io",
            "localhost.evil",
            "",
        ] {
            assert!(host_refusal(Some(host), &allowed).is_some(), "{host}");
        }
    }
}
