//! One client connection from accept to close: transport negotiation,
//! startup, token check, upstream login, identity attach, relay.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use authgres_jwt::{Identity, Verifier};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tracing::Instrument as _;

use crate::backend;
use crate::cancel::{CancelGuard, CancelRegistry, UpstreamKey};
use crate::error::SessionError;
use crate::frontend::{self, StartupPacket};
use crate::identity::ClaimsKey;
use crate::params::forwarded_parameters;
use crate::pool::{CheckoutError, PoolLimits, Pooled, UpstreamPool};
use crate::relay::{self, Relay, Stop};
use crate::track::Tracker;
use crate::transaction::{self, PooledClient};
use crate::transport::{ALPN_POSTGRESQL, ClientStream, TLS_HANDSHAKE_BYTE};
use crate::upstream::{self, UpstreamConfig};

/// How long a refused client is given to read its ErrorResponse.
const ERROR_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// A database role clients may log in as.
#[derive(Debug, Clone)]
pub struct RoleConfig {
    /// The proxy's password for this role upstream (`None`: trust).
    pub password: Option<String>,
    /// Whether a verified token is required (`false`: anonymous access,
    /// no password asked, no identity attached).
    pub requires_token: bool,
}

/// Whether a token may travel over an unencrypted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CleartextTokens {
    /// Always allowed.
    Allow,
    /// Allowed only from loopback peers (default).
    LoopbackOnly,
    /// Never: token logins need TLS.
    Refuse,
}

/// Everything a session needs to know, fixed at startup.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The real Postgres.
    pub upstream: UpstreamConfig,
    /// Roles served, by name.
    pub roles: HashMap<String, RoleConfig>,
    /// Databases served; empty serves any.
    pub databases: Vec<String>,
    /// Time from accept until the password must have arrived.
    pub auth_timeout: Duration,
    /// Maximum concurrent client connections.
    pub max_connections: usize,
    /// Policy for tokens over unencrypted connections.
    pub cleartext_tokens: CleartextTokens,
    /// End sessions at the first transaction boundary after their token's
    /// `exp` (by default a session outlives its token, like any password
    /// login).
    pub enforce_token_expiry: bool,
    /// How clients share upstream connections, unless their database has
    /// its own mode in `pool_mode_by_database`.
    pub pool_mode: PoolMode,
    /// Per-database pool modes.
    pub pool_mode_by_database: HashMap<String, PoolMode>,
    /// Limits of the upstream pool.
    pub pool_limits: PoolLimits,
}

impl ProxyConfig {
    /// The pool mode of `database`.
    pub fn pool_mode_for(&self, database: &str) -> PoolMode {
        self.pool_mode_by_database
            .get(database)
            .copied()
            .unwrap_or(self.pool_mode)
    }
}

/// How a database's clients share upstream connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// Every client gets a login of its own, closed when it leaves.
    None,
    /// A client holds a connection for its whole session; it is reset and
    /// kept for the next client when the client leaves.
    Session,
    /// A client holds a connection for one transaction at a time.
    Transaction,
}

/// The proxy: configuration plus shared state of all sessions.
pub struct Proxy {
    config: ProxyConfig,
    pool: Option<Arc<UpstreamPool>>,
    verifier: Arc<Verifier>,
    claims_key: ClaimsKey,
    tls: Option<tokio_rustls::TlsAcceptor>,
    cancels: CancelRegistry,
}

/// The upstream connection a session uses.
enum Lease {
    /// From the pool: reset and returned when the client leaves cleanly.
    Pooled(Pooled),
    /// A login of its own, closed when the client leaves.
    Own(upstream::Upstream),
}

impl Lease {
    fn conn(&mut self) -> &mut upstream::Upstream {
        match self {
            Self::Pooled(pooled) => pooled.conn(),
            Self::Own(upstream) => upstream,
        }
    }
}

/// What the client asked for in its startup message.
struct Startup {
    role: String,
    database: String,
    forwarded: Vec<(String, String)>,
}

impl Startup {
    /// The forwarded parameters as settings to apply with `set_config`,
    /// `options` broken into its `-c name=value` assignments.
    fn settings(&self) -> Vec<(String, String)> {
        let mut settings = Vec::new();
        for (name, value) in &self.forwarded {
            if name == "options" {
                settings.extend(crate::params::option_assignments(value));
            } else {
                settings.push((name.clone(), value.clone()));
            }
        }
        settings
    }
}

