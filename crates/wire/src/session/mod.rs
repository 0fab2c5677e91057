//! One client connection from accept to close.
//!
//! ```text
//! negotiate ─► handshake ─► lease ─► greet ─► hold           (session pooling, none)
//! (TLS, cancel) (admission,  (upstream,  (AuthOk,  └► transactions (transaction pooling)
//!               token)       identity)   cancel key)
//! ```
//!
//! Each phase is a file: [`negotiate`] (transport and startup packets),
//! [`handshake`] (asking for the token and admission), [`lease`] (an
//! upstream connection readied with the identity), [`hold`] (relaying to
//! the end, then reset and release) and [`transactions`] (one upstream
//! connection per transaction). A [`Session`] carries what every phase
//! needs: the client stream, the bytes read ahead, where the client is.

mod handshake;
mod hold;
mod lease;
mod negotiate;
mod transactions;

use std::net::SocketAddr;
use std::sync::Arc;

use authgres_jwt::Verifier;
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tracing::Instrument as _;

use crate::admission::Transport;
use crate::budget::{Budget, Entry, Ticket};
use crate::cancel::CancelRegistry;
use crate::config::{PoolMode, ProxyConfig};
use crate::error::{Classify as _, SessionError, Severity};
use crate::identity::ClaimsKey;
use crate::log_limit::LogLimiter;
use crate::pool::UpstreamPool;
use crate::proto::backend;
use crate::proto::negotiate::Startup;
use crate::upstream;
use negotiate::{Failed, Opened};

/// How long a refused client is given to read its ErrorResponse.
const ERROR_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A client stream: TCP, TLS, WebSocket, or an in-memory pipe in tests.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for S {}

/// The proxy: its settings and the state all sessions share.
pub struct Proxy {
    config: ProxyConfig,
    verifier: Arc<Verifier>,
    claims_key: ClaimsKey,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// Upstream connections, when any database is pooled.
    pool: Option<Arc<UpstreamPool>>,
    cancels: CancelRegistry,
    /// Client connections held, by every listener.
    budget: Arc<Budget>,
    /// Log lines about refused clients, limited.
    refusals: LogLimiter,
}

impl Proxy {
    /// A proxy with these settings. Run [`Proxy::maintenance`] beside it.
    pub fn new(
        config: ProxyConfig,
        verifier: Arc<Verifier>,
        claims_key: ClaimsKey,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let pool = config
            .pools()
            .then(|| UpstreamPool::new(config.upstream.clone(), config.pool_limits));
        Self {
            budget: Budget::new(config.connections),
            config,
            verifier,
            claims_key,
            tls,
            pool,
            cancels: CancelRegistry::default(),
            refusals: LogLimiter::default(),
        }
    }

