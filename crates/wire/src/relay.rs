//! Byte relay between an authenticated client and its upstream backend.
//!
//! The relay does not parse queries: bytes flow both ways untouched, in one
//! task with one buffer per direction, until a side closes or fails or the
//! session reaches an idle transaction boundary it was asked to stop at
//! (transaction pooling, an expired token, a drain). [`Framer`]s follow the
//! message headers as they pass and hand each boundary to the
//! [`Ledger`], which knows whether the server still owes the client
//! anything, and, in transaction pooling, to the [`Tracker`], which keeps
//! what the client's session must carry to another connection. The
//! client's Terminate is never forwarded, so the upstream connection
//! survives the client for the pool; a message the ledger refuses is not
//! forwarded either, and ends the relay.

use std::future::{Future as _, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::audit::{Per, Recorder, SessionAudit};
use crate::clients::{Activity, ClientState};
use crate::metrics::Tally;
use crate::proto::framer::{Frame, Framer, TagSet};
use crate::proto::ledger::{self, Ledger, Violation};
use crate::transaction::Tracker;

/// Buffer for client-to-server bytes: queries and binds are small.
const CLIENT_BUFFER: usize = 2 * 1024;
/// Buffer for server-to-client bytes: result rows.
const SERVER_BUFFER: usize = 8 * 1024;
/// Largest message body kept for the tracker (a named Parse to replay).
const MAX_CAPTURED: usize = 256 * 1024;

/// A stream that can tell, without registering a waker, that a read would
/// find nothing new since its last one. The relay's poll reads a side it
/// already left waiting only when this cannot say so: each such read costs
/// a lock and a waker check in tokio, and does nothing.
pub trait ReadHint {
    /// `true` only when a read is known to find nothing (tokio's readiness
    /// for it is clear); `false` when it may, or the stream cannot tell.
    fn known_unreadable(&self) -> bool {
        false
    }
}

impl<T: ReadHint + ?Sized> ReadHint for &mut T {
    fn known_unreadable(&self) -> bool {
        (**self).known_unreadable()
    }
}

/// An in-memory pipe cannot tell.
impl ReadHint for tokio::io::DuplexStream {}

/// A side's read as the relay left it.
#[derive(Debug, Clone, Copy, Default)]
struct Armed {
    /// The last read was pending on I/O, so the waker of that poll is
    /// registered with the stream until a readable event wakes it (and
    /// sets the readiness [`ReadHint`] reads). A read pending because the
    /// task's cooperative budget ran out registers nothing, and does not
    /// arm.
    client: bool,
    server: bool,
    /// The waker those reads registered (its data and vtable addresses,
    /// as [`std::task::Waker::will_wake`] compares them): a poll with
    /// another waker reads both sides.
    waker: (usize, usize),
}

impl Armed {
    /// Notes a pending read of a side: armed if the budget was not why.
    fn pending() -> bool {
        tokio::task::coop::has_budget_remaining()
    }

    /// Starts a poll with `waker`: what was armed under another is not.
    fn poll_with(&mut self, waker: &std::task::Waker) {
        let id = crate::waker_id::waker_id(waker);
        if self.waker != id {
            *self = Self {
                waker: id,
                ..Self::default()
            };
        }
    }
}

/// Why [`Relay::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The client closed its connection.
    ClientClosed,
    /// The client sent Terminate (not forwarded).
    ClientTerminated,
    /// The upstream server closed (shutdown, FATAL, terminated backend).
    UpstreamClosed,
    /// The session reached an idle transaction boundary and was asked to
    /// stop there ([`Relay::stop_at_idle`]); the client has received all
    /// the server sent.
    Idle,
    /// A connection kept between transactions ([`Relay::keep`]) spoke or
    /// closed while the session sat idle, owing the client nothing: what
    /// it sent was not delivered, and the connection is not to be used
    /// again (as a pooled connection that speaks while idle is not).
    KeptSpoke,
    /// The client sent a message that must not reach the server.
    Violation(Violation),
    /// The client sat idle inside a transaction block past
    /// [`ClientLimits::idle_in_transaction`].
    IdleInTransaction,
    /// The client left results unread past [`ClientLimits::stalled_reader`].
    ClientStalled,
}

/// What the world outside a relay says to it ([`Relay::run_heeding`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heed {
    /// Stop at the next idle transaction boundary.
    AtIdle,
    /// Stop now, wherever the session is.
    Now,
}

