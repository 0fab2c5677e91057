//! The end of a session that holds its upstream connection (session
//! pooling, a login of its own, or a transaction-pooled client pinned to
//! its connection), and how any session hands back its backend: relay
//! until a side leaves, then reset the connection and return it to the
//! pool if the backend is proven settled, close it, or cancel what it
//! still runs for nobody ([`Parting`]).
//!
//! With `enforce_token_expiry`, the session ends at the first idle
//! transaction boundary after its token's `exp`; during a drain, at its
//! next idle boundary, with 57P01 as Postgres says it on shutdown.

use std::time::SystemTime;

use tokio::time::Instant;
use tracing::Instrument as _;

use super::greet::Greeted;
use super::handshake::SessionLogin;
use super::lease::Lease;
use super::limited::{Counted, IdentityHold};
use super::stops::{Boundary, Stops};
use super::{ClientIo, LoggedIn, Session, refuse};
use crate::cancel::CancelGuard;
use crate::config::ClientLimits;
use crate::error::{ProtocolViolation, SessionError};
use crate::proxy::Settings;
use crate::relay::{self, Heard, Relay, RelayError, Stop};

/// Serves a session that keeps its connection, from its greeting on.
pub(super) async fn hold<S: ClientIo>(
    session: &mut Session<'_, S>,
    logged: Box<LoggedIn>,
) -> Result<(), SessionError> {
    let (held, cancel, expires) = held(session, logged);
    relay_to_end(session, held, &cancel, expires).await
}

/// What a session that keeps its connection holds while it relays, in one
/// box sized to it: the whole of its login is let go.
fn held<S: ClientIo>(
    session: &Session<'_, S>,
    logged: Box<LoggedIn>,
) -> (Box<Held>, CancelGuard, Option<SystemTime>) {
    let expires = session.expiry(&logged.login);
    let LoggedIn { login, greeted, .. } = *logged;
    let Greeted { lease, cancel } = greeted;
    let mut relay = Relay::new(None, Instant::now());
    relay.watch(session.settings.config.client_limits);
    relay.observe(session.observed());
    let held = Box::new(Held {
        relay,
        lease,
        _counted: login.hold.map(IdentityHold::counted),
    });
    (held, cancel, expires)
}

/// What a session relaying to its end holds.
pub(super) struct Held {
    pub(super) relay: Relay,
    pub(super) lease: Lease,
    /// What it holds against its identity's limits (its seat, the
    /// connection it keeps), let go when the backend has been handed back.
    pub(super) _counted: Option<Counted>,
}

impl<S: ClientIo> Session<'_, S> {
    /// When the session must end, if its token's expiry is enforced.
    pub(super) fn expiry(&self, login: &SessionLogin) -> Option<SystemTime> {
        login
            .admitted
            .identity
            .as_ref()
            .filter(|_| self.settings.config.enforce_token_expiry)
            .map(|identity| crate::transaction::expiry_time(identity.expires_at))
    }
}

/// Relays until the session ends, then resets and returns the connection
/// to the pool if it can be reused. `relay` may have followed part of the
/// session already (a transaction-pooled client pinned to its connection).
///
/// An expired token or a drain ends the session at its next idle
/// transaction boundary; a forced drain ends it now.
pub(super) async fn relay_to_end<S: ClientIo>(
    session: &mut Session<'_, S>,
    mut held: Box<Held>,
    cancel: &CancelGuard,
    expires: Option<SystemTime>,
) -> Result<(), SessionError> {
    let pipelined = std::mem::take(&mut session.inbox);
    let span = session.span();
    let limits = session.settings.config.client_limits;
    let stops = Stops::new(&session.registered, session.spared_until, expires);
    let client = &mut session.client;
    let Held { relay, lease, .. } = &mut *held;
    let conn = lease.conn();
    relay.forward(&pipelined, conn.stream()).await?;
    drop(pipelined);
    let (stopped, boundary) = relay_until_stop(client, conn, relay, stops).await;
    let parting = Parting::after(stopped.as_ref(), relay);
    let forced = stopped.is_none();
    // The server's last words (a FATAL) are the client's; so is what it
    // sent before a forced drain.
    let last_words = forced || matches!(stopped, Some(Ok(Stop::UpstreamClosed)));
    let ended = span.in_scope(|| {
        if let Some(why) = relay.lost() {
            tracing::debug!(
                why,
                "upstream connection closed: its state could not be followed"
            );
        }
        match stopped {
            None => Some(SessionError::ShuttingDown),
            Some(stopped) => ending(stopped, boundary, limits),
        }
    });
    // The backend goes back, or is closed, before anything waits on a
    // client that may not be reading. Boxed: a reset is a large future
    // that an idle session should not carry.
    let finished = finish(&session.settings, cancel, held.lease, parting);
    Box::pin(finished.instrument(span)).await;
    let relay = &mut held.relay;
    if last_words {
        let flushed = relay.flush_client(&mut session.client);
        let _ = tokio::time::timeout(super::ERROR_WRITE_TIMEOUT, flushed).await;
    }
    match ended {
        // A forced drain mid-message cannot add an ErrorResponse.
        Some(error) if !forced || relay.client_at_boundary() => {
            session.report(&error);
            refuse(&mut session.client, &error).await;
            Ok(())
        }
        _ => {
            relay::close_client(&mut session.client).await;
            Ok(())
        }
    }
}