    /// The connection budget every listener draws from.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Logs that a connection was refused before it became a session (at
    /// info, limited: floods of refusals make a few lines).
    pub fn log_refusal(&self, peer: SocketAddr, why: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.refusals.allow(Instant::now()) {
            tracing::info!(%peer, reason = %why, suppressed, "connection refused");
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// The token verifier.
    pub fn verifier(&self) -> &Arc<Verifier> {
        &self.verifier
    }

    /// The key that signs claims for SQL.
    pub fn claims_key(&self) -> &ClaimsKey {
        &self.claims_key
    }

    /// The upstream pool of the wire sessions, if any database is pooled.
    pub fn pool(&self) -> Option<&Arc<UpstreamPool>> {
        self.pool.as_ref()
    }

    /// Background work the proxy needs while it runs: closing idle
    /// upstream connections on time. Completes when the proxy is gone.
    pub fn maintenance(self: &Arc<Self>) -> impl std::future::Future<Output = ()> + Send + 'static {
        let pool = self.pool.as_ref().map(Arc::downgrade);
        async move {
            if let Some(pool) = pool {
                crate::pool::reap(pool).await;
            }
        }
    }

    /// Serves one TCP client to the end; `entry` is its place in the
    /// connection budget.
    pub async fn serve_tcp(self: Arc<Self>, mut tcp: TcpStream, peer: SocketAddr, entry: Entry) {
        let span = session_span(peer, Transport::Wire);
        async move {
            let deadline = Instant::now() + self.config.auth_timeout;
            let ticket = match entry.admit(deadline).await {
                Ok(ticket) => ticket,
                Err(full) => {
                    self.log_refusal(peer, &full);
                    refuse(&mut tcp, &SessionError::TooManyConnections).await;
                    return;
                }
            };
            crate::transport::tune(&tcp, self.config.tcp_keepalive);
            let opened = timeout_at(deadline, negotiate::over_tcp(tcp, self.tls.as_ref())).await;
            let result = match opened {
                Ok(opened) => {
                    self.open(opened, peer, Transport::Wire, deadline, ticket)
                        .await
                }
                Err(_) => Err(SessionError::AuthTimeout(self.config.auth_timeout)),
            };
            self.log_end(&result);
        }
        .instrument(span)
        .await;
    }

    /// Serves a client on a stream whose transport is settled (a
    /// WebSocket); `encrypted` tells whether it runs over TLS, `ticket` is
    /// its place in the connection budget.
    pub async fn serve_settled<S>(
        self: Arc<Self>,
        stream: S,
        peer: SocketAddr,
        encrypted: bool,
        ticket: Ticket,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let span = session_span(peer, Transport::WebSocket);
        async move {
            let deadline = Instant::now() + self.config.auth_timeout;
            let opened = timeout_at(deadline, negotiate::settled(stream, encrypted)).await;
            let result = match opened {
                Ok(opened) => {
                    self.open(opened, peer, Transport::WebSocket, deadline, ticket)
                        .await
                }
                Err(_) => Err(SessionError::AuthTimeout(self.config.auth_timeout)),
            };
            self.log_end(&result);
        }
        .instrument(span)
        .await;
    }

    /// Logs how a session ended, as loudly as its classification says.
    fn log_end(&self, result: &Result<(), SessionError>) {
        match result {
            Ok(()) => tracing::debug!("session ended"),
            Err(error) => self.report(error),
        }
    }

    /// Logs why a session failed, as loudly as its classification says;
    /// clients' mistakes are limited like other refusals. Called before
    /// the client is told, so the log never lags what the client saw.
    fn report(&self, error: &SessionError) {
        let reason = error.label();
        match error.severity() {
            Severity::Routine => tracing::debug!(%error, reason, "session ended"),
            Severity::Client => {
                if let Some(suppressed) = self.refusals.allow(Instant::now()) {
                    tracing::info!(%error, reason, suppressed, "session refused");
                }
            }
            Severity::Service => tracing::warn!(%error, reason, "session failed"),
        }
    }

    /// After the negotiation: a session, a cancel, or nothing.
    async fn open<S: ClientIo>(
        &self,
        opened: Result<Opened<S>, Failed<S>>,
        peer: SocketAddr,
        transport: Transport,
        auth_deadline: Instant,
        ticket: Ticket,
    ) -> Result<(), SessionError> {
        match opened {
            Ok(Opened::Session {
                stream,
                inbox,
                startup,
                encrypted,
            }) => {
                let session = Session {
                    proxy: self,
                    client: stream,
                    inbox,
                    peer,
                    transport,
                    encrypted,
                    auth_deadline,
                    ticket,
                };
                session.run(startup).await
            }
            Ok(Opened::Cancel { pid, key }) => {
                self.forward_cancel(pid, &key).await;
                Ok(())
            }
            Ok(Opened::Closed) => Ok(()),
            Err(Failed { stream, error }) => {
                self.report(&error);
                if let Some(mut stream) = stream {
                    refuse(&mut stream, &error).await;
                }
                Ok(())
            }
        }
    }

    /// Forwards a client's CancelRequest to the backend serving its
    /// session now, if the key is one this proxy handed out.
    async fn forward_cancel(&self, pid: i32, key: &[u8]) {
        let Some(target) = self.cancels.lookup(pid, key) else {
            tracing::info!("cancel request with an unknown key ignored");
            return;
        };
        // Held while forwarding: the session cannot hand its backend to
        // another client until this cancel is delivered.
        let target = target.lock().await;
        let Some(upstream) = target.as_ref() else {
            tracing::info!("cancel request for a client between transactions ignored");
            return;
        };
        match upstream::cancel(&self.config.upstream, upstream).await {
            Ok(()) => tracing::info!("cancel request forwarded"),
            Err(error) => tracing::warn!(%error, "cancel request could not be forwarded"),
        }
    }
}

/// One client's session after its StartupMessage.
pub(crate) struct Session<'p, S> {
    proxy: &'p Proxy,
    client: S,
    /// What the client sent past the last message handled.
    inbox: BytesMut,
    peer: SocketAddr,
    transport: Transport,
    encrypted: bool,
    /// When the client must have authenticated.
    auth_deadline: Instant,
    /// Its place in the connection budget, marked once it authenticates.
    ticket: Ticket,
}