/// When [`Relay::run_heeding`] asks what the world outside says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heard {
    /// After each poll of the relay: what is in flight, and what the
    /// client already sent, is relayed before a stop is asked for, and a
    /// relay that stops in the same poll stops for its own reason.
    AfterRelay,
    /// Before each poll of the relay: a stop at the next idle boundary is
    /// asked for before the relay reads on.
    BeforeRelay,
}

/// An I/O failure in the relay, by the side that failed: a lost backend
/// is the operator's concern, a client that vanished is routine.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// Reading from or writing to the client failed.
    #[error("client I/O: {0}")]
    Client(#[source] io::Error),
    /// Reading from or writing to the upstream server failed.
    #[error("upstream I/O: {0}")]
    Upstream(#[source] io::Error),
}

/// Limits on a client that holds its backend without using it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientLimits {
    /// How long a client may sit idle inside a transaction block.
    pub idle_in_transaction: Option<Duration>,
    /// How long a client may leave results unread.
    pub stalled_reader: Option<Duration>,
}

/// Where a relay reports what it moves: the session's counters (bytes,
/// and each transaction and query with its time) and its state in the
/// client registry. Made once a session and shared with each of its relays
/// ([`Relay::observe`] takes an `Arc`): a transaction-pooled session makes
/// a relay per transaction, and a copy of these handles was eight atomic
/// reference counts each time.
#[derive(Debug)]
pub struct Observed {
    /// The counters.
    pub tally: Tally,
    /// The client's state, set to active and idle as transactions start
    /// and end.
    pub activity: Activity,
    /// The session's audit log, when `[audit]` is on: a line at each
    /// transaction's (or statement's) end.
    pub audit: Option<Arc<SessionAudit>>,
}

/// The timer behind a [`ClientLimits`], armed only while a limit can run out.
struct Watchdog {
    watch: ClientLimits,
    sleep: Option<Pin<Box<Sleep>>>,
    /// When the client last sent something.
    last_read: Instant,
    /// When the client last accepted bytes, or bytes started waiting for it.
    last_written: Instant,
}

/// One direction's buffer: bytes read and not yet written. The buffer is
/// held only while the pipe is in use: an idle session's relay holds none
/// ([`Pipe::release`]), and takes one from the thread's spares
/// (`relay/spare.rs`) when a side has something to say.
struct Pipe {
    /// Empty (no allocation) while released.
    buf: Box<[u8]>,
    /// The size of the buffer it takes.
    size: usize,
    start: usize,
    end: usize,
    /// Written but not flushed (TLS and WebSocket streams buffer).
    unflushed: bool,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            spare::give(std::mem::take(&mut self.buf));
        }
    }
}

impl Pipe {
    fn new(size: usize) -> Self {
        Self {
            buf: Box::default(),
            size,
            start: 0,
            end: 0,
            unflushed: false,
        }
    }

