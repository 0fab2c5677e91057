//! Transaction pooling: the client holds an upstream connection from the
//! first message of a transaction to the idle ReadyForQuery that ends it
//! (see [`crate::transaction`] for how its session follows it).
//!
//! Between transactions the client's task holds nothing but a small read
//! buffer. A transaction checks a connection out for the client (its own
//! if free), points the client's cancel key at it, relays until the ledger
//! proves the backend idle, settles what the transaction left in the
//! session, and releases the connection, or keeps it for the client's next
//! transactions while nobody waits for one (`kept`, `pool/keep.rs`). A
//! client whose session cannot move (LISTEN, SET ROLE, ...) keeps its
//! connection to the end.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::end::{self, Held, Parting, relay_to_end};
use super::greet::Greeted;
use super::lease::{self, Lease, Readied, Readying};
use super::limited::{self, IdentityHold};
use super::stops::{self, Stops};
use super::{ClientIo, LoggedIn, Session};
use crate::cancel::CancelGuard;
use crate::clients::ClientState;
use crate::error::SessionError;
use crate::limits::Turn;
use crate::pool::{Fairness, PoolKey, Pooled, UpstreamPool};
use crate::relay::{self, Heard, Heed, Relay, RelayError, Stop};
use crate::transaction::PooledClient;

/// Serves a transaction-pooled client from its greeting on.
pub(super) async fn serve<S: ClientIo>(
    session: &mut Session<'_, S>,
    logged: Box<LoggedIn>,
) -> Result<(), SessionError> {
    let mut between = between(session, logged);
    let served = serve_transactions(session, &mut between).await;
    between.pool.disown(&between.key, between.client.id);
    // The result moved whole into the future that ends the session: kept
    // here across its await, it would take its own space in this future,
    // held by every idle client.
    end_served(session, &between.cancel, served).await
}

/// Ends a session whose transactions were served: relays a pinned client
/// to its end, or refuses one whose transaction failed.
async fn end_served<S: ClientIo>(
    session: &mut Session<'_, S>,
    cancel: &CancelGuard,
    served: Result<Option<Box<Pinned>>, SessionError>,
) -> Result<(), SessionError> {
    match served {
        Ok(Some(pinned)) => {
            let Pinned {
                held,
                expires,
                turn,
            } = *pinned;
            let ended = Box::pin(relay_to_end(session, held, cancel, expires)).await;
            drop(turn);
            ended
        }
        Ok(None) => Ok(()),
        Err(error) => Box::pin(session.refused(error)).await,
    }
}

/// What a transaction-pooled client holds between its transactions
/// (besides its stream): no upstream connection, no buffers, none of its
/// login but what its next transaction needs.
///
/// It lives in the client's task, which is 1,408 bytes: a multiple of the
/// 128 bytes tokio aligns a task to. A field of 48 bytes more here (the
/// relay's counters, lent to each transaction) made the task 1,536 bytes
/// and every idle client 0.5 KiB larger (`benches/idle_memory.rs`).
struct Between {
    pool: Arc<UpstreamPool>,
    /// Its (database, role) in the pool.
    key: PoolKey,
    client: PooledClient,
    /// Its seat, counted to the end; each transaction is counted on its own.
    hold: Option<IdentityHold>,
    /// Whose turn its checkouts take in a busy pool.
    fair_key: Box<str>,
    cancel: CancelGuard,
}

/// The client's state between transactions, from its login: the connection
/// it logged in on goes back to the pool, the rest of the login is let go.
fn between<S: ClientIo>(session: &Session<'_, S>, logged: Box<LoggedIn>) -> Between {
    let expires = session.expiry(&logged.login);
    let LoggedIn { login, greeted, .. } = *logged;
    let Greeted { lease, cancel } = greeted;
    if let Lease::Pooled(pooled) = lease {
        pooled.release();
    }
    let claims = login.claims().map(str::to_owned);
    let mut settings = login.settings;
    settings.shrink_to_fit();
    let id = (login.client_id, &session.settings.claims_key);
    let client = PooledClient::new(id, claims, settings, expires);
    let pool = session
        .proxy
        .pool_for(login.admitted.destination.server.as_ref());
    Between {
        key: pool.key(&login.admitted.database, &login.admitted.role),
        pool,
        client,
        hold: login.hold,
        fair_key: login.fair_key,
        cancel,
    }
}

/// A client pinned to its connection: what it goes on with.
struct Pinned {
    held: Box<Held>,
    /// The token's expiry.
    expires: Option<SystemTime>,
    /// The connection counted against the identity's transaction limit.
    turn: Option<Turn>,
}