/// Relays until a side stops, asking the relay to stop at its next idle
/// boundary once the token expires or a drain begins (after the grace of
/// a session that logged in just before it). `None`: a forced drain or the
/// console's `KILL_CLIENT` stopped it wherever it was.
async fn relay_until_stop<C: ClientIo>(
    client: &mut C,
    conn: &mut crate::upstream::Upstream,
    relay: &mut Relay,
    mut stops: Stops<'_>,
) -> (Option<Result<Stop, RelayError>>, Option<Boundary>) {
    let stopped = relay
        .run_heeding(client, conn.stream(), Heard::AfterRelay, |_, cx| {
            stops.poll(cx)
        })
        .await;
    (stopped, stops.asked())
}

/// The error a relay's stop ends the session with, if any: `boundary` says
/// why the proxy asked it to stop at an idle boundary.
pub(super) fn ending(
    stopped: Result<Stop, RelayError>,
    boundary: Option<Boundary>,
    limits: ClientLimits,
) -> Option<SessionError> {
    match stopped {
        Ok(
            Stop::UpstreamClosed | Stop::KeptSpoke | Stop::ClientClosed | Stop::ClientTerminated,
        ) => None,
        Ok(Stop::Idle) => Some(match boundary {
            Some(Boundary::Draining) => SessionError::ShuttingDown,
            // Only an expired token or a drain stops a session that holds
            // its connection.
            _ => {
                tracing::info!("session ended: its token expired");
                SessionError::TokenExpired
            }
        }),
        Ok(Stop::Violation(violation)) => Some(ProtocolViolation::Relay(violation).into()),
        Ok(Stop::IdleInTransaction) => Some(SessionError::IdleInTransaction(
            limits.idle_in_transaction.unwrap_or_default(),
        )),
        Ok(Stop::ClientStalled) => Some(SessionError::ClientStalled(
            limits.stalled_reader.unwrap_or_default(),
        )),
        Err(error) => Some(error.into()),
    }
}

/// How a session leaves its backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Parting {
    /// Idle and clean once reset: back to the pool.
    Reuse,
    /// Closed: the server is gone, or the backend waits for a client whose
    /// state cannot be handed on (it ends when it reads the close).
    Close,
    /// Closed after cancelling what it still runs for a client that is
    /// not there to read it ([`Upstream::abandon`]).
    ///
    /// [`Upstream::abandon`]: crate::upstream::Upstream::abandon
    Abandon,
}

impl Parting {
    /// How to leave the backend of a relay that stopped with `stopped`
    /// (`None`: a forced drain).
    pub(super) fn after(stopped: Option<&Result<Stop, RelayError>>, relay: &Relay) -> Self {
        let clean = matches!(
            stopped,
            Some(Ok(Stop::ClientClosed
                | Stop::ClientTerminated
                | Stop::Idle
                | Stop::IdleInTransaction))
        );
        match stopped {
            _ if clean && relay.between_requests() => Self::Reuse,
            Some(Ok(Stop::UpstreamClosed | Stop::KeptSpoke) | Err(RelayError::Upstream(_))) => {
                Self::Close
            }
            _ if relay.backend_busy() => Self::Abandon,
            _ => Self::Close,
        }
    }
}

/// Hands back a backend the session is done with, as `parting` says,
/// after its client's cancel key stops pointing at it: a key must die
/// before its backend can serve anyone else.
pub(super) async fn finish(
    settings: &Settings,
    cancel: &CancelGuard,
    lease: Lease,
    parting: Parting,
) {
    cancel.retarget(None).await;
    let deadline = Instant::now() + settings.config.pool_limits.internal_query_timeout;
    match (lease, parting) {
        (Lease::Pooled(mut pooled), Parting::Reuse) => match pooled.conn().reset(deadline).await {
            Ok(()) => pooled.release(),
            Err(error) => {
                tracing::debug!(%error, "upstream connection not reusable after its reset")
            }
        },
        (Lease::Pooled(pooled), Parting::Abandon) => pooled.abandon(deadline).await,
        (Lease::Pooled(_), Parting::Close) => {}
        (Lease::Own(upstream), Parting::Abandon) => {
            upstream.abandon(deadline).await;
        }
        (Lease::Own(upstream), Parting::Reuse | Parting::Close) => upstream.terminate().await,
    }
}