    /// The buffer, taken from the spares if the pipe holds none.
    fn buffer(&mut self) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = spare::take(self.size);
        }
        &mut self.buf
    }

    /// Gives the buffer back to the thread's spares if nothing in it
    /// waits to be written.
    fn release(&mut self) {
        if self.settled() && !self.buf.is_empty() {
            spare::give(std::mem::take(&mut self.buf));
            (self.start, self.end) = (0, 0);
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    fn pending(&self) -> &[u8] {
        self.buf.get(self.start..self.end).unwrap_or_default()
    }

    /// Loads `chunk` (at most the buffer's size) as the bytes to write.
    fn load(&mut self, chunk: &[u8]) {
        let buf = self.buffer();
        let len = chunk.len().min(buf.len());
        buf[..len].copy_from_slice(&chunk[..len]);
        (self.start, self.end) = (0, len);
    }

    /// Reads into the empty buffer; `Ok(0)` is end of stream.
    fn poll_fill<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
    ) -> Poll<io::Result<usize>> {
        debug_assert!(self.is_empty());
        let mut read = ReadBuf::new(self.buffer());
        ready!(Pin::new(reader).poll_read(cx, &mut read))?;
        let n = read.filled().len();
        (self.start, self.end) = (0, n);
        Poll::Ready(Ok(n))
    }

    /// Writes what is buffered and flushes; `Ready` once all of it is out.
    fn poll_drain<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
    ) -> Poll<io::Result<()>> {
        while !self.is_empty() {
            let n = ready!(Pin::new(&mut *writer).poll_write(cx, self.pending()))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.start += n;
            self.unflushed = true;
        }
        if self.unflushed {
            ready!(Pin::new(writer).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Drains what it can without waiting; returns whether anything moved.
    fn poll_progress<W: AsyncWrite + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        writer: &mut W,
    ) -> io::Result<bool> {
        if self.settled() {
            return Ok(false);
        }
        let before = self.start;
        match self.poll_drain(cx, writer) {
            Poll::Ready(drained) => drained.map(|()| true),
            Poll::Pending => Ok(self.start != before),
        }
    }

    fn settled(&self) -> bool {
        self.is_empty() && !self.unflushed
    }
}

/// The state of one relayed stretch of a session: the buffers, where both
/// streams stand in their messages, and what is in flight.
pub struct Relay {
    to_upstream: Pipe,
    to_client: Pipe,
    client_frames: Framer,
    server_frames: Framer,
    ledger: Ledger,
    tracker: Option<Tracker>,
    /// Where the client message being scanned starts in `to_upstream`.
    message_start: usize,
    terminated: bool,
    violation: Option<Violation>,
    stop_at_idle: bool,
    /// Kept between transactions ([`Relay::keep`]): stops at the next idle
    /// boundary.
    kept: bool,
    /// Kept, and nothing read from the client since: anything the server
    /// says now, nobody asked for.
    kept_waiting: bool,
    /// The next run follows this relay's own last run with nothing else
    /// reading the streams between ([`Relay::keep_again`]): what it knew of
    /// the sides' reads still holds.
    streams_untouched: bool,
    watchdog: Watchdog,
    observed: Option<Arc<Observed>>,
    /// What the open transaction's audit line says so far (audited
    /// sessions only).
    audit: Option<Box<Recorder>>,
    /// Whether the backend was idle when last looked at.
    was_idle: bool,
    /// Which sides' reads wait with the task's waker registered.
    armed: Armed,
    /// When the open transaction started (observed relays only).
    transaction_started: Option<Instant>,
    /// When the open query (a request cycle up to its ReadyForQuery)
    /// started (observed relays only).
    query_started: Option<Instant>,
    /// Whether the server sent an error nobody asked for: the FATAL of a
    /// backend being terminated (a database restart, `pg_terminate_backend`),
    /// after which the client may close before the server does.
    server_ended: bool,
    /// The time read once for everything that happens in one poll, or in
    /// one `forward` or `deliver` step ([`Relay::now`]): reading the clock
    /// for each message's timings was a dozen reads a pooled transaction.
    /// Let go at the end of each step, so none is carried across an await
    /// but the one the relay starts with ([`Relay::new`]).
    clock: Option<Instant>,
    /// The time the last run read before it stopped, if it read one.
    stopped_at: Option<Instant>,
}

impl Relay {
    /// A relay for a session sitting idle after a ReadyForQuery, as it is
    /// after the handshake and between pooled transactions, starting at
    /// `now` (the caller's clock reading, the time of its first step).
    /// With a `tracker`, what the client's session holds is followed
    /// (transaction pooling).
    pub fn new(tracker: Option<Tracker>, now: Instant) -> Self {
        let (client_frames, server_frames) = framers(tracker.is_some(), None);
        Self {
            to_upstream: Pipe::new(CLIENT_BUFFER),
            to_client: Pipe::new(SERVER_BUFFER),
            client_frames,
            server_frames,
            ledger: Ledger::default(),
            tracker,
            message_start: 0,
            terminated: false,
            violation: None,
            stop_at_idle: false,
            kept: false,
            kept_waiting: false,
            streams_untouched: false,
            watchdog: Watchdog {
                watch: ClientLimits::default(),
                sleep: None,
                last_read: now,
                last_written: now,
            },
            observed: None,
            audit: None,
            was_idle: true,
            armed: Armed::default(),
            transaction_started: None,
            query_started: None,
            server_ended: false,
            clock: Some(now),
            stopped_at: None,
        }
    }

    /// The time for what happens in this poll (or this `forward` or
    /// `deliver` step): read once, when first asked for.
    fn now(&mut self) -> Instant {
        now(&mut self.clock)
    }

    /// When the last [`Relay::run`] stopped, as read in its last poll
    /// (`None` if that poll read no time): for a stop at an idle boundary,
    /// when the server's ReadyForQuery was followed.
    pub fn stopped_at(&self) -> Option<Instant> {
        self.stopped_at
    }

    /// Reports bytes, queries, transactions and the client's state to
    /// `observed` (and audit lines to its audit, `relay/audited.rs`).
    /// Called before the relay moves anything.
    pub fn observe(&mut self, observed: Arc<Observed>) {
        self.audit_with(observed.audit.as_ref());
        self.observed = Some(observed);
    }

    /// Records a change between idle and in a transaction, timing the
    /// transaction.
    fn note_state(&mut self) {
        let idle = self.ledger.idle();
        if idle == self.was_idle {
            return;
        }
        self.was_idle = idle;
        if idle && self.kept {
            self.stop_at_idle = true;
        }
        if let Some(observed) = &self.observed {
            if idle {
                if let Some(started) = self.transaction_started.take() {
                    let now = now(&mut self.clock);
                    let took = now.saturating_duration_since(started);
                    observed.tally.transaction(took, now);
                    if let Some(audit) = self.audit.as_deref_mut()
                        && audit.session().per() == Per::Transaction
                    {
                        audit.finish(took, None);
                    }
                }
                observed.activity.set(ClientState::Idle);
            } else {
                self.transaction_started = Some(now(&mut self.clock));
                observed.activity.set(ClientState::Active);
            }
        }
    }

    fn count(&self, count: fn(&Tally, usize), n: usize) {
        if let Some(observed) = &self.observed {
            count(&observed.tally, n);
        }
    }

    /// Ends the relay when the client holds its backend without using it
    /// for longer than `watch` allows.
    pub fn watch(&mut self, watch: ClientLimits) {
        self.watchdog.watch = watch;
    }

    /// Makes [`Relay::run`] return [`Stop::Idle`] at the next idle
    /// transaction boundary (or at once if the session is at one), or
    /// (`false`) at none. Either way a keep ([`Relay::keep`]) is over.
    pub fn stop_at_idle(&mut self, stop: bool) {
        self.stop_at_idle = stop;
        self.kept = false;
        self.kept_waiting = false;
    }

    /// Relays the session's next transaction on a connection it keeps
    /// between transactions (transaction pooling): [`Relay::run`] returns
    /// [`Stop::Idle`] at the first idle boundary after the client's next
    /// request, and [`Stop::KeptSpoke`] if the server says anything while
    /// the session waits idle for it.
    pub fn keep(&mut self) {
        self.kept = true;
        self.kept_waiting = true;
        self.stop_at_idle = false;
    }

    /// [`Relay::keep`] for the next transaction of a session whose last
    /// run stopped at an idle boundary with nothing read from either
    /// stream since: the reads that run left waiting are not made again.
    pub fn keep_again(&mut self) {
        self.keep();
        self.streams_untouched = true;
    }

    /// When the client last sent something or took something, whichever
    /// is later.
    pub fn last_active(&self) -> Instant {
        self.watchdog.last_read.max(self.watchdog.last_written)
    }

    /// Gives back the tracker that follows the client's session
    /// (transaction pooling) to a relay made with one: [`Relay::new`]
    /// with a tracker made the framers that keep what it reads.
    pub fn follow(&mut self, tracker: Tracker) {
        self.tracker = Some(tracker);
    }

    /// Forwards client bytes read before the relay started (pipelined
    /// after the password, or the first bytes of a pooled transaction),
    /// following them like any the relay reads. A Terminate or a refused
    /// message among them ends the relay at its start.
    pub async fn forward<U>(&mut self, bytes: &[u8], upstream: &mut U) -> Result<(), RelayError>
    where
        U: AsyncWrite + Unpin + ?Sized,
    {
        for chunk in bytes.chunks(CLIENT_BUFFER) {
            if self.terminated || self.violation.is_some() {
                break;
            }
            self.kept_waiting = false;
            self.to_upstream.load(chunk);
            self.count(Tally::received, chunk.len());
            self.scan_client();
            poll_fn(|cx| self.to_upstream.poll_drain(cx, upstream))
                .await
                .map_err(RelayError::Upstream)?;
            // The next step's time is its own.
            self.clock = None;
        }
        Ok(())
    }

    /// Delivers server bytes read outside the relay (by the proxy's own
    /// queries on the connection) to the client, following them like any
    /// the relay reads.
    pub async fn deliver<C>(&mut self, bytes: &[u8], client: &mut C) -> Result<(), RelayError>
    where
        C: AsyncWrite + Unpin + ?Sized,
    {
        for chunk in bytes.chunks(SERVER_BUFFER) {
            self.to_client.load(chunk);
            self.count(Tally::sent, chunk.len());
            self.scan_server();
            poll_fn(|cx| self.to_client.poll_drain(cx, client))
                .await
                .map_err(RelayError::Client)?;
            self.clock = None;
        }
        Ok(())
    }

    /// Relays until a side ends or the session stops at an idle boundary,
    /// heeding nothing outside ([`Relay::run_heeding`] with nothing to
    /// say): for tests and benches.
    #[cfg(any(test, feature = "internals"))]
    pub async fn run<C, U>(&mut self, client: &mut C, upstream: &mut U) -> Result<Stop, RelayError>
    where
        C: AsyncRead + AsyncWrite + ReadHint + Unpin + ?Sized,
        U: AsyncRead + AsyncWrite + ReadHint + Unpin + ?Sized,
    {
        let heeded = self
            .run_heeding(client, upstream, Heard::AfterRelay, |_, _| Poll::Pending)
            .await;
        heeded.unwrap_or_else(|| unreachable!("nothing outside says to stop now"))
    }

    /// [`Relay::run`], heeding what `outside` says on each poll of the
    /// relay, before or after it as `heard` says (in the same poll, with no
    /// future of its own; it may look at the relay): `Heed::AtIdle` asks
    /// the relay to stop at its next idle boundary, as
    /// [`Relay::stop_at_idle`] does; `Heed::Now` stops it where it is, and
    /// the run returns `None`. `outside` is asked again until it answers
    /// `Pending`, so it answers `AtIdle` once, and then registers the
    /// task's waker for what it still watches, as a future would.
    pub async fn run_heeding<C, U>(
        &mut self,
        client: &mut C,
        upstream: &mut U,
        heard: Heard,
        mut outside: impl FnMut(&Self, &mut Context<'_>) -> Poll<Heed>,
    ) -> Option<Result<Stop, RelayError>>
    where
        C: AsyncRead + AsyncWrite + ReadHint + Unpin + ?Sized,
        U: AsyncRead + AsyncWrite + ReadHint + Unpin + ?Sized,
    {
        // Between runs others may read the streams (a transaction's
        // settling reads the server's replies) and leave no waker behind:
        // each run reads both sides first, unless its caller vouches that
        // nothing did. During a run the relay alone holds them.
        if !std::mem::take(&mut self.streams_untouched) {
            self.armed = Armed::default();
        }
        let stopped = poll_fn(|cx| {
            loop {
                if heard == Heard::AfterRelay
                    && let Poll::Ready(stopped) = self.poll_run(cx, client, upstream)
                {
                    return Poll::Ready(Some(stopped));
                }
                match outside(self, cx) {
                    Poll::Ready(Heed::Now) => return Poll::Ready(None),
                    // Polled again: it may stop at once.
                    Poll::Ready(Heed::AtIdle) => self.stop_at_idle(true),
                    Poll::Pending if heard == Heard::AfterRelay => return Poll::Pending,
                    Poll::Pending => return self.poll_run(cx, client, upstream).map(Some),
                }
            }
        })
        .await;
        self.stopped_at = self.clock.take();
        if let Some(stopped) = &stopped
            && let Some(observed) = &self.observed
            && let Some(label) = stop_label(stopped, self.server_ended)
        {
            observed.tally.stopped(label);
            self.audit_unfinished(label);
        }
        stopped
    }

    fn poll_run<C, U>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        upstream: &mut U,
    ) -> Poll<Result<Stop, RelayError>>
    where
        C: AsyncRead + AsyncWrite + ReadHint + Unpin + ?Sized,
        U: AsyncRead + AsyncWrite + ReadHint + Unpin + ?Sized,
    {
        self.clock = None;
        // A side whose read was left pending has its waker registered:
        // reading it again before it is woken can only be pending again,
        // at a cost per poll. Within this poll that is known; across polls
        // (the task woken by the other side, or by something else) the
        // stream's readiness tells.
        self.armed.poll_with(cx.waker());
        let mut client_waits = self.armed.client && client.known_unreadable();
        let mut server_waits = self.armed.server && upstream.known_unreadable();
        // Tests (debug builds) hold the hint to its word: a read skipped
        // must have been pending.
        #[cfg(debug_assertions)]
        {
            if client_waits && self.to_upstream.is_empty() {
                assert!(
                    self.to_upstream.poll_fill(cx, client).is_pending(),
                    "the client's read was skipped with bytes to read"
                );
            }
            if server_waits && self.to_client.is_empty() {
                assert!(
                    self.to_client.poll_fill(cx, upstream).is_pending(),
                    "the server's read was skipped with bytes to read"
                );
            }
        }
        loop {
            // At the idle boundary it stops at, the relay reads neither side
            // (what the client sends next belongs to its next transaction)
            // and stops once the client has everything.
            let stopping = self.stop_at_idle && self.is_idle();
            if stopping && self.to_client.settled() {
                return Poll::Ready(Ok(Stop::Idle));
            }
            let mut progressed = false;
            let ended = self.terminated || self.violation.is_some();
            // A kept connection waiting for the client's next request is
            // read first: what it said while idle (a FATAL before a
            // restart, mostly) must not pass for the answer to that
            // request.
            if self.kept_waiting && !server_waits {
                match self.to_client.poll_fill(cx, upstream) {
                    Poll::Pending => {
                        server_waits = true;
                        self.armed.server = Armed::pending();
                    }
                    Poll::Ready(_) => {
                        (self.to_client.start, self.to_client.end) = (0, 0);
                        return Poll::Ready(Ok(Stop::KeptSpoke));
                    }
                }
            }
            // Client to upstream.
            if !stopping && !ended && !client_waits && self.to_upstream.is_empty() {
                match self.to_upstream.poll_fill(cx, client) {
                    Poll::Pending => {
                        client_waits = true;
                        self.armed.client = Armed::pending();
                    }
                    Poll::Ready(read) => {
                        self.armed.client = false;
                        self.kept_waiting = false;
                        let read = read.map_err(RelayError::Client)?;
                        if read == 0 {
                            return Poll::Ready(Ok(Stop::ClientClosed));
                        }
                        self.watchdog.last_read = self.now();
                        self.count(Tally::received, read);
                        self.scan_client();
                        progressed = true;
                    }
                }
            }
            progressed |= self
                .to_upstream
                .poll_progress(cx, upstream)
                .map_err(RelayError::Upstream)?;
            if self.to_upstream.settled() {
                if let Some(violation) = self.violation {
                    return Poll::Ready(Ok(Stop::Violation(violation)));
                }
                if self.terminated {
                    return Poll::Ready(Ok(Stop::ClientTerminated));
                }
            }
            // Upstream to client.
            let mut unscanned = 0;
            if !stopping && !server_waits && self.to_client.is_empty() {
                match self.to_client.poll_fill(cx, upstream) {
                    Poll::Pending => {
                        server_waits = true;
                        self.armed.server = Armed::pending();
                    }
                    Poll::Ready(read) => {
                        self.armed.server = false;
                        if self.kept_waiting {
                            // Nobody asked: a kept connection that speaks
                            // now is dropped, unheard, as an idle one
                            // would be.
                            (self.to_client.start, self.to_client.end) = (0, 0);
                            return Poll::Ready(Ok(Stop::KeptSpoke));
                        }
                        let read = read.map_err(RelayError::Upstream)?;
                        if read == 0 {
                            return Poll::Ready(Ok(Stop::UpstreamClosed));
                        }
                        unscanned = read;
                        progressed = true;
                    }
                }
            }
            let before = self.to_client.start;
            let moved = self.to_client.poll_progress(cx, client);
            if unscanned > 0 {
                // Followed once on their way, whether or not the client
                // took them: its answer does not wait for the bookkeeping
                // (the ledger, the tracker, the counters), which reads the
                // bytes where they still are.
                self.watchdog.last_written = self.now();
                self.count(Tally::sent, unscanned);
                self.scan_server();
            }
            let moved = moved.map_err(RelayError::Client)?;
            if unscanned == 0 && moved && self.to_client.start != before {
                self.watchdog.last_written = self.now();
            }
            progressed |= moved;
            if !progressed {
                return match self.poll_watchdog(cx) {
                    Some(stop) => Poll::Ready(Ok(stop)),
                    None => {
                        // Both sides wait at an idle boundary: an idle
                        // session holds no buffers until a side has
                        // something to say (a spare's take is no system
                        // call). Mid-request they are kept: the server's
                        // answer comes soon.
                        if self.is_idle() {
                            self.to_upstream.release();
                            self.to_client.release();
                        }
                        Poll::Pending
                    }
                };
            }
        }
    }

    /// Whether a [`ClientLimits`] limit ran out; otherwise arms the timer for the
    /// nearest one that can.
    fn poll_watchdog(&mut self, cx: &mut Context<'_>) -> Option<Stop> {
        let dog = &self.watchdog;
        let idle_in_transaction = self.ledger.idle_in_transaction()
            && self.to_upstream.is_empty()
            && self.client_frames.at_boundary();
        let idle = (dog.watch.idle_in_transaction)
            .filter(|_| idle_in_transaction)
            .map(|limit| (dog.last_read + limit, Stop::IdleInTransaction));
        let stalled = (dog.watch.stalled_reader)
            .filter(|_| !self.to_client.is_empty())
            .map(|limit| (dog.last_written + limit, Stop::ClientStalled));
        let next = match (idle, stalled) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        let (at, stop) = next?;
        if self.now() >= at {
            return Some(stop);
        }
        let sleep = self
            .watchdog
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if sleep.deadline() != at {
            sleep.as_mut().reset(at);
        }
        // Ready: the timer says `at` has passed, whatever the time this
        // poll read before it.
        sleep.as_mut().poll(cx).is_ready().then_some(stop)
    }

    /// Writes what the server sent and the client has not received yet.
    pub async fn flush_client<C>(&mut self, client: &mut C) -> Result<(), RelayError>
    where
        C: AsyncWrite + Unpin + ?Sized,
    {
        poll_fn(|cx| self.to_client.poll_drain(cx, client))
            .await
            .map_err(RelayError::Client)
    }

    /// Follows the client bytes just read: each message to the tracker and
    /// the ledger; the stream is cut before a Terminate or a refused
    /// message.
    fn scan_client(&mut self) {
        let pipe = &mut self.to_upstream;
        let mut at = pipe.start;
        while at < pipe.end {
            let (used, frame) = self
                .client_frames
                .next(pipe.buf.get(at..pipe.end).unwrap_or_default());
            at += used;
            match frame {
                None => break,
                Some(Frame::Start(tag)) => {
                    self.message_start = at;
                    if tag == b'X' {
                        self.terminated = true;
                        pipe.end = at;
                        break;
                    }
                }
                Some(Frame::End(tag)) => {
                    if let Err(violation) = Ledger::check(tag, self.client_frames.length()) {
                        self.violation = Some(violation);
                        pipe.end = self.message_start.max(pipe.start);
                        break;
                    }
                    if self.query_started.is_none() && self.observed.is_some() {
                        self.query_started = Some(now(&mut self.clock));
                    }
                    let tracker = &mut self.tracker;
                    if let Some(tracker) = tracker.as_mut() {
                        tracker.client_message(tag, self.client_frames.body());
                    }
                    if let Some(audit) = self.audit.as_deref_mut() {
                        audit.client_message(tag, self.client_frames.body());
                    }
                    self.ledger.client_message(tag, &mut |request, outcome| {
                        if let Some(tracker) = tracker.as_mut() {
                            tracker.retired(request, outcome);
                        }
                    });
                }
            }
        }
        // A message that started in an earlier read starts at this one's
        // beginning for the purpose of cutting.
        self.message_start = pipe.start;
        self.note_state();
    }

    /// Follows the server bytes just read: all of the buffer's, as a read
    /// or a load fills it from its start (some may have been written on
    /// already).
    fn scan_server(&mut self) {
        let pipe = &self.to_client;
        let mut at = 0;
        while at < pipe.end {
            let (used, frame) = self
                .server_frames
                .next(pipe.buf.get(at..pipe.end).unwrap_or_default());
            at += used;
            let Some(Frame::End(tag)) = frame else {
                if frame.is_none() {
                    break;
                }
                continue;
            };
            if self.server_frames.length() < 4 {
                self.ledger.malformed_server_message();
            }
            if tag == b'E' && self.ledger.settled() {
                self.server_ended = true;
            }
            let body = self.server_frames.body();
            let tracker = &mut self.tracker;
            self.ledger
                .server_message(tag, body, &mut |request, outcome| {
                    if let Some(tracker) = tracker.as_mut() {
                        tracker.retired(request, outcome);
                    }
                });
            if let Some(tracker) = tracker.as_mut() {
                tracker.server_message(tag, body);
            }
            if let Some(audit) = self.audit.as_deref_mut() {
                audit.server_message(tag, body);
            }
            if tag == b'Z'
                && let (Some(observed), Some(started)) = (&self.observed, self.query_started)
            {
                // The next query starts now if the client pipelined more
                // requests behind this one.
                let now = now(&mut self.clock);
                observed.tally.query(now - started);
                if let Some(audit) = self.audit.as_deref_mut()
                    && audit.session().per() == Per::Statement
                {
                    audit.finish(now - started, None);
                }
                self.query_started = (!self.ledger.settled()).then_some(now);
            }
        }
        self.note_state();
    }

    /// Whether the session sits at an idle transaction boundary: nothing in
    /// flight either way except server bytes still to reach the client.
    pub fn is_idle(&self) -> bool {
        self.ledger.idle() && self.streams_settled()
    }

    /// Whether no request is in flight (in or out of a transaction block),
    /// so a reset can bring the connection back for another client.
    pub fn between_requests(&self) -> bool {
        self.ledger.settled() && self.streams_settled()
    }

    fn streams_settled(&self) -> bool {
        self.violation.is_none()
            && self.to_upstream.settled()
            && self.client_frames.at_boundary()
            && self.server_frames.at_boundary()
    }

    /// Whether the backend may still be working on something the client
    /// sent (or the relay cannot tell): a backend given up in that state
    /// must be cancelled, not just closed, or it runs on for nobody.
    pub fn backend_busy(&self) -> bool {
        !self.ledger.waiting_for_client()
    }

    /// Whether the client has been sent whole messages only, so one more
    /// (an ErrorResponse) can follow.
    pub fn client_at_boundary(&self) -> bool {
        self.to_client.settled() && self.server_frames.at_boundary()
    }

    /// Why the relay could not follow the backend, if it could not.
    pub fn lost(&self) -> Option<&'static str> {
        self.ledger.lost()
    }

    /// Takes the tracker back for the session's next transaction; the
    /// relay follows nothing for it from then on.
    pub fn take_tracker(&mut self) -> Option<Tracker> {
        self.tracker.take()
    }
}