/// How a transaction ended.
enum Done {
    /// At an idle boundary, the connection released: the client goes on.
    Next,
    /// The client's session cannot move: it keeps the connection.
    Pinned(Box<Pinned>),
    /// The session ended with it.
    Left,
}

/// Runs the client's transactions until it leaves (`None`) or its session
/// pins it to a connection.
async fn serve_transactions<S: ClientIo>(
    session: &mut Session<'_, S>,
    between: &mut Between,
) -> Result<Option<Box<Pinned>>, SessionError> {
    let mut first = First::Left(std::mem::take(&mut session.inbox).to_vec());
    loop {
        if !next_transaction(session, &mut first).await? {
            return Ok(None);
        }
        if between.client.expired(SystemTime::now()) {
            return Err(SessionError::TokenExpired);
        }
        // Boxed: a transaction's future (checkout, relay, settle) is
        // large and exists only while the transaction runs; the client's
        // task, held by every idle client, stays small. One allocation a
        // transaction, as the boxed checkout it holds was before.
        match boxed(|| transaction(session, between, &mut first)).await? {
            Done::Next => {}
            Done::Pinned(pinned) => return Ok(Some(pinned)),
            Done::Left => return Ok(None),
        }
    }
}

/// Bytes read from the client between transactions, not yet sent on: the
/// start of its next transaction.
enum First {
    /// What a read of the idle client found (`.1` bytes), held in place:
    /// a transaction allocates nothing for its first bytes.
    Read([u8; FIRST_READ], u8),
    /// What was left over from the login or from a refused transaction.
    Left(Vec<u8>),
}

/// Bytes the read of an idle client takes at most: the whole of most
/// simple queries, the start of a larger request (the relay reads the
/// rest).
const FIRST_READ: usize = 64;

impl First {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Read(head, len) => head.get(..usize::from(*len)).unwrap_or_default(),
            Self::Left(bytes) => bytes,
        }
    }

    fn clear(&mut self) {
        *self = Self::Read([0; FIRST_READ], 0);
    }

    /// Takes the bytes out as a vector, leaving none.
    fn take(&mut self) -> Vec<u8> {
        let bytes = match self {
            Self::Read(..) => self.bytes().to_vec(),
            Self::Left(bytes) => std::mem::take(bytes),
        };
        self.clear();
        bytes
    }
}

/// The future `make` makes, on the heap: allocated first, so the future
/// can be written there (`Box::pin` of a made future copies all of it,
/// its unused states included).
fn boxed<F: std::future::Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// Runs one transaction, its first bytes in `first`: counted against the
/// identity's limit of transactions (one refused is answered with an error
/// and the session goes on), a connection checked out, relayed to the idle
/// boundary, settled and released.
async fn transaction<S: ClientIo>(
    session: &mut Session<'_, S>,
    between: &mut Between,
    first: &mut First,
) -> Result<Done, SessionError> {
    let Between {
        pool,
        key,
        client,
        hold,
        fair_key,
        cancel,
    } = between;
    // The clock is read once for the transaction's start: a checkout that
    // finds a connection free and its session in place hands it out at
    // this time, and the relay starts there (one that waits or runs
    // queries reads its own).
    let started = Instant::now();
    let who = hold.as_mut().map(IdentityHold::who);
    let turn = match limited::begin(session.proxy, session.transport, who) {
        Ok(turn) => turn,
        Err(refusal) => {
            let span = session.span();
            let mut request = first.take();
            Box::pin(limited::decline(session, &mut request, &refusal).instrument(span)).await?;
            *first = First::Left(request);
            return Ok(Done::Next);
        }
    };
    let readying = Readying::Transaction(client);
    let settings = &session.settings;
    session.registered.set_state(ClientState::Waiting);
    let whose = (client.id, Fairness::new(fair_key));
    let readied = lease::checkout(pool, settings, key, whose, readying, started).await?;
    // Its own future: the checkout's and the relay's then share their
    // space in this one (a value live across both would be kept apart,
    // and so would `pooled` if it were borrowed here before it moves).
    relay_transaction(session, (client, cancel, pool), readied, turn, first).await
}

