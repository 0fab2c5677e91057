//! The admin listener (`[admin] address`): what operators and their tools
//! ask of a running proxy.
//!
//! - `GET /metrics`: Prometheus text format (version 0.0.4).
//! - `GET /healthz`: 200 while the process serves HTTP at all (liveness).
//! - `GET /readyz`: 200 when the proxy should get new clients: not
//!   draining, every provider's keys loaded (or within their staleness),
//!   the upstream accepting connections; else 503. The body says which
//!   check failed.
//! - `GET /pools`, `GET /clients`: JSON, for the questions pgbouncer's
//!   `SHOW POOLS` and `SHOW CLIENTS` answer.
//! - `POST /reload`: the same as SIGHUP; answers what took effect or why
//!   the new config was refused.
//!
//! It has no authentication: bind it to loopback or a private network.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use authgres_wire::Proxy;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// How long an upstream probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a probe's answer is reused: a probe storm makes one
/// connection per interval.
const PROBE_REUSE: Duration = Duration::from_secs(1);

/// A reload asked for over HTTP, with where to send the outcome.
pub struct ReloadRequest {
    /// The settings that need a restart, or why the config was refused.
    pub reply: oneshot::Sender<Result<Vec<&'static str>, String>>,
}

/// What the admin routes share.
pub struct Admin {
    proxy: Arc<Proxy>,
    registry: Registry,
    reloads: mpsc::Sender<ReloadRequest>,
    /// The last upstream probe: when, and what it found.
    probe: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Admin {
    /// The admin side of `proxy`, exposing `registry`; reloads are asked
    /// of whoever holds the other end of `reloads`.
    pub fn new(
        proxy: Arc<Proxy>,
        registry: Registry,
        reloads: mpsc::Sender<ReloadRequest>,
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

/// The routes.
fn router(admin: Arc<Admin>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/pools", get(pools))
        .route("/clients", get(clients))
        .route("/reload", post(reload))
        .with_state(admin)
}

/// Serves the admin routes on `listener` until the process exits, or
/// until `stop` turns true (a successor took the socket over).
pub async fn serve(admin: Admin, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let stopped = async move {
        let _ = stop.wait_for(|stop| *stop).await;
    };
    let served = axum::serve(listener, router(Arc::new(admin)))
        .with_graceful_shutdown(stopped)
        .await;
    if let Err(error) = served {
        tracing::error!(%error, "the admin listener failed");
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

async fn readyz(State(admin): State<Arc<Admin>>) -> Response {
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
    let ready = !draining && keys_ready && upstream.is_ok();
    let body = json!({
        "ready": ready,
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

async fn reload(State(admin): State<Arc<Admin>>) -> Response {
    let (reply, outcome) = oneshot::channel();
    if admin.reloads.send(ReloadRequest { reply }).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "the proxy is shutting down\n",
        )
            .into_response();
    }
    match outcome.await {
        Ok(Ok(needs_restart)) => {
            axum::Json(json!({"reloaded": true, "needs_restart": needs_restart})).into_response()
        }
        Ok(Err(error)) => (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"reloaded": false, "error": error})),
        )
            .into_response(),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the proxy is shutting down\n",
        )
            .into_response(),
    }
}