/// How a pooled connection is readied for a client.
enum Readying<'a> {
    /// At login: the identity attached and the startup settings applied,
    /// after a reset if anyone used the connection before.
    Login {
        claims: Option<&'a str>,
        settings: &'a [(String, String)],
    },
    /// For a transaction-pooled client's next transaction: its session
    /// restored unless the connection holds it already.
    Transaction(&'a PooledClient),
}

/// The error a client sees when the pool has no connection for it.
fn checkout_error(error: CheckoutError) -> SessionError {
    match error {
        CheckoutError::Upstream(error) => SessionError::Upstream(error),
        CheckoutError::Timeout(database, role, waited) => SessionError::PoolExhausted {
            database,
            role,
            waited,
        },
    }
}

impl Proxy {
    /// A proxy with these settings.
    pub fn new(
        config: ProxyConfig,
        verifier: Arc<Verifier>,
        claims_key: ClaimsKey,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        Self {
            pool: (config.pool_mode != PoolMode::None
                || config
                    .pool_mode_by_database
                    .values()
                    .any(|m| *m != PoolMode::None))
            .then(|| UpstreamPool::new(config.upstream.clone(), config.pool_limits)),
            config,
            verifier,
            claims_key,
            tls,
            cancels: CancelRegistry::default(),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// The token verifier.
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// The key that signs claims for SQL.
    pub fn claims_key(&self) -> &ClaimsKey {
        &self.claims_key
    }

    /// Serves a client on a stream whose transport is already settled (a
    /// WebSocket): SSLRequest and GSSENCRequest are declined with 'N',
    /// then the session proceeds as over TCP. `is_tls` tells whether the
    /// transport underneath is encrypted.
    pub async fn handle_stream<S>(self: Arc<Self>, mut stream: S, peer: SocketAddr, is_tls: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let span = tracing::info_span!(
            "session",
            %peer,
            transport = "websocket",
            user = tracing::field::Empty,
            db = tracing::field::Empty,
            sub = tracing::field::Empty
        );
        async move {
            let deadline = Instant::now() + self.config.auth_timeout;
            let mut buf = BytesMut::with_capacity(1024);
            let parameters = loop {
                let packet =
                    match timeout_at(deadline, read_startup_packet(&mut stream, &mut buf)).await {
                        Ok(Ok(Some(packet))) => packet,
                        Ok(Ok(None)) => return,
                        Ok(Err(error)) => {
                            refuse(&mut stream, &error).await;
                            tracing::info!(%error, "session refused");
                            return;
                        }
                        Err(_) => return,
                    };
                match packet {
                    StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                        if write_flush(&mut stream, &[backend::REFUSE_ENCRYPTION])
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    StartupPacket::CancelRequest { pid, key } => {
                        self.forward_cancel(pid, key).await;
                        return;
                    }
                    StartupPacket::Startup {
                        minor_version,
                        parameters,
                    } => {
                        if minor_version != 0
                            && negotiate_version(&mut stream, &parameters).await.is_err()
                        {
                            return;
                        }
                        break parameters;
                    }
                }
            };
            match self
                .serve_session(stream, buf, parameters, peer, is_tls, deadline)
                .await
            {
                Ok(()) => tracing::debug!("session ended"),
                Err(error) => tracing::info!(%error, "session refused"),
            }
        }
        .instrument(span)
        .await;
    }

    /// Serves one TCP client to the end, logging how it ended.
    pub async fn handle_tcp(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let span = tracing::info_span!(
            "session",
            %peer,
            user = tracing::field::Empty,
            db = tracing::field::Empty,
            sub = tracing::field::Empty
        );
        async move {
            match self.run_tcp(tcp, peer).await {
                Ok(()) => tracing::debug!("session ended"),
                Err(error) => tracing::info!(%error, "session refused"),
            }
        }
        .instrument(span)
        .await;
    }

    async fn run_tcp(&self, tcp: TcpStream, peer: SocketAddr) -> Result<(), SessionError> {
        tcp.set_nodelay(true)?;
        let deadline = Instant::now() + self.config.auth_timeout;
        let mut buf = BytesMut::with_capacity(1024);
        // Boxed: the TLS handshake's future is large and done with before
        // the session settles in; the task keeps only what idle needs.
        let negotiated = timeout_at(deadline, Box::pin(self.negotiate(tcp, &mut buf))).await;
        let (mut stream, packet) = match negotiated {
            Err(_) => return Err(SessionError::AuthTimeout(self.config.auth_timeout)),
            Ok((stream, Err(error))) => {
                if let Some(mut stream) = stream {
                    refuse(&mut stream, &error).await;
                }
                return Err(error);
            }
            Ok((Some(stream), Ok(packet))) => (stream, packet),
            Ok((None, Ok(_))) => return Ok(()),
        };
        let parameters = match packet {
            StartupPacket::CancelRequest { pid, key } => {
                self.forward_cancel(pid, key).await;
                return Ok(());
            }
            StartupPacket::Startup {
                minor_version,
                parameters,
            } => {
                if minor_version != 0 {
                    negotiate_version(&mut stream, &parameters).await?;
                }
                parameters
            }
            // `negotiate` only returns Startup or CancelRequest.
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                return Err(frontend::FrameError::Malformed("startup sequence").into());
            }
        };
        let is_tls = stream.is_tls();
        self.serve_session(stream, buf, parameters, peer, is_tls, deadline)
            .await
    }

    /// Reads startup packets, switching to TLS on request, until a
    /// StartupMessage or CancelRequest arrives. Returns the stream (if it is
    /// still usable) with the outcome.
    async fn negotiate(
        &self,
        tcp: TcpStream,
        buf: &mut BytesMut,
    ) -> (Option<ClientStream>, Result<StartupPacket, SessionError>) {
        let mut first = [0u8; 1];
        match tcp.peek(&mut first).await {
            Ok(0) => return (None, Ok(StartupPacket::GssEncRequest)),
            Ok(_) => {}
            Err(error) => return (None, Err(error.into())),
        }
        let mut stream = if first[0] == TLS_HANDSHAKE_BYTE {
            let Some(acceptor) = &self.tls else {
                return (None, Err(SessionError::MissingAlpn));
            };
            match acceptor.accept(tcp).await {
                Ok(tls) if tls.get_ref().1.alpn_protocol() == Some(ALPN_POSTGRESQL) => {
                    ClientStream::Tls(Box::new(tls))
                }
                Ok(_) => return (None, Err(SessionError::MissingAlpn)),
                Err(error) => return (None, Err(SessionError::Tls(error))),
            }
        } else {
            ClientStream::Plain(tcp)
        };
        loop {
            let packet = match read_startup_packet(&mut stream, buf).await {
                Ok(Some(packet)) => packet,
                Ok(None) => return (None, Ok(StartupPacket::GssEncRequest)),
                Err(error) => return (Some(stream), Err(error)),
            };
            match packet {
                StartupPacket::SslRequest => {
                    let ClientStream::Plain(mut tcp) = stream else {
                        let error = frontend::FrameError::Malformed("SSLRequest over TLS");
                        return (Some(stream), Err(error.into()));
                    };
                    // CVE-2021-23214: bytes sent before the TLS handshake
                    // could be injected by a man in the middle.
                    if !buf.is_empty() {
                        return (
                            Some(ClientStream::Plain(tcp)),
                            Err(SessionError::DataBeforeTls),
                        );
                    }
                    let Some(acceptor) = &self.tls else {
                        if let Err(error) = tcp.write_all(&[backend::REFUSE_ENCRYPTION]).await {
                            return (None, Err(error.into()));
                        }
                        stream = ClientStream::Plain(tcp);
                        continue;
                    };
                    if let Err(error) = tcp.write_all(&[backend::ACCEPT_SSL]).await {
                        return (None, Err(error.into()));
                    }
                    match acceptor.accept(tcp).await {
                        Ok(tls) => stream = ClientStream::Tls(Box::new(tls)),
                        Err(error) => return (None, Err(SessionError::Tls(error))),
                    }
                }
                StartupPacket::GssEncRequest => {
                    if let Err(error) =
                        write_flush(&mut stream, &[backend::REFUSE_ENCRYPTION]).await
                    {
                        return (None, Err(error.into()));
                    }
                }
                packet => return (Some(stream), Ok(packet)),
            }
        }
    }

    async fn forward_cancel(&self, pid: i32, key: i32) {
        let Some(target) = self.cancels.lookup(pid, key) else {
            tracing::info!("cancel request with an unknown key ignored");
            return;
        };
        // Held while forwarding: the session cannot hand its backend to
        // another client until this cancel is delivered.
        let target = target.lock().await;
        let Some(UpstreamKey { pid, secret_key }) = *target else {
            tracing::info!("cancel request for a client between transactions ignored");
            return;
        };
        match upstream::cancel(&self.config.upstream, pid, secret_key).await {
            Ok(()) => tracing::info!("cancel request forwarded"),
            Err(error) => tracing::warn!(%error, "cancel request could not be forwarded"),
        }
    }

    /// Authenticates, logs in upstream and relays. Generic over the client
    /// stream so TCP, TLS and WebSocket share one path.
    pub async fn serve_session<S>(
        &self,
        mut stream: S,
        mut buf: BytesMut,
        parameters: BTreeMap<String, String>,
        peer: SocketAddr,
        is_tls: bool,
        deadline: Instant,
    ) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let login = match timeout_at(
            deadline,
            // Boxed, as are the login and checkout futures below: token
            // verification (with its JWKS fetch) and upstream logins are
            // large, and an idle session's task should not carry their size.
            Box::pin(self.authenticate(&mut stream, &mut buf, &parameters, peer, is_tls)),
        )
        .await
        {
            Ok(Ok(login)) => login,
            Ok(Err(error)) => {
                Box::pin(refuse(&mut stream, &error)).await;
                return Err(error);
            }
            Err(_) => {
                let error = SessionError::AuthTimeout(self.config.auth_timeout);
                Box::pin(refuse(&mut stream, &error)).await;
                return Err(error);
            }
        };
        let (startup, identity) = login;
        let mode = self.config.pool_mode_for(&startup.database);
        let claims = identity.as_ref().map(|i| &*i.claims_json);
        let client_id = upstream::next_client_id();
        let leased = Box::pin(self.lease(&startup, claims, client_id, mode)).await;
        let (mut lease, parameters) = match leased {
            Ok(leased) => leased,
            Err(error) => {
                tracing::warn!(%error, "upstream login failed");
                Box::pin(refuse(&mut stream, &error)).await;
                return Err(error);
            }
        };
        let upstream = lease.conn();
        let guard = self.cancels.register(
            (mode != PoolMode::Transaction).then_some(upstream.cancel_key()),
            &mut random_u64,
        );
        let mut out = BytesMut::with_capacity(512);
        backend::authentication_ok(&mut out);
        for (name, value) in &parameters {
            backend::parameter_status(name, value, &mut out);
        }
        backend::backend_key_data(guard.pid, guard.key, &mut out);
        backend::ready_for_query_idle(&mut out);
        // Anything the upstream sent past its ReadyForQuery (an async notice).
        out.extend_from_slice(&upstream.take_for_client());
        write_flush(&mut stream, &out).await?;
        // Idle sessions are many: hold no handshake buffers while relaying.
        drop((out, parameters));
        upstream.read_buf = BytesMut::new();
        tracing::info!(
            upstream_pid = upstream.pid,
            authenticated = identity.is_some(),
            pool_mode = ?mode,
            "session started"
        );
        let expires = identity
            .as_ref()
            .filter(|_| self.config.enforce_token_expiry)
            .map(|identity| transaction::expiry_time(identity.expires_at));
        let Lease::Pooled(pooled) = lease else {
            let relay = Relay::new(None);
            return Box::pin(self.relay_to_end(stream, relay, buf, lease, expires)).await;
        };
        if mode == PoolMode::Transaction {
            pooled.release();
            let client = PooledClient {
                id: client_id,
                claims: claims.map(str::to_owned),
                settings: startup.settings(),
                tracker: Tracker::default(),
                expires,
            };
            drop(identity);
            let served = self
                .serve_transactions(stream, buf, &startup, client, guard)
                .await;
            if let Some(pool) = &self.pool {
                pool.disown(&startup.database, &startup.role, client_id);
            }
            return served;
        }
        Box::pin(self.relay_to_end(
            stream,
            Relay::new(None),
            buf,
            Lease::Pooled(pooled),
            expires,
        ))
        .await
    }