/// Relays a transaction on the connection checked out for it, to the
/// idle boundary, then settles and releases it (or pins the client).
///
/// Not an async fn, which would keep its arguments twice: the block uses
/// them in place. The relay is boxed on its own, so that both of a
/// transaction's allocations stay small (with glibc's allocator, the
/// 2,232-byte future the relay made missed its per-thread cache, and
/// every transaction paid the slower path).
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
fn relay_transaction<'a, S: ClientIo>(
    session: &'a mut Session<'_, S>,
    (client, cancel, pool): (&'a mut PooledClient, &'a CancelGuard, &'a UpstreamPool),
    Readied {
        mut pooled,
        at: ready_at,
        ..
    }: Readied,
    turn: Option<Turn>,
    first: &'a mut First,
) -> impl std::future::Future<Output = Result<Done, SessionError>> + Send + 'a {
    async move {
        cancel.retarget(Some(pooled.conn().cancel_key())).await;
        let settings = &session.settings;
        let tracker = Some(client.lend_tracker());
        // Written in place: `Box::new` would build it beside and copy it.
        let mut relay = Box::write(Box::new_uninit(), Relay::new(tracker, ready_at));
        let conn = pooled.conn();
        relay.watch(settings.config.client_limits);
        relay.observe(session.observed());
        relay.stop_at_idle(true);
        relay
            .deliver(&conn.take_for_client(), &mut session.client)
            .await?;
        let forwarded = relay.forward(first.bytes(), conn.stream()).await;
        first.clear();
        let stopped = match forwarded {
            Ok(()) => {
                let registered = &session.registered;
                let killed = |_: &Relay, cx: &mut Context<'_>| {
                    registered.poll_told(false, cx).map(|_| Heed::Now)
                };
                let client = &mut session.client;
                let heeded = relay.run_heeding(client, conn.stream(), Heard::AfterRelay, killed);
                match heeded.await {
                    Some(stopped) => stopped,
                    None => {
                        let span = session.span();
                        return Box::pin(forced(session, *relay, pooled, cancel).instrument(span))
                            .await;
                    }
                }
            }
            Err(error) => Err(error),
        };
        let mut stopped = stopped;
        // A keep that was called off is not taken up again before the
        // client's next transaction has checked its connection out anew.
        let mut may_keep = true;
        while let Ok(Stop::Idle) = stopped {
            if let Some(tracker) = relay.take_tracker() {
                client.return_tracker(tracker);
            }
            let idle_since = match settle(session, client, &mut pooled, &mut relay).await? {
                Settled::Released(idle_since) => idle_since,
                Settled::Pinned(reason) => {
                    session.span().in_scope(|| {
                        tracing::info!(
                            reason,
                            "client keeps its upstream connection until it leaves"
                        );
                    });
                    relay.stop_at_idle(false);
                    let held = Box::new(Held {
                        relay: *relay,
                        lease: Lease::Pooled(pooled),
                        _counted: None,
                    });
                    return Ok(Done::Pinned(Box::new(Pinned {
                        held,
                        expires: client.expires,
                        turn,
                    })));
                }
            };
            // A transaction counted against its identity's limit is
            // counted on its own: its connection goes back.
            if !may_keep || turn.is_some() {
                cancel.retarget(None).await;
                pooled.release_at(idle_since);
                return Ok(Done::Next);
            }
            let kept = kept(session, client, pool, (&mut pooled, &mut relay), idle_since).await;
            match kept {
                Kept::Refused => {
                    cancel.retarget(None).await;
                    pooled.release_at(idle_since);
                    return Ok(Done::Next);
                }
                Kept::Ended {
                    stopped: ended,
                    called_off,
                } => {
                    stopped = ended;
                    may_keep = !called_off;
                }
                // What the relay has not delivered (a slow reader's
                // answer) is flushed where it can be; the backend is
                // closed, as for any client closed mid-session.
                Kept::Closing => {
                    let span = session.span();
                    return Box::pin(forced(session, *relay, pooled, cancel).instrument(span))
                        .await;
                }
            }
        }
        if let Ok(Stop::KeptSpoke) = stopped {
            // The client's next transaction checks out another.
            tracing::debug!("a kept upstream connection spoke while its client was idle: closed");
            cancel.retarget(None).await;
            pooled.conn().mark_broken();
            drop(pooled);
            return Ok(Done::Next);
        }
        if let Some(tracker) = relay.take_tracker() {
            client.return_tracker(tracker);
        }
        let left = matches!(
            stopped,
            Ok(Stop::ClientClosed | Stop::ClientTerminated) | Err(RelayError::Client(_))
        );
        if left && relay.is_idle() && !client.unsettled() {
            // A client that left at an idle boundary, its session settled
            // (it kept its connection, idle): the connection goes back
            // holding that session, as it would have at its last
            // transaction's end (the session's end disowns it: the next
            // client resets it). Inside a transaction block, or anywhere
            // else, the general path resets it (a ROLLBACK first).
            cancel.retarget(None).await;
            pooled.release();
            relay::close_client(&mut session.client).await;
            return Ok(Done::Left);
        }
        // Boxed, as are the other rare paths.
        let span = session.span();
        let finished = finish_transaction(session, *relay, pooled, cancel, stopped);
        Box::pin(finished.instrument(span)).await
    }
}