/// The framers of a relay: the client's reports every message; the
/// server's the messages the ledger (and the tracker) follow. Bodies kept:
/// what the tracker reads (transaction pooling) and, for an audited
/// session (`Some(statements)`), what its lines are made from.
/// The time in `clock`, read now if it holds none ([`Relay::now`], for
/// where `self` is borrowed in part).
fn now(clock: &mut Option<Instant>) -> Instant {
    *clock.get_or_insert_with(Instant::now)
}

fn framers(tracked: bool, audit: Option<bool>) -> (Framer, Framer) {
    let (mut client_bodies, mut server_bodies) = match tracked {
        true => (Tracker::CLIENT_BODIES, Tracker::SERVER_BODIES),
        false => (TagSet::NONE, TagSet::NONE),
    };
    let mut server_capture = 64;
    if let Some(statements) = audit {
        if statements {
            client_bodies = client_bodies.union(Recorder::CLIENT_BODIES);
        }
        server_bodies = server_bodies.union(Recorder::SERVER_BODIES);
        server_capture = Recorder::SERVER_CAPTURE;
    }
    (
        Framer::new(TagSet::ALL, client_bodies, MAX_CAPTURED),
        Framer::new(
            ledger::SERVER_REPORTED.union(Tracker::SERVER_REPORTED),
            ledger::SERVER_BODIES.union(server_bodies),
            server_capture,
        )
        // The server's messages are read where they end.
        .ends_only(),
    )
}

