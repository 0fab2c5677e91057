//! A session's standing with the limits per identity ([`crate::limits`]):
//! its client connection counted at login (refused with 53300 at the
//! limit); in session pooling and none, the upstream connection it holds
//! to the end counted as one transaction (refused with 53400 at login); in
//! transaction pooling each transaction counted (the login's brief
//! checkout is not), and one refused answered like a failed statement, so
//! the session goes on. Anonymous sessions have no identity and nothing
//! here applies to them.

use bytes::BytesMut;
use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;

use super::handshake::SessionLogin;
use super::{ClientIo, Session, write_flush};
use crate::classify::Classify as _;
use crate::clients::ClientState;
use crate::config::PoolMode;
use crate::error::SessionError;
use crate::limits::{LimitRefusal, Seat, Turn, Who};
use crate::proto::backend;
use crate::proto::request_end::RequestEnd;
use crate::proxy::Proxy;
use crate::transport::Transport;

/// What an authenticated session holds against its user's and tenant's
/// limits.
pub(super) struct IdentityHold {
    /// Who it is counted as.
    who: Who,
    /// Its client connection, counted until the session ends.
    _seat: Seat,
    /// The upstream connection a session-pooled (or unpooled) session
    /// holds to its end (a pointer, as a turn is boxed: a
    /// transaction-pooled client, idle, has none).
    _lease: Option<Turn>,
}

/// What a session that keeps its connection holds against its identity's
/// limits to its end: no [`Who`], as it asks for nothing more.
pub(super) struct Counted {
    _seat: Seat,
    _lease: Option<Turn>,
}

impl<S: ClientIo> Session<'_, S> {
    /// Counts the logged-in client's connection, and (pooling by session,
    /// or none) the upstream connection it will hold, against its
    /// identity's limits; `None` for an anonymous client.
    pub(super) fn hold_identity(
        &self,
        login: &SessionLogin,
        mode: PoolMode,
    ) -> Result<Option<IdentityHold>, SessionError> {
        let Some(identity) = &login.admitted.identity else {
            return Ok(None);
        };
        let limiter = self.proxy.limiter();
        let mut who = limiter.who(identity, &login.admitted.role);
        let seat = limiter
            .connect(&mut who)
            .map_err(|refusal| counted(self.proxy, self.transport, refusal))?;
        let lease = match mode {
            PoolMode::Transaction => None,
            PoolMode::Session | PoolMode::None => {
                begin(self.proxy, self.transport, Some(&mut who))?
            }
        };
        Ok(Some(IdentityHold {
            who,
            _seat: seat,
            _lease: lease,
        }))
    }
}

/// A transaction for `who` (`None`: anonymous, unlimited), or the limit
/// that refuses it, counted.
pub(super) fn begin(
    proxy: &Proxy,
    transport: Transport,
    who: Option<&mut Who>,
) -> Result<Option<Turn>, LimitRefusal> {
    match who {
        Some(who) => proxy
            .limiter()
            .begin(who)
            .map_err(|refusal| counted(proxy, transport, refusal)),
        None => Ok(None),
    }
}

impl IdentityHold {
    /// Who the session is counted as.
    pub(super) fn who(&mut self) -> &mut Who {
        &mut self.who
    }

    /// What it keeps counted once it will ask for nothing more.
    pub(super) fn counted(self) -> Counted {
        Counted {
            _seat: self._seat,
            _lease: self._lease,
        }
    }
}

/// Counts a refusal in the metrics and hands it on.
fn counted(proxy: &Proxy, transport: Transport, refusal: LimitRefusal) -> LimitRefusal {
    proxy.metrics().identity_limit(transport, refusal.limit);
    refusal
}

/// Answers a transaction-pooled client's request that its limit refused,
/// as Postgres answers a failed one: an ErrorResponse at once, the rest of
/// the request (`first` and what follows, to its Sync) read and dropped,
/// then ReadyForQuery. Nothing reached the server. What the client sent
/// past the request is left in `first`.
pub(super) async fn decline<S: ClientIo>(
    session: &mut Session<'_, S>,
    first: &mut Vec<u8>,
    refusal: &LimitRefusal,
) -> Result<(), SessionError> {
    let error = SessionError::IdentityLimit(refusal.clone());
    // Not `Proxy::report`: the session goes on, and must not end under
    // this reason.
    if let Some(suppressed) = session.proxy.refusals.allow(Instant::now()) {
        tracing::info!(%error, reason = refusal.limit.label(), suppressed, "transaction refused");
    }
    session.registered.set_state(ClientState::Idle);
    let mut out = BytesMut::new();
    if let Some(view) = error.client_view() {
        backend::error_hinted(view.code, &view.message, view.hint, &mut out);
    }
    answer(session, &out).await?;
    let mut end = RequestEnd::default();
    let mut rest = std::mem::take(first);
    loop {
        if let Some(at) = end.feed(&rest) {
            *first = rest.split_off(at.min(rest.len()));
            break;
        }
        rest.clear();
        if !read_more(session, &mut rest).await? {
            // The client left: the caller finds `first` empty and ends.
            return Ok(());
        }
    }
    out.clear();
    backend::ready_for_query_idle(&mut out);
    answer(session, &out).await
}

/// Writes `bytes` to the client, unless it is killed (or a forced drain
/// closes it) first: a client that stops reading must not hold its task
/// past that.
async fn answer<S: ClientIo>(
    session: &mut Session<'_, S>,
    bytes: &[u8],
) -> Result<(), SessionError> {
    tokio::select! {
        biased;
        () = session.registered.closing() => Err(SessionError::ShuttingDown),
        written = write_flush(&mut session.client, bytes) => written.map_err(SessionError::ClientIo),
    }
}

/// Reads the client's next bytes into `into`; false when it closed. A
/// drain or a kill ends the wait (the client holds no backend here).
async fn read_more<S: ClientIo>(
    session: &mut Session<'_, S>,
    into: &mut Vec<u8>,
) -> Result<bool, SessionError> {
    let mut chunk = [0u8; 1024];
    let registered = &session.registered;
    let n = tokio::select! {
        // A kill or a drain first: a client sending without pause must
        // not keep it from being seen.
        biased;
        () = registered.closing() => return Err(SessionError::ShuttingDown),
        () = registered.draining() => return Err(SessionError::ShuttingDown),
        read = session.client.read(&mut chunk) => read.map_err(SessionError::ClientIo)?,
    };
    into.extend_from_slice(chunk.get(..n).unwrap_or_default());
    Ok(n > 0)
}