/// How a stretch of transactions on a kept connection ended.
enum Kept {
    /// The pool did not let the connection be kept: it goes back now.
    Refused,
    /// The relay stopped: at an idle boundary (`Stop::Idle`) where the
    /// general path takes over (to settle the session, or because the
    /// keep was `called_off` or may not go on), or for good.
    Ended {
        stopped: Result<Stop, RelayError>,
        called_off: bool,
    },
    /// The session is being closed (a forced drain, `KILL_CLIENT`).
    Closing,
}

/// Relays the client's transactions on the connection it keeps between
/// them (`crate::pool::Keep`), from an idle boundary reached at
/// `idle_since`: each needs no checkout, no new relay and no cancel-key
/// change, as in session pooling. It ends at a boundary where the session
/// must be settled or the keep may not go on; the keep is called off, and
/// the connection comes back at the next idle boundary (at once if the
/// client is idle), when a checkout of its slot waits, on a recall, once
/// the client has been quiet for the keep's length, when its token
/// expires, when a drain reaches it, or when it is being closed.
async fn kept<S: ClientIo>(
    session: &mut Session<'_, S>,
    client: &mut PooledClient,
    pool: &UpstreamPool,
    (pooled, relay): (&mut Pooled, &mut Relay),
    idle_since: Instant,
) -> Kept {
    let Some(keep) = pool.keep(pooled, client.id, idle_since) else {
        return Kept::Refused;
    };
    let mut called = keep.called();
    // Listening now: a wait or a recall since the pool's answer is seen
    // here, any later one is heard.
    if !keep.goes_on(idle_since) {
        return Kept::Refused;
    }
    let registered = &session.registered;
    let mut stops = Stops::new(registered, session.spared_until, client.expires);
    let io = &mut session.client;
    let mut ending = false;
    let mut again = false;
    loop {
        relay.follow(client.lend_tracker());
        if again {
            // Its last run stopped at this boundary; nothing read the
            // streams since.
            relay.keep_again();
        } else {
            relay.keep();
        }
        again = true;
        // The stops are heard before the relay reads on: each only asks
        // it to stop at its next idle boundary.
        let stream = pooled.conn().stream();
        let heeded = relay.run_heeding(io, stream, Heard::BeforeRelay, |relay, cx| {
            if let Poll::Ready(heed) = stops.poll(cx) {
                ending = true;
                return Poll::Ready(heed);
            }
            while !ending && Pin::new(&mut called).poll(cx).is_ready() {
                // Listening again (polled on the next pass) before
                // looking: a call made while it looks is heard.
                called = keep.called();
                let now = Instant::now();
                let quiet = relay.is_idle() && relay.last_active() + keep.quiet() <= now;
                if quiet || !keep.goes_on(now) {
                    ending = true;
                    return Poll::Ready(Heed::AtIdle);
                }
            }
            Poll::Pending
        });
        let Some(stopped) = heeded.await else {
            return Kept::Closing;
        };
        if let Some(tracker) = relay.take_tracker() {
            client.return_tracker(tracker);
        }
        let now = relay.stopped_at().unwrap_or_else(Instant::now);
        // What the stops would say had they been polled at this very
        // boundary.
        let stop_now = stops.due(now, client.expires);
        let at_boundary = matches!(stopped, Ok(Stop::Idle)) && !ending && !stop_now;
        let goes_on = keep.goes_on(now);
        if !at_boundary || !goes_on || client.unsettled() {
            return Kept::Ended {
                stopped,
                called_off: ending || stop_now || !goes_on,
            };
        }
    }
}

