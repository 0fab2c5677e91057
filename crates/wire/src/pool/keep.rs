//! Connections kept between transactions: a transaction-pooled client
//! keeps its connection after a transaction while no one else waits for
//! one of its (database, role), so that its next transaction needs no
//! checkout, as in session pooling ([`PoolLimits::keep_between_transactions`]).
//!
//! A kept connection stays checked out: it counts against the pool's
//! size, and `SHOW SERVERS` lists it as active, linked to its client. It
//! comes back at the client's next idle boundary (at once if the client
//! is idle) when a checkout of its slot has to wait for a place, on
//! `RECONNECT`, `PAUSE` or new limits (a recall), past its lifetime, and
//! once the client has been quiet for the keep's length: the reaper wakes
//! every kept connection's client to look ([`UpstreamPool::look_at_kept`]).
//!
//! The pool grows as it did without keeping: a checkout that finds no
//! connection idle logs in a new one while the slot has room, rather than
//! take over another client's session (`pick.rs`), kept or not.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

use super::{Pooled, Slot, UpstreamPool};
use crate::capacity::Held;
use crate::config::PoolLimits;
use crate::upstream::Owner;

/// A connection a client keeps between its transactions, and what ends
/// the keep.
pub struct Keep {
    slot: Arc<Slot>,
    /// The slot's recalls when the connection was checked out.
    recalls: u64,
    /// The connection's lifetime ends then.
    until: Instant,
    /// How long the client may stay quiet.
    quiet: Duration,
    /// Counted in the slot's kept connections while it lasts.
    _kept: Held,
}

impl UpstreamPool {
    /// A keep of `pooled` by `client`, at an idle transaction boundary at
    /// `now`; `None` when it goes back now instead: keeping is off, a
    /// checkout waits in its slot, the slot is over its size, its database
    /// is paused, the connection does not hold the client's own session
    /// (its identity settings changed: the next transaction attaches it
    /// afresh), or it is broken, past its lifetime or retired by
    /// `RECONNECT`.
    ///
    /// A call made after this answer and before [`Keep::called`] is
    /// listened to is not heard; [`Keep::goes_on`], asked once it is,
    /// sees every one that matters (a wait, a recall).
    pub fn keep(&self, pooled: &Pooled, client: u64, now: Instant) -> Option<Keep> {
        let slot = &pooled.slot;
        // A recall since the connection was checked out (a reload while
        // its transaction ran) ends the keep before it begins: the next
        // transaction is checked out, and counted, under what is in force.
        let recalls = pooled.recalls;
        if slot.waiting.get() > 0
            || slot.recalls.load(Ordering::SeqCst) != recalls
            || self.gates.is_paused(&slot.database)
        {
            return None;
        }
        let conn = pooled.conn.as_deref()?;
        let connections = slot.connections();
        let limits = connections.limits;
        let until = pooled.created + limits.server_lifetime;
        let kept = !limits.keep_between_transactions.is_zero()
            && slot.busy.get() <= connections.size
            && conn.owner() == Owner::Client(client)
            && !conn.is_broken()
            && now < until
            && !Slot::retired(&connections, pooled.created);
        kept.then(|| Keep {
            slot: Arc::clone(slot),
            recalls,
            until,
            quiet: limits.keep_between_transactions,
            _kept: slot.kept.hold(),
        })
    }

    /// Wakes the clients keeping connections of this pool to look at
    /// whether they still may (the reaper's rounds: a quiet client gives
    /// its connection back).
    pub(super) fn look_at_kept(&self) {
        if self.limits().keep_between_transactions.is_zero() {
            return;
        }
        for slot in self.slots_of(None) {
            if slot.kept.get() > 0 {
                slot.call_keepers.call();
            }
        }
    }

    /// Calls back the connections of `database` (`None`: of all) that
    /// clients keep between their transactions: each comes back at its
    /// client's next idle boundary (at once for a client that is idle).
    /// For `PAUSE`, after its gate is shut.
    pub fn recall_kept(&self, database: Option<&str>) {
        for slot in self.slots_of(database) {
            slot.recall_kept();
        }
    }
}

impl Slot {
    /// Ends every keep of this slot's connections made before now.
    pub(super) fn recall_kept(&self) {
        self.recalls.fetch_add(1, Ordering::SeqCst);
        self.call_keepers.call();
    }
}

impl Keep {
    /// Completes when the client should look again at whether it may go
    /// on ([`Keep::goes_on`], and its quiet time): a checkout waits, a
    /// recall, the reaper's round. Listening from now on: a call made
    /// before is not heard (look at [`Keep::goes_on`] after this).
    pub fn called(&self) -> Call<'_> {
        let calls = &self.slot.call_keepers;
        let seen = calls.made.load(Ordering::SeqCst);
        let mut notified = Box::pin(calls.notify.notified());
        notified.as_mut().enable();
        Call {
            calls,
            notified,
            seen,
            polled: false,
        }
    }

    /// Whether the keep may go on past an idle boundary at `now`: nobody
    /// waits for a place in the slot, no recall came, the lifetime is not
    /// over. Two atomic loads: asked at every boundary.
    pub fn goes_on(&self, now: Instant) -> bool {
        self.slot.waiting.get() == 0
            && self.slot.recalls.load(Ordering::SeqCst) == self.recalls
            && now < self.until
    }

    /// How long the client may stay quiet before the connection goes back.
    pub fn quiet(&self) -> Duration {
        self.quiet
    }
}

/// The calls to a slot's keepers: each wakes every keeper listening, and
/// is counted, so that a keeper's poll looks at the `Notify` (a lock) only
/// when a call was made since its last: a kept client's task is polled
/// twice a transaction, and calls are rare.
#[derive(Default)]
pub(super) struct Calls {
    notify: Notify,
    made: AtomicU64,
}

impl Calls {
    /// Calls every keeper listening now.
    pub(super) fn call(&self) {
        self.made.fetch_add(1, Ordering::SeqCst);
        self.notify.notify_waiters();
    }
}

/// A keeper listening for a call ([`Keep::called`]).
pub struct Call<'a> {
    calls: &'a Calls,
    notified: Pin<Box<Notified<'a>>>,
    /// The calls made before it listened: while the count is still this,
    /// no call can have reached it.
    seen: u64,
    /// Whether it was polled (and so registered the task's waker, which a
    /// task keeps for its life).
    polled: bool,
}

impl Future for Call<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.polled && self.calls.made.load(Ordering::SeqCst) == self.seen {
            return Poll::Pending;
        }
        self.polled = true;
        self.notified.as_mut().poll(cx)
    }
}

/// How often the reaper must look at kept connections under `limits`, if
/// any are kept: a quiet client's connection comes back within half a
/// keep of its quiet time.
pub(super) fn look_period(limits: &PoolLimits) -> Option<Duration> {
    let keep = limits.keep_between_transactions;
    (!keep.is_zero()).then(|| (keep / 2).max(Duration::from_millis(50)))
}
