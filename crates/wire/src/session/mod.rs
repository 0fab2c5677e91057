//! One client connection from accept to close.
//!
//! ```text
//! negotiate ─► handshake ─► lease ─► greet ─► end::hold      (session pooling, none)
//! (TLS, cancel) (admission,  (upstream,  (AuthOk,  └► transactions (transaction pooling)
//!               token)       identity)   cancel key)      └► end::relay_to_end (pinned)
//! ```
//!
//! Each phase is a file: [`negotiate`] (transport and startup packets),
//! [`handshake`] (asking for the token and admission), [`lease`] (an
//! upstream connection readied with the identity), [`greet`] (the
//! client told it is in, its cancel key registered), [`end`] (relaying
//! to the end, then handing the backend back, for every mode) and
//! [`transactions`] (one upstream connection per transaction). A [`Session`] carries what every phase
//! needs: the client stream, the bytes read ahead, where the client is.

mod console;
mod end;
mod greet;
mod handshake;
mod lease;
mod limited;
mod negotiate;
mod stops;
mod transactions;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::time::{Instant, timeout_at};
use tracing::Instrument as _;

use crate::budget::Ticket;
use crate::clients::{ClientHandle, ClientLogin};
use crate::config::PoolMode;
use crate::error::{Classify as _, SessionError, Severity};
use crate::front_door::Guest;
use crate::metrics::Tally;
use crate::proto::backend;
use crate::proto::negotiate::Startup;
use crate::proxy::{Proxy, Settings};
use crate::relay::{Observed, ReadHint};
use crate::transport::Transport;
use greet::Greeted;
use handshake::SessionLogin;
use negotiate::{Failed, Opened};

/// How long a refused client is given to read its ErrorResponse.
const ERROR_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// A client stream: TCP, TLS, WebSocket, or an in-memory pipe in tests.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + ReadHint + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + ReadHint + Unpin + Send> ClientIo for S {}

impl Proxy {
    /// Serves one TCP client the front door let in, to the end.
    ///
    /// The guest is taken apart before the future is made: an async fn
    /// keeps its arguments twice, and every byte of this future is held
    /// by every idle client.
    pub(crate) fn serve_tcp(
        self: Arc<Self>,
        guest: Guest,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let Guest {
            tcp,
            peer,
            relayed_by,
            deadline,
            ticket,
            client,
            span,
        } = guest;
        let place = Box::new(Arrival {
            peer,
            relayed_by,
            transport: Transport::Wire,
            auth_deadline: deadline,
            ticket,
            client,
            span,
        });
        let settings = self.settings();
        crate::transport::tune(&tcp, settings.config.tcp_keepalive);
        // Made here, boxed: the block below keeps what it captures for
        // its whole life, and this is one pointer.
        let negotiation = negotiate::over_tcp(tcp, settings.tls.clone());
        let negotiation = negotiation.instrument(place.span.clone());
        let negotiation = Box::pin(timeout_at(place.auth_deadline, negotiation));
        async move {
            let opened = negotiation.await;
            let next = self.opened(opened, settings, place);
            self.serve_opened(next).await;
        }
    }