/// Waits, holding nothing, for the client's next transaction to start
/// (its first bytes in `first`); false when the client leaves instead. A
/// drain closes the client here, at a boundary, before its next
/// transaction starts (a client that just logged in first gets its
/// grace).
async fn next_transaction<S: ClientIo>(
    session: &mut Session<'_, S>,
    first: &mut First,
) -> Result<bool, SessionError> {
    let registered = &session.registered;
    let spared_until = session.spared_until;
    // Checked here too: a client whose next transaction is already sent
    // finds the read ready at once, and must not get past a kill that way.
    if registered.is_closing() || registered.is_draining() && Instant::now() >= spared_until {
        return Err(SessionError::ShuttingDown);
    }
    if first.bytes().is_empty() {
        // Idle: no upstream connection, no buffers beyond this one.
        first.clear();
        let First::Read(head, len) = first else {
            unreachable!("`clear` leaves a read")
        };
        let drained = stops::drain_reaches(registered, spared_until);
        let n = tokio::select! {
            // A kill first; then the client's bytes: a transaction that
            // has started runs before a drain closes the client.
            biased;
            () = registered.closing() => return Err(SessionError::ShuttingDown),
            read = session.client.read(head) => read.map_err(SessionError::ClientIo)?,
            () = drained => return Err(SessionError::ShuttingDown),
        };
        *len = u8::try_from(n).unwrap_or(0);
    }
    // Between transactions the client is at a message boundary, so its
    // first byte is a message tag.
    Ok(first.bytes().first().is_some_and(|&tag| tag != b'X'))
}

/// What became of the connection after a transaction ended idle.
enum Settled {
    /// It can go back to the pool, idle since then.
    Released(Instant),
    /// The client's session cannot move: it keeps the connection.
    Pinned(&'static str),
}

async fn settle<S: ClientIo>(
    session: &mut Session<'_, S>,
    client: &mut PooledClient,
    pooled: &mut Pooled,
    relay: &mut Relay,
) -> Result<Settled, SessionError> {
    if !client.unsettled() {
        // Idle since the relay stopped (the time it read then).
        let idle_since = relay.stopped_at().unwrap_or_else(Instant::now);
        return Ok(Settled::Released(idle_since));
    }
    let deadline = Instant::now() + session.settings.config.pool_limits.internal_query_timeout;
    let conn = pooled.conn();
    // Boxed: restoring a session runs queries, a large future, in few
    // transactions; the transaction's own future stays small.
    let settled = Box::pin(client.settle(conn, deadline).instrument(session.span()));
    match settled.await {
        Ok(pinned) => {
            relay
                .deliver(&conn.take_for_client(), &mut session.client)
                .await?;
            Ok(pinned.map_or_else(|| Settled::Released(Instant::now()), Settled::Pinned))
        }
        // Its next transaction would run without the settings, prepared
        // statements or identity this one left: end the session instead.
        Err(error) => Err(SessionError::SessionStateLost(error)),
    }
}

/// A transaction that did not end at an idle boundary ended the session:
/// the client left, the server closed, a limit ran out, or the client
/// broke the protocol.
async fn finish_transaction<S: ClientIo>(
    session: &mut Session<'_, S>,
    mut relay: Relay,
    pooled: Pooled,
    cancel: &CancelGuard,
    stopped: Result<Stop, RelayError>,
) -> Result<Done, SessionError> {
    let parting = Parting::after(Some(&stopped), &relay);
    if let Some(why) = relay.lost() {
        tracing::debug!(
            why,
            "upstream connection closed: its state could not be followed"
        );
    }
    end::finish(&session.settings, cancel, Lease::Pooled(pooled), parting).await;
    if matches!(stopped, Ok(Stop::UpstreamClosed)) {
        // The server's last words (a FATAL) are the client's.
        let _ = tokio::time::timeout(
            super::ERROR_WRITE_TIMEOUT,
            relay.flush_client(&mut session.client),
        )
        .await;
    }
    match end::ending(stopped, None, session.settings.config.client_limits) {
        Some(error) => Err(error),
        None => {
            relay::close_client(&mut session.client).await;
            Ok(Done::Left)
        }
    }
}

/// A forced drain caught the client inside a transaction: its backend is
/// closed, after a cancel if it still works (the server rolls the
/// transaction back); the client gets 57P01 if it is at a message
/// boundary, else only the close.
async fn forced<S: ClientIo>(
    session: &mut Session<'_, S>,
    mut relay: Relay,
    pooled: Pooled,
    cancel: &CancelGuard,
) -> Result<Done, SessionError> {
    let parting = Parting::after(None, &relay);
    end::finish(&session.settings, cancel, Lease::Pooled(pooled), parting).await;
    let flushed = tokio::time::timeout(
        super::ERROR_WRITE_TIMEOUT,
        relay.flush_client(&mut session.client),
    )
    .await;
    if matches!(flushed, Ok(Ok(()))) && relay.client_at_boundary() {
        return Err(SessionError::ShuttingDown);
    }
    relay::close_client(&mut session.client).await;
    Ok(Done::Left)
}