impl<S: ClientIo> Session<'_, S> {
    /// The rest of the session's life, from the StartupMessage on.
    async fn run(mut self, startup: Startup) -> Result<(), SessionError> {
        // Boxed, as are the lease and the rare paths after it: token
        // verification and upstream logins are large futures, and an idle
        // session's task should not carry their size.
        let login = timeout_at(self.auth_deadline, Box::pin(self.handshake(startup))).await;
        let login = match login {
            Ok(Ok(login)) => login,
            Ok(Err(error)) => return self.refused(error).await,
            Err(_) => {
                let waited = self.proxy.config.auth_timeout;
                return self.refused(SessionError::AuthTimeout(waited)).await;
            }
        };
        let mode = self.proxy.config.pool_mode_for(&login.admitted.database);
        let leased = match Box::pin(lease::lease(self.proxy, &login, mode)).await {
            Ok(leased) => leased,
            Err(error) => return self.refused(error).await,
        };
        let authenticated = login.admitted.identity.is_some();
        let greeted = self.greet(leased, mode, authenticated).await?;
        match mode {
            PoolMode::Transaction => transactions::serve(self, login, greeted).await,
            PoolMode::Session | PoolMode::None => hold::serve(self, &login, greeted).await,
        }
    }

    /// Reports why the session is refused, tells the client, and ends the
    /// session.
    async fn refused(mut self, error: SessionError) -> Result<(), SessionError> {
        self.proxy.report(&error);
        refuse(&mut self.client, &error).await;
        Ok(())
    }
}

/// The span of one session: fields filled in as they become known.
fn session_span(peer: SocketAddr, transport: Transport) -> tracing::Span {
    tracing::info_span!(
        "session",
        %peer,
        transport = transport.label(),
        user = tracing::field::Empty,
        db = tracing::field::Empty,
        sub = tracing::field::Empty
    )
}

/// Sends the client-safe form of `error` (if any) and closes, best effort.
pub(crate) async fn refuse<S>(stream: &mut S, error: &SessionError)
where
    S: AsyncWrite + Unpin,
{
    let Some(view) = error.client_view() else {
        return;
    };
    let mut out = BytesMut::new();
    backend::fatal_error(view.code, &view.message, view.hint, &mut out);
    let _ = tokio::time::timeout(ERROR_WRITE_TIMEOUT, async {
        write_flush(stream, &out).await?;
        stream.shutdown().await
    })
    .await;
}

/// Writes and flushes: streams that buffer (TLS, WebSocket frames) must not
/// hold back a reply the peer is waiting for.
pub(crate) async fn write_flush<S>(stream: &mut S, bytes: &[u8]) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    stream.write_all(bytes).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests;