    /// Serves a client on a stream whose transport is settled (a
    /// WebSocket); `encrypted` tells whether it runs over TLS, `ticket` is
    /// its place in the connection budget, `relayed_by` as for
    /// a TCP client's.
    #[allow(
        clippy::too_many_arguments,
        reason = "each is a fact about the connection"
    )]
    pub async fn serve_settled<S>(
        self: Arc<Self>,
        stream: S,
        peer: SocketAddr,
        relayed_by: Option<IpAddr>,
        encrypted: bool,
        ticket: Ticket,
        client: ClientHandle,
    ) where
        S: AsyncRead + AsyncWrite + ReadHint + Unpin + Send,
    {
        let span = session_span(peer, relayed_by, Transport::WebSocket);
        let settings = self.settings();
        client.set_transport(Transport::WebSocket);
        let deadline = Instant::now() + settings.config.auth_timeout;
        let negotiation = negotiate::settled(stream, encrypted).instrument(span.clone());
        let opened = Box::pin(timeout_at(deadline, negotiation)).await;
        let place = Box::new(Arrival {
            peer,
            relayed_by,
            transport: Transport::WebSocket,
            auth_deadline: deadline,
            ticket,
            client,
            span,
        });
        let next = self.opened(opened, settings, place);
        self.serve_opened(next).await;
    }

    /// What the negotiation led to, taken apart in a plain function: an
    /// async fn keeps its arguments twice, and the futures after this one
    /// are held by every idle client.
    #[allow(
        clippy::boxed_local,
        reason = "the caller's future holds the place as one pointer until now"
    )]
    fn opened<S: ClientIo>(
        &self,
        opened: Result<Result<Opened<S>, Failed<S>>, tokio::time::error::Elapsed>,
        settings: Arc<Settings>,
        place: Box<Arrival>,
    ) -> Next<'_, S> {
        let Arrival {
            peer,
            relayed_by,
            transport,
            auth_deadline,
            ticket,
            client,
            span,
        } = *place;
        let _in = span.enter();
        match opened {
            Ok(Ok(Opened::Session {
                stream,
                inbox,
                startup,
                encrypted,
            })) => {
                let session = Session {
                    proxy: self,
                    settings,
                    client: stream,
                    inbox,
                    peer,
                    relayed_by,
                    transport,
                    encrypted,
                    auth_deadline,
                    ticket,
                    registered: client,
                    spared_until: Instant::now(),
                    observed: None,
                    span: span.clone(),
                    ended: "",
                };
                Next::Session(session, startup)
            }
            Ok(Ok(Opened::Cancel { pid, key })) => Next::Cancel {
                pid,
                key,
                settings,
                span: span.clone(),
            },
            Ok(Ok(Opened::Closed)) => Next::Ended(Ok(()), span.clone()),
            Ok(Err(Failed { stream, error })) => {
                self.metrics.login(transport, Err(&error));
                self.report(&error);
                Next::Refuse(stream, error)
            }
            Err(_) => {
                let error = SessionError::AuthTimeout(settings.config.auth_timeout);
                self.metrics.login(transport, Err(&error));
                Next::Ended(Err(error), span.clone())
            }
        }
    }

    /// Serves what the negotiation led to, to the end, and logs how it
    /// ended. `next` is used in place, never moved: the session lives in
    /// this future once.
    #[allow(
        clippy::manual_async_fn,
        reason = "an async fn would keep `next`, the session, twice"
    )]
    fn serve_opened<'a, S: ClientIo + 'a>(
        &'a self,
        mut next: Next<'a, S>,
    ) -> impl std::future::Future<Output = ()> + Send + 'a {
        async move {
            let (result, span) = match &mut next {
                Next::Session(session, startup) => (session.run(startup).await, session.span()),
                Next::Cancel {
                    pid,
                    key,
                    settings,
                    span,
                } => {
                    let config = &settings.config;
                    let forward = self.cancels.forward(config, &self.metrics, *pid, key);
                    Box::pin(forward.instrument(span.clone())).await;
                    (Ok(()), span.clone())
                }
                Next::Refuse(stream, error) => {
                    if let Some(stream) = stream {
                        Box::pin(refuse(stream, error)).await;
                    }
                    return;
                }
                Next::Ended(result, span) => (std::mem::replace(result, Ok(())), span.clone()),
            };
            let _in = span.enter();
            match result {
                Ok(()) => tracing::debug!("connection closed"),
                Err(error) => self.report(&error),
            }
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
}

/// What a negotiation led to.
#[allow(
    clippy::large_enum_variant,
    reason = "the session is served in place; boxing it saves nothing"
)]
enum Next<'p, S> {
    /// A session, from its StartupMessage on.
    Session(Session<'p, S>, Startup),
    /// A CancelRequest to forward.
    Cancel {
        pid: i32,
        key: Vec<u8>,
        settings: Arc<Settings>,
        span: tracing::Span,
    },
    /// A refusal to send, if the stream is still there (already logged).
    Refuse(Option<S>, SessionError),
    /// Nothing more to do but log how it ended, in its span.
    Ended(Result<(), SessionError>, tracing::Span),
}

/// Where a new connection stands before its negotiation settles.
struct Arrival {
    peer: SocketAddr,
    /// The balancer whose PROXY header named `peer`.
    relayed_by: Option<IpAddr>,
    transport: Transport,
    /// When the client must have authenticated.
    auth_deadline: Instant,
    /// Its place in the connection budget.
    ticket: Ticket,
    /// Its entry in the client registry.
    client: ClientHandle,
    /// Where its log lines go.
    span: tracing::Span,
}

/// One client's session after its StartupMessage.
pub(crate) struct Session<'p, S> {
    proxy: &'p Proxy,
    /// The settings it started with, kept to its end.
    settings: Arc<Settings>,
    client: S,
    /// What the client sent past the last message handled.
    inbox: BytesMut,
    peer: SocketAddr,
    /// The balancer whose PROXY header named `peer`.
    relayed_by: Option<IpAddr>,
    transport: Transport,
    encrypted: bool,
    /// When the client must have authenticated.
    auth_deadline: Instant,
    /// Its place in the connection budget, marked once it authenticates.
    ticket: Ticket,
    /// Its entry in the client registry.
    registered: ClientHandle,
    /// Until when a drain spares it (set once it is logged in).
    spared_until: Instant,
    /// Its counters, state report and audit log (when `[audit]` is on),
    /// made at login and shared with each of its relays.
    observed: Option<Arc<Observed>>,
    /// The span its log lines go in, until it logs in ([`Session::span`]).
    /// Entered where the session logs, and around its login and its rare
    /// paths, not on every poll of its relay: that would cost more than a
    /// pooled transaction's own work.
    span: tracing::Span,
    /// The label of the error it last reported ([`Session::report`]):
    /// the end-of-session line's reason.
    ended: &'static str,
}

