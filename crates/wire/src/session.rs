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
use crate::cancel::{CancelRegistry, UpstreamKey};
use crate::error::SessionError;
use crate::frontend::{self, StartupPacket};
use crate::identity::ClaimsKey;
use crate::params::forwarded_parameters;
use crate::pool::{CheckoutError, PoolLimits, Pooled, UpstreamPool};
use crate::relay::relay;
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
    /// Session pooling: a client's upstream connection is reset and kept
    /// for the next client of the same database and role. `None` gives
    /// every client a login of its own.
    pub pool: Option<PoolLimits>,
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

impl Proxy {
    /// A proxy with these settings.
    pub fn new(
        config: ProxyConfig,
        verifier: Arc<Verifier>,
        claims_key: ClaimsKey,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        Self {
            pool: config
                .pool
                .map(|limits| UpstreamPool::new(config.upstream.clone(), limits)),
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
        let negotiated = timeout_at(deadline, self.negotiate(tcp, &mut buf)).await;
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
        let Some(UpstreamKey { pid, secret_key }) = self.cancels.lookup(pid, key) else {
            tracing::info!("cancel request with an unknown key ignored");
            return;
        };
        match upstream::cancel(&self.config.upstream, pid, secret_key).await {
            Ok(()) => tracing::info!("cancel request forwarded"),
            Err(error) => tracing::warn!(%error, "cancel request could not be forwarded"),
        }
    }

    /// Authenticates, logs in upstream and relays. Generic over the client
    /// stream so TCP, TLS and (later) WebSocket share one path.
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
            self.authenticate(&mut stream, &mut buf, &parameters, peer, is_tls),
        )
        .await
        {
            Ok(Ok(login)) => login,
            Ok(Err(error)) => {
                refuse(&mut stream, &error).await;
                return Err(error);
            }
            Err(_) => {
                let error = SessionError::AuthTimeout(self.config.auth_timeout);
                refuse(&mut stream, &error).await;
                return Err(error);
            }
        };
        let (startup, identity) = login;
        let claims = identity.as_ref().map(|i| &*i.claims_json);
        let (mut lease, parameters) = match self.lease(&startup, claims).await {
            Ok(leased) => leased,
            Err(error) => {
                tracing::warn!(%error, "upstream login failed");
                refuse(&mut stream, &error).await;
                return Err(error);
            }
        };
        let pooled = matches!(lease, Lease::Pooled(_));
        let upstream = lease.conn();
        let guard = self.cancels.register(
            UpstreamKey {
                pid: upstream.pid,
                secret_key: upstream.secret_key,
            },
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
        out.extend_from_slice(&upstream.read_buf);
        upstream.read_buf.clear();
        write_flush(&mut stream, &out).await?;
        // Anything the client pipelined after its password.
        if !buf.is_empty() {
            write_flush(&mut upstream.stream, &buf).await?;
        }
        // Idle sessions are many: hold no handshake buffers while relaying.
        drop((buf, out, parameters));
        upstream.read_buf = BytesMut::new();
        tracing::info!(
            upstream_pid = upstream.pid,
            authenticated = identity.is_some(),
            pooled,
            "session started"
        );
        let expiry = identity
            .as_ref()
            .filter(|_| self.config.enforce_token_expiry)
            .map(|identity| {
                let exp = std::time::UNIX_EPOCH + Duration::from_secs(identity.expires_at);
                let left = exp
                    .duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO);
                Instant::now() + left
            });
        let relayed = relay(stream, &mut lease.conn().stream, expiry).await;
        drop(guard);
        let relayed = relayed?;
        tracing::debug!(ended = ?relayed.ended, reusable = relayed.reusable, "relay ended");
        match lease {
            Lease::Pooled(mut pooled) if relayed.reusable => match pooled.conn().reset().await {
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

    /// An upstream connection for this client, logged in as its role with
    /// its settings and identity attached: from the pool when pooling is on,
    /// otherwise a fresh login. Returns it with the ParameterStatus values
    /// the client should see.
    async fn lease(
        &self,
        startup: &Startup,
        claims: Option<&str>,
    ) -> Result<(Lease, Vec<(String, String)>), SessionError> {
        let password = self.config.roles[&startup.role].password.as_deref();
        let Some(pool) = &self.pool else {
            let mut upstream = upstream::connect(
                &self.config.upstream,
                &startup.role,
                &startup.database,
                password,
                &startup.forwarded,
            )
            .await?;
            upstream.attach_identity(&self.claims_key, claims).await?;
            let parameters = upstream.parameters.clone();
            return Ok((Lease::Own(upstream), parameters));
        };
        let mut settings = Vec::new();
        for (name, value) in &startup.forwarded {
            if name == "options" {
                settings.extend(crate::params::option_assignments(value));
            } else {
                settings.push((name.clone(), value.clone()));
            }
        }
        // A reused connection may have died while idle (server restart,
        // pg_terminate_backend): then one more try with another.
        let mut attempts = 2;
        let (pooled, parameters) = loop {
            attempts -= 1;
            let mut pooled = pool
                .checkout(&startup.database, &startup.role, password)
                .await
                .map_err(|error| match error {
                    CheckoutError::Upstream(error) => SessionError::Upstream(error),
                    CheckoutError::Timeout(..) => SessionError::TooManyConnections,
                })?;
            match pooled
                .conn()
                .attach_for_client(&self.claims_key, claims, &settings)
                .await
            {
                Ok(parameters) => break (pooled, parameters),
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
        };
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