    /// Relays a session holding its upstream connection until it ends, then
    /// resets and returns the connection to the pool if it can be reused.
    /// `pipelined` is what the client sent past its last handled message.
    /// With `expires`, the session ends at the first idle transaction
    /// boundary after that time.
    async fn relay_to_end<S>(
        &self,
        mut stream: S,
        mut relay: Relay,
        pipelined: BytesMut,
        mut lease: Lease,
        expires: Option<SystemTime>,
    ) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let conn = lease.conn();
        relay.forward(&pipelined, &mut conn.stream).await?;
        drop(pipelined);
        let stopped = match expires {
            None => relay.run(&mut stream, &mut conn.stream).await,
            Some(at) => {
                let left = at
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                let ended = tokio::select! {
                    stopped = relay.run(&mut stream, &mut conn.stream) => Some(stopped),
                    () = tokio::time::sleep(left) => None,
                };
                match ended {
                    Some(stopped) => stopped,
                    None => {
                        relay.stop_at_idle(true);
                        relay.run(&mut stream, &mut conn.stream).await
                    }
                }
            }
        };
        if matches!(stopped, Ok(Stop::UpstreamClosed)) {
            relay.flush_client(&mut stream).await?;
        }
        if let Ok(Stop::Idle) = stopped {
            // Only an expired token stops a session that holds its connection.
            let mut out = BytesMut::new();
            let view = SessionError::TokenExpired.client_view();
            if let Some(view) = view {
                backend::fatal_error(view.code, &view.message, view.hint, &mut out);
                let _ = write_flush(&mut stream, &out).await;
            }
            tracing::info!("session ended: its token expired");
        }
        relay::close_client(&mut stream).await;
        let stopped = stopped?;
        let reusable = stopped != Stop::UpstreamClosed && relay.between_requests();
        tracing::debug!(?stopped, reusable, "relay ended");
        match lease {
            Lease::Pooled(mut pooled) if reusable => match pooled.conn().reset().await {
                Ok(()) => pooled.release(),
                Err(error) => tracing::debug!(%error, "upstream not reusable after reset"),
            },
            Lease::Pooled(_) => {}
            Lease::Own(mut upstream) => {
                // Terminate ('X'): the backend ends without logging an EOF.
                let _ = write_flush(&mut upstream.stream, &[b'X', 0, 0, 0, 4]).await;
            }
        }
        Ok(())
    }

    /// Serves a client of a transaction-pooled database: it holds an
    /// upstream connection from the first message of a transaction to the
    /// idle ReadyForQuery that ends it (see [`crate::transaction`]).
    async fn serve_transactions<S>(
        &self,
        mut stream: S,
        pipelined: BytesMut,
        startup: &Startup,
        mut client: PooledClient,
        cancel: CancelGuard,
    ) -> Result<(), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut pipelined = Some(pipelined).filter(|b| !b.is_empty());
        loop {
            // Idle: no upstream connection, no buffers beyond this one.
            let mut head = [0u8; 64];
            let first = match pipelined.take() {
                Some(bytes) => bytes.to_vec(),
                None => {
                    let n = stream.read(&mut head).await?;
                    head[..n].to_vec()
                }
            };
            // Between transactions the client is at a message boundary, so
            // its first byte is a message tag.
            if first.first().is_none_or(|&tag| tag == b'X') {
                return Ok(());
            }
            if client.expired(SystemTime::now()) {
                let error = SessionError::TokenExpired;
                Box::pin(refuse(&mut stream, &error)).await;
                return Err(error);
            }
            let mut pooled = match Box::pin(self.checkout_for(startup, &client)).await {
                Ok(pooled) => pooled,
                Err(error) => {
                    tracing::warn!(%error, "no upstream connection for a transaction");
                    Box::pin(refuse(&mut stream, &error)).await;
                    return Err(error);
                }
            };
            let conn = pooled.conn();
            cancel.retarget(Some(conn.cancel_key())).await;
            let mut relay = Relay::new(Some(std::mem::take(&mut client.tracker)));
            relay.stop_at_idle(true);
            relay.deliver(&conn.take_for_client(), &mut stream).await?;
            let stopped = match relay.forward(&first, &mut conn.stream).await {
                Ok(()) => relay.run(&mut stream, &mut conn.stream).await,
                Err(error) => Err(error),
            };
            if stopped.as_ref().is_ok_and(|s| *s == Stop::Idle) {
                if let Some(tracker) = relay.take_tracker() {
                    client.tracker = tracker;
                }
                let settled = match client.unsettled() {
                    true => Box::pin(client.settle(conn)).await,
                    false => Ok(None),
                };
                if settled.is_ok() {
                    relay.deliver(&conn.take_for_client(), &mut stream).await?;
                }
                match settled {
                    Ok(None) => {
                        cancel.retarget(None).await;
                        pooled.release();
                        continue;
                    }
                    Ok(Some(reason)) => {
                        tracing::info!(
                            reason,
                            "client keeps its upstream connection until it leaves"
                        );
                        relay.stop_at_idle(false);
                        // Boxed, like the other rare paths here: an idle
                        // client's task carries only what idle needs.
                        return Box::pin(self.relay_to_end(
                            stream,
                            relay,
                            BytesMut::new(),
                            Lease::Pooled(pooled),
                            client.expires,
                        ))
                        .await;
                    }
                    Err(error) => {
                        // The connection broke after the transaction ended;
                        // the client's next one gets another.
                        tracing::debug!(%error, "upstream failed after a transaction");
                        cancel.retarget(None).await;
                        drop(pooled);
                        continue;
                    }
                }
            }
            cancel.retarget(None).await;
            if matches!(stopped, Ok(Stop::UpstreamClosed)) {
                relay.flush_client(&mut stream).await?;
            }
            relay::close_client(&mut stream).await;
            let client_left = matches!(stopped, Ok(Stop::ClientClosed | Stop::ClientTerminated));
            if client_left && relay.between_requests() {
                match Box::pin(pooled.conn().reset()).await {
                    Ok(()) => pooled.release(),
                    Err(error) => tracing::debug!(%error, "upstream not reusable after reset"),
                }
            }
            return stopped.map(drop).map_err(Into::into);
        }
    }

    /// A pooled connection holding `client`'s session, for its next
    /// transaction.
    async fn checkout_for(
        &self,
        startup: &Startup,
        client: &PooledClient,
    ) -> Result<Pooled, SessionError> {
        let (pooled, _) = self
            .checkout_with(startup, client.id, Readying::Transaction(client))
            .await?;
        Ok(pooled)
    }

    /// A connection from the pool for `startup`'s database and role,
    /// readied for the client (see [`Readying`]), with the ParameterStatus
    /// values a new client should see. A reused connection that turns out
    /// to have died while idle (server restart, pg_terminate_backend) is
    /// replaced once; one that fails otherwise is reset and returned to the
    /// pool if it can be.
    async fn checkout_with(
        &self,
        startup: &Startup,
        client_id: u64,
        readying: Readying<'_>,
    ) -> Result<(Pooled, Vec<(String, String)>), SessionError> {
        let pool = self.pool.as_ref().ok_or_else(|| {
            SessionError::Upstream(upstream::UpstreamError::Protocol(
                "no upstream pool is configured".into(),
            ))
        })?;
        let password = self.config.roles[&startup.role].password.as_deref();
        let mut attempts = 2;
        loop {
            attempts -= 1;
            let mut pooled = pool
                .checkout(&startup.database, &startup.role, password, client_id)
                .await
                .map_err(checkout_error)?;
            let conn = pooled.conn();
            let readied = match &readying {
                Readying::Login { claims, settings } => match conn.claim(client_id).await {
                    Ok(_) => {
                        conn.attach_for_client(&self.claims_key, *claims, settings)
                            .await
                    }
                    Err(error) => Err(error),
                },
                Readying::Transaction(client) => client
                    .take(conn, &self.claims_key)
                    .await
                    .map(|()| Vec::new()),
            };
            match readied {
                Ok(parameters) => return Ok((pooled, parameters)),
                Err(upstream::UpstreamError::Io(error)) if pooled.reused() && attempts > 0 => {
                    tracing::debug!(%error, "pooled upstream connection was dead; retrying");
                }
                Err(error) => {
                    // A failed setting leaves the connection clean; reset
                    // it anyway before anyone else gets it.
                    if !matches!(error, upstream::UpstreamError::Io(_))
                        && pooled.conn().reset().await.is_ok()
                    {
                        pooled.release();
                    }
                    return Err(error.into());
                }
            }
        }
    }

    /// An upstream connection for this client, logged in as its role with
    /// its settings and identity attached: from the pool when pooling is on,
    /// otherwise a fresh login. Returns it with the ParameterStatus values
    /// the client should see.
    async fn lease(
        &self,
        startup: &Startup,
        claims: Option<&str>,
        client_id: u64,
        mode: PoolMode,
    ) -> Result<(Lease, Vec<(String, String)>), SessionError> {
        if self.pool.is_none() || mode == PoolMode::None {
            let password = self.config.roles[&startup.role].password.as_deref();
            let mut upstream = upstream::connect(
                &self.config.upstream,
                &startup.role,
                &startup.database,
                password,
                &startup.forwarded,
            )
            .await?;
            let parameters = upstream
                .attach_for_client(&self.claims_key, claims, &[])
                .await?;
            return Ok((Lease::Own(upstream), parameters));
        }
        let settings = startup.settings();
        let readying = Readying::Login {
            claims,
            settings: &settings,
        };
        let (pooled, parameters) = self.checkout_with(startup, client_id, readying).await?;
        Ok((Lease::Pooled(pooled), parameters))
    }

    async fn authenticate<S>(
        &self,
        stream: &mut S,
        buf: &mut BytesMut,
        parameters: &BTreeMap<String, String>,
        peer: SocketAddr,
        is_tls: bool,
    ) -> Result<(Startup, Option<Identity>), SessionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let role = parameters
            .get("user")
            .filter(|u| !u.is_empty())
            .ok_or(SessionError::MissingUser)?
            .clone();
        let database = parameters
            .get("database")
            .filter(|d| !d.is_empty())
            .unwrap_or(&role)
            .clone();
        let span = tracing::Span::current();
        span.record("user", role.as_str());
        span.record("db", database.as_str());
        let forwarded = forwarded_parameters(parameters)?;
        let role_config = self
            .config
            .roles
            .get(&role)
            .ok_or_else(|| SessionError::UnknownRole(role.clone()))?;
        if !self.config.databases.is_empty() && !self.config.databases.contains(&database) {
            return Err(SessionError::UnknownDatabase(database));
        }
        let startup = Startup {
            role,
            database,
            forwarded,
        };
        if !role_config.requires_token {
            return Ok((startup, None));
        }
        let cleartext_ok = match self.config.cleartext_tokens {
            CleartextTokens::Allow => true,
            CleartextTokens::LoopbackOnly => peer.ip().is_loopback(),
            CleartextTokens::Refuse => false,
        };
        if !is_tls && !cleartext_ok {
            return Err(SessionError::CleartextRefused);
        }
        let mut out = BytesMut::new();
        backend::ask_cleartext_password(&mut out);
        write_flush(stream, &out).await?;
        let token = loop {
            if let Some(password) = frontend::parse_password_message(buf)? {
                break password;
            }
            if stream.read_buf(buf).await? == 0 {
                return Err(SessionError::ClientIo(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
        };
        if token.is_empty() {
            return Err(SessionError::MissingToken(startup.role));
        }
        let identity = self
            .verifier
            .verify(&token, &startup.role, SystemTime::now())
            .await?;
        let span = tracing::Span::current();
        span.record("sub", identity.subject.as_str());
        let mut startup = startup;
        if identity.role != startup.role {
            // The provider's role_claim chose the role.
            if !self.config.roles.contains_key(&identity.role) {
                return Err(SessionError::UnknownRole(identity.role.clone()));
            }
            span.record("user", identity.role.as_str());
            startup.role = identity.role.clone();
        }
        Ok((startup, Some(identity)))
    }
}

/// Reads one startup-phase packet; `Ok(None)` on a clean EOF.
async fn read_startup_packet<S>(
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<Option<StartupPacket>, SessionError>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some(packet) = frontend::parse_startup_packet(buf)? {
            return Ok(Some(packet));
        }
        if stream.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Tells a client that asked for protocol 3.x (x > 0) or `_pq_` options that
/// we speak 3.0 and none of them, as Postgres does.
async fn negotiate_version<S>(
    stream: &mut S,
    parameters: &BTreeMap<String, String>,
) -> Result<(), SessionError>
where
    S: AsyncWrite + Unpin,
{
    let unsupported = parameters
        .keys()
        .filter(|k| k.starts_with("_pq_."))
        .cloned()
        .collect();
    let mut out = BytesMut::new();
    backend::negotiate_protocol_version(unsupported, &mut out);
    write_flush(stream, &out).await?;
    Ok(())
}

/// Sends the client-safe form of `error` (if any) and closes, best effort.
async fn refuse<S>(stream: &mut S, error: &SessionError)
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

fn random_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // The system RNG failing is not recoverable for a security proxy.
    getrandom::fill(&mut bytes).expect("the system random number generator is available");
    u64::from_le_bytes(bytes)
}