/// A session logged in: what it goes on with until it ends.
struct LoggedIn {
    login: SessionLogin,
    /// The leased connection and the client's cancel entry.
    greeted: Greeted,
    mode: PoolMode,
}

impl<S: ClientIo> Session<'_, S> {
    /// The rest of the session's life, from the StartupMessage on.
    ///
    /// `startup` is borrowed, and taken when the login starts: this
    /// future lives as long as the session, and a value argument would
    /// stay in it.
    async fn run(&mut self, startup: &mut Startup) -> Result<(), SessionError> {
        let settings = Arc::clone(&self.settings);
        if let Some(console) = settings.config.console.as_ref().filter(|console| {
            let user = startup.parameters.get("user");
            startup.parameters.get("database").or(user) == Some(&console.database)
        }) {
            // One box, the refusal in it: a result held here across an
            // await would take its space in this future for the life of
            // every session.
            let span = self.span.clone();
            let served = async {
                match self.console(startup, console).await {
                    Ok(()) => Ok(()),
                    Err(error) => self.refused(error).await,
                }
            };
            return Box::pin(served.instrument(span)).await;
        }
        drop(settings);
        // Boxed, as are the rare paths after it: token verification and
        // upstream logins are large futures, and an idle session's task
        // should not carry their size. What it goes on with is one box.
        let span = self.span.clone();
        let startup = std::mem::take(startup);
        let Some(logged) = Box::pin(self.log_in(startup).instrument(span)).await? else {
            return Ok(());
        };
        // Logged in: the span's fields are in the registry's record of the
        // login, and an idle client should not hold them twice.
        self.span = tracing::Span::none();
        // Not in the span: it is entered where the session logs.
        let served = match logged.mode {
            PoolMode::Transaction => transactions::serve(self, logged).await,
            PoolMode::Session | PoolMode::None => end::hold(self, logged).await,
        };
        // The counters and the start are the session's own (not copies
        // kept here: this future lives as long as the session).
        let Some(observed) = &self.observed else {
            return served;
        };
        let tally = &observed.tally;
        let reason = match &served {
            Err(error) => error.label(),
            Ok(()) if !self.ended.is_empty() => self.ended,
            Ok(()) => tally.session().stop().unwrap_or("client_left"),
        };
        let lasted = self.connected().elapsed();
        self.span()
            .in_scope(|| session_ended(tally, lasted, reason));
        served
    }

    /// When the client connected: its authentication deadline less the
    /// time it was given.
    fn connected(&self) -> Instant {
        (self.auth_deadline)
            .checked_sub(self.settings.config.auth_timeout)
            .unwrap_or_else(Instant::now)
    }

    /// Logs why the session failed, in its span ([`Proxy::report`]), and
    /// keeps the reason for the line it ends with.
    fn report(&mut self, error: &SessionError) {
        self.ended = error.label();
        self.span().in_scope(|| self.proxy.report(error));
    }

    /// The span its log lines go in: the one it logged in under, or once
    /// it has let that go, the same made again from the registry's
    /// record of its login.
    fn span(&self) -> tracing::Span {
        if !self.span.is_none() {
            return self.span.clone();
        }
        let span = session_span(self.peer, self.relayed_by, self.transport);
        if let Some(login) = self.registered.login() {
            let requested = login.requested_role.as_deref();
            span.record("user", requested.unwrap_or(&login.role));
            span.record("db", login.database.as_str());
            if let Some(subject) = &login.subject {
                span.record("sub", subject.as_str());
            }
            if requested.is_some() {
                span.record("role", login.role.as_str());
            }
        }
        span
    }

    /// From the StartupMessage to the greeting: the token, admission, the
    /// limits, the lease. `None`: the login was refused (and the client
    /// told).
    async fn log_in(&mut self, startup: Startup) -> Result<Option<Box<LoggedIn>>, SessionError> {
        let login = timeout_at(self.auth_deadline, self.handshake(startup)).await;
        let mut login = match login {
            Ok(Ok(login)) => login,
            Ok(Err(error)) => return self.login_failed(error).await.map(|()| None),
            Err(_) => {
                let waited = self.settings.config.auth_timeout;
                let error = SessionError::AuthTimeout(waited);
                return self.login_failed(error).await.map(|()| None);
            }
        };
        if self.proxy.drain.is_draining() {
            let error = SessionError::ShuttingDown;
            return self.login_failed(error).await.map(|()| None);
        }
        let database = &login.admitted.database;
        if self.proxy.gates.is_disabled(database) {
            let error = SessionError::DatabaseDisabled(database.clone());
            return self.login_failed(error).await.map(|()| None);
        }
        let mode = self.settings.config.pool_mode_of(&login.admitted);
        login.hold = match self.hold_identity(&login, mode) {
            Ok(hold) => hold,
            Err(error) => return self.login_failed(error).await.map(|()| None),
        };
        let leased = lease::lease(self.proxy, &self.settings, &login, mode).await;
        let leased = match leased {
            Ok(leased) => leased,
            Err(error) => return self.login_failed(error).await.map(|()| None),
        };
        let authenticated = login.admitted.identity.is_some();
        let greeted = match self.greet(leased, mode, authenticated).await {
            Ok(greeted) => greeted,
            Err(error) => {
                self.proxy.metrics.login(self.transport, Err(&error));
                return Err(error);
            }
        };
        self.proxy.metrics.login(self.transport, Ok(()));
        self.spared_until = Instant::now() + crate::drain::FRESH_SESSION_GRACE;
        self.registered.logged_in(ClientLogin {
            role: login.admitted.role.clone(),
            database: login.admitted.database.clone(),
            provider: login
                .admitted
                .identity
                .as_ref()
                .map(|i| i.provider.to_string()),
            subject: login.admitted.identity.as_ref().map(|i| i.subject.clone()),
            pool_mode: mode.label(),
            application_name: login
                .forwarded
                .iter()
                .find(|(name, _)| name == "application_name")
                .map(|(_, value)| value.clone()),
            tls: self.encrypted,
            pool_client: login.client_id,
            requested_role: login.requested_role.clone(),
        });
        let admitted = &login.admitted;
        let tally = self.proxy.metrics.tally_of(
            self.transport,
            &admitted.database,
            &admitted.role,
            admitted.identity.as_ref(),
        );
        let audit = (self.proxy).audit_session(&self.settings, &self.audit_facts(admitted));
        self.observed = Some(Arc::new(Observed {
            tally,
            activity: self.registered.activity(),
            audit,
        }));
        Ok(Some(Box::new(LoggedIn {
            login,
            greeted,
            mode,
        })))
    }

    /// What the session's audit lines say about who and where.
    fn audit_facts<'a>(&self, admitted: &'a crate::Admitted) -> crate::audit::Facts<'a> {
        crate::audit::Facts {
            transport: self.transport,
            encrypted: self.encrypted,
            identity: admitted.identity.as_ref(),
            role: &admitted.role,
            database: &admitted.database,
            client: self.peer,
        }
    }

    /// Counts a login that did not happen, then refuses it.
    async fn login_failed(&mut self, error: SessionError) -> Result<(), SessionError> {
        self.proxy.metrics.login(self.transport, Err(&error));
        self.refused(error).await
    }

    /// The relay counters and state reports of this session (counting
    /// nowhere visible before its login).
    fn observed(&self) -> Arc<Observed> {
        match &self.observed {
            Some(observed) => Arc::clone(observed),
            None => Arc::new(Observed {
                tally: Tally::default(),
                activity: self.registered.activity(),
                audit: None,
            }),
        }
    }

    /// Reports why the session is refused, tells the client, and ends the
    /// session.
    async fn refused(&mut self, error: SessionError) -> Result<(), SessionError> {
        self.report(&error);
        refuse(&mut self.client, &error).await;
        Ok(())
    }
}

/// The line every logged-in session ends with, at info: how long it
/// lasted, what it moved and why it ended (`server_closed` when the
/// database went away under it: a restart leaves one line per session).
fn session_ended(tally: &Tally, lasted: std::time::Duration, reason: &'static str) {
    use std::sync::atomic::Ordering::Relaxed;
    let counts = tally.session();
    tracing::info!(
        duration_ms = u64::try_from(lasted.as_millis()).unwrap_or(u64::MAX),
        received = counts.received.load(Relaxed),
        sent = counts.sent.load(Relaxed),
        transactions = counts.transactions.load(Relaxed),
        queries = counts.queries.load(Relaxed),
        reason,
        "session ended"
    );
}

/// The span of one session: fields filled in as they become known.
pub(crate) fn session_span(
    peer: SocketAddr,
    relayed_by: Option<IpAddr>,
    transport: Transport,
) -> tracing::Span {
    tracing::info_span!(
        "session",
        %peer,
        via = relayed_by.map(tracing::field::display),
        transport = transport.label(),
        user = tracing::field::Empty,
        db = tracing::field::Empty,
        sub = tracing::field::Empty,
        role = tracing::field::Empty
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