/// How a relay's stop is named in the session's end-of-session log line;
/// `None` for a stop that does not end the session by itself. A client
/// that closed after the server's unsolicited FATAL (`server_ended`) was
/// closed by the server.
fn stop_label(stopped: &Result<Stop, RelayError>, server_ended: bool) -> Option<&'static str> {
    Some(match stopped {
        Ok(Stop::ClientClosed | Stop::ClientTerminated) | Err(RelayError::Client(_))
            if server_ended =>
        {
            "server_closed"
        }
        Ok(Stop::ClientClosed) => "client_closed",
        Ok(Stop::ClientTerminated) => "client_terminated",
        Ok(Stop::UpstreamClosed) => "server_closed",
        Ok(Stop::Idle | Stop::KeptSpoke) => return None,
        Ok(Stop::Violation(_)) => "protocol_violation",
        Ok(Stop::IdleInTransaction) => "idle_in_transaction",
        Ok(Stop::ClientStalled) => "client_stalled",
        Err(RelayError::Client(_)) => "client_io",
        Err(RelayError::Upstream(_)) => "server_io",
    })
}

/// Shuts the client down, best effort and bounded: a client that already
/// failed, or stopped reading, cannot be shut down cleanly.
pub async fn close_client<C: AsyncWrite + Unpin + ?Sized>(client: &mut C) {
    let _ = tokio::time::timeout(Duration::from_secs(2), client.shutdown()).await;
}

mod audited;
mod spare;
#[cfg(test)]
mod tests;
