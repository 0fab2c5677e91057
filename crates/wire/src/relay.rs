//! Byte relay between an authenticated client and its upstream backend.
//!
//! The proxy does not parse queries: bytes flow both ways untouched, in one
//! task with one buffer per direction, until a side closes or fails or (in
//! transaction pooling, or once an expired token must end the session) the
//! session reaches an idle transaction boundary. [`Framer`]s follow the
//! message headers as they pass, which tells where that boundary is: every
//! Query, Sync and FunctionCall the client sent has been answered with a
//! ReadyForQuery, the last one idle ('I'), and no extended-protocol message
//! waits for a Sync. The client's Terminate is never forwarded, so the
//! upstream connection survives the client for the pool.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};

use crate::scan::{Frame, Framer, Report};
use crate::track::Tracker;

/// Buffer for client-to-server bytes: queries and binds are small.
const CLIENT_BUFFER: usize = 2 * 1024;
/// Buffer for server-to-client bytes: result rows.
const SERVER_BUFFER: usize = 8 * 1024;
/// Largest named Parse message whose text is kept for replay.
const MAX_TRACKED_PARSE: usize = 256 * 1024;
/// Transaction status of ReadyForQuery when no transaction is open.
const IDLE: u8 = b'I';

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
    /// stop there ([`Relay::stop_at_idle`]); the client has received all the
    /// server sent.
    Idle,
}

/// One direction's buffer: bytes read and not yet written.
struct Pipe {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Written but not flushed (TLS and WebSocket streams buffer).
    unflushed: bool,
}

impl Pipe {
    fn new(size: usize) -> Self {
        Self {
            buf: vec![0; size].into_boxed_slice(),
            start: 0,
            end: 0,
            unflushed: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Reads into the empty buffer; `Ok(0)` is end of stream.
    fn poll_fill<R: AsyncRead + Unpin + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
    ) -> Poll<io::Result<usize>> {
        debug_assert!(self.is_empty());
        let mut read = ReadBuf::new(&mut self.buf);
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
            let n = ready!(Pin::new(&mut *writer).poll_write(cx, &self.buf[self.start..self.end]))?;
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
    /// Query, Sync and FunctionCall messages sent and not yet answered by a
    /// ReadyForQuery.
    pending: u32,
    /// An extended-protocol message was sent after the last Sync.
    unsynced: bool,
    /// The status of the last ReadyForQuery.
    status: u8,
    /// A ReadyForQuery arrived with nothing pending: the proxy no longer
    /// knows where the session stands, so it is never released or reused.
    lost: bool,
    terminated: bool,
    stop_at_idle: bool,
    tracker: Option<Tracker>,
}

impl Relay {
    /// A relay for a session sitting idle after a ReadyForQuery, as it is
    /// after the handshake and between pooled transactions. With a
    /// `tracker`, the named statements the client prepares and the commands
    /// that leave session state are followed (transaction pooling).
    pub fn new(tracker: Option<Tracker>) -> Self {
        // The server's side is followed only where it matters: result rows
        // pass without a stop.
        let (client_capture, server_report, server_capture): (&[u8], _, &[u8]) = match tracker {
            Some(_) => (b"PCQ", Report::Tags(b"Z123EC"), b"ZC"),
            None => (b"", Report::Tags(b"Z"), b"Z"),
        };
        Self {
            to_upstream: Pipe::new(CLIENT_BUFFER),
            to_client: Pipe::new(SERVER_BUFFER),
            client_frames: Framer::new(Report::All, client_capture, MAX_TRACKED_PARSE),
            server_frames: Framer::new(server_report, server_capture, 64),
            pending: 0,
            unsynced: false,
            status: IDLE,
            lost: false,
            terminated: false,
            stop_at_idle: false,
            tracker,
        }
    }

    /// Makes [`Relay::run`] return [`Stop::Idle`] at the next idle
    /// transaction boundary (or at once if the session is at one).
    pub fn stop_at_idle(&mut self, stop: bool) {
        self.stop_at_idle = stop;
    }

    /// Forwards client bytes read before the relay started (pipelined
    /// after the password, or the first bytes of a pooled transaction),
    /// following them like any the relay reads. A Terminate among them ends
    /// the relay at its start ([`Stop::ClientTerminated`]).
    pub async fn forward<U>(&mut self, bytes: &[u8], upstream: &mut U) -> io::Result<()>
    where
        U: AsyncWrite + Unpin + ?Sized,
    {
        for chunk in bytes.chunks(CLIENT_BUFFER) {
            if self.terminated {
                break;
            }
            self.to_upstream.buf[..chunk.len()].copy_from_slice(chunk);
            (self.to_upstream.start, self.to_upstream.end) = (0, chunk.len());
            self.scan_client();
            poll_fn(|cx| self.to_upstream.poll_drain(cx, upstream)).await?;
        }
        Ok(())
    }

    /// Delivers server bytes read outside the relay (by the proxy's own
    /// queries on the connection) to the client, following them like any the
    /// relay reads.
    pub async fn deliver<C>(&mut self, bytes: &[u8], client: &mut C) -> io::Result<()>
    where
        C: AsyncWrite + Unpin + ?Sized,
    {
        for chunk in bytes.chunks(SERVER_BUFFER) {
            self.to_client.buf[..chunk.len()].copy_from_slice(chunk);
            (self.to_client.start, self.to_client.end) = (0, chunk.len());
            self.scan_server();
            poll_fn(|cx| self.to_client.poll_drain(cx, client)).await?;
        }
        Ok(())
    }

    /// Relays until a side ends or the session stops at an idle boundary.
    pub async fn run<C, U>(&mut self, client: &mut C, upstream: &mut U) -> io::Result<Stop>
    where
        C: AsyncRead + AsyncWrite + Unpin + ?Sized,
        U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        poll_fn(|cx| self.poll_run(cx, client, upstream)).await
    }

    fn poll_run<C, U>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
        upstream: &mut U,
    ) -> Poll<io::Result<Stop>>
    where
        C: AsyncRead + AsyncWrite + Unpin + ?Sized,
        U: AsyncRead + AsyncWrite + Unpin + ?Sized,
    {
        loop {
            // At the idle boundary it stops at, the relay reads neither side
            // (what the client sends next belongs to its next transaction)
            // and stops once the client has everything.
            let stopping = self.stop_at_idle && self.is_idle();
            if stopping && self.to_client.settled() {
                return Poll::Ready(Ok(Stop::Idle));
            }
            let mut progressed = false;
            // Client to upstream.
            if !stopping
                && self.to_upstream.is_empty()
                && !self.terminated
                && let Poll::Ready(read) = self.to_upstream.poll_fill(cx, client)
            {
                if read? == 0 {
                    return Poll::Ready(Ok(Stop::ClientClosed));
                }
                self.scan_client();
                progressed = true;
            }
            progressed |= self.to_upstream.poll_progress(cx, upstream)?;
            if self.terminated && self.to_upstream.settled() {
                return Poll::Ready(Ok(Stop::ClientTerminated));
            }
            // Upstream to client.
            if !stopping
                && self.to_client.is_empty()
                && let Poll::Ready(read) = self.to_client.poll_fill(cx, upstream)
            {
                if read? == 0 {
                    return Poll::Ready(Ok(Stop::UpstreamClosed));
                }
                self.scan_server();
                progressed = true;
            }
            progressed |= self.to_client.poll_progress(cx, client)?;
            if !progressed {
                return Poll::Pending;
            }
        }
    }

    /// Writes what the server sent and the client has not received yet.
    pub async fn flush_client<C>(&mut self, client: &mut C) -> io::Result<()>
    where
        C: AsyncWrite + Unpin + ?Sized,
    {
        poll_fn(|cx| self.to_client.poll_drain(cx, client)).await
    }

    /// Follows the client bytes just read: counts requests, tracks
    /// statements, and cuts the stream before a Terminate.
    fn scan_client(&mut self) {
        let pipe = &mut self.to_upstream;
        let mut at = pipe.start;
        while at < pipe.end {
            let (used, frame) = self.client_frames.next(&pipe.buf[at..pipe.end]);
            at += used;
            match frame {
                None => break,
                Some(Frame::Start(b'X')) => {
                    self.terminated = true;
                    pipe.end = at;
                    break;
                }
                Some(Frame::Start(tag)) => match tag {
                    // Query, Sync and FunctionCall each get one ReadyForQuery.
                    b'Q' | b'S' | b'F' => {
                        self.pending += 1;
                        self.unsynced = false;
                    }
                    // COPY data belongs to the Query that started it; Flush
                    // asks for nothing new.
                    b'd' | b'c' | b'f' | b'H' => {}
                    _ => self.unsynced = true,
                },
                Some(Frame::End(tag)) => {
                    if let Some(tracker) = &mut self.tracker {
                        tracker.client_message(tag, self.client_frames.body());
                    }
                }
            }
        }
    }

    /// Follows the server bytes just read: transaction status and what the
    /// tracker needs.
    fn scan_server(&mut self) {
        let pipe = &self.to_client;
        let mut at = pipe.start;
        while at < pipe.end {
            let (used, frame) = self.server_frames.next(&pipe.buf[at..pipe.end]);
            at += used;
            let Some(Frame::End(tag)) = frame else {
                if frame.is_none() {
                    break;
                }
                continue;
            };
            let body = self.server_frames.body();
            if tag == b'Z' {
                match (self.pending.checked_sub(1), body) {
                    (Some(pending), Some(&[status])) => {
                        self.pending = pending;
                        self.status = status;
                    }
                    _ => self.lost = true,
                }
            }
            if let Some(tracker) = &mut self.tracker {
                tracker.server_message(tag, body);
            }
        }
    }

    /// Whether the session sits at an idle transaction boundary: nothing in
    /// flight either way except server bytes still to reach the client.
    pub fn is_idle(&self) -> bool {
        self.status == IDLE && self.between_requests()
    }

    /// Whether no request is in flight (in or out of a transaction), so a
    /// reset can bring the connection back for another client.
    pub fn between_requests(&self) -> bool {
        !self.lost
            && self.pending == 0
            && !self.unsynced
            && self.to_upstream.settled()
            && self.client_frames.at_boundary()
            && self.server_frames.at_boundary()
    }

    /// Takes the statement tracker back for the session's next
    /// transaction; the relay follows nothing for it from then on.
    pub fn take_tracker(&mut self) -> Option<Tracker> {
        self.tracker.take()
    }
}

/// Shuts the client down, best effort: a client that already failed cannot
/// be shut down cleanly.
pub async fn close_client<C: AsyncWrite + Unpin + ?Sized>(client: &mut C) {
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::tests::message;
    use tokio::io::{AsyncReadExt as _, DuplexStream};

    type Relaying =
        tokio::task::JoinHandle<(io::Result<Stop>, Relay, (DuplexStream, DuplexStream))>;

    /// A relay between two in-memory pipes: (client peer, upstream peer,
    /// relay), the relay handing back its state and the upstream end. With
    /// `first_request`, the relay stops at idle boundaries (as in
    /// transaction pooling) and starts with that request read.
    fn start(first_request: Option<&[u8]>) -> (DuplexStream, DuplexStream, Relaying) {
        let (mut client, client_peer) = tokio::io::duplex(4096);
        let (mut upstream, upstream_peer) = tokio::io::duplex(4096);
        let mut relay = Relay::new(None);
        let first_request = first_request.map(<[u8]>::to_vec);
        let relay = tokio::spawn(async move {
            if let Some(request) = first_request {
                relay.stop_at_idle(true);
                relay
                    .forward(&request, &mut upstream)
                    .await
                    .expect("forward");
            }
            let stopped = relay.run(&mut client, &mut upstream).await;
            (stopped, relay, (client, upstream))
        });
        (client_peer, upstream_peer, relay)
    }

    async fn expect_read(stream: &mut DuplexStream, expected: &[u8]) {
        let mut got = vec![0u8; expected.len()];
        stream.read_exact(&mut got).await.expect("read");
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn terminate_is_not_forwarded_and_leaves_the_upstream_reusable() {
        let (mut client_peer, mut upstream_peer, relay) = start(None);
        let query = message(b'Q', b"select 1\0");
        client_peer.write_all(&query).await.expect("write");
        expect_read(&mut upstream_peer, &query).await;
        let ready = message(b'Z', b"I");
        upstream_peer.write_all(&ready).await.expect("write");
        expect_read(&mut client_peer, &ready).await;
        client_peer
            .write_all(&message(b'X', b""))
            .await
            .expect("write");
        let (stopped, relay, (_, upstream)) = relay.await.expect("join");
        assert_eq!(stopped.expect("relay"), Stop::ClientTerminated);
        assert!(relay.between_requests());
        drop(upstream);
        let mut rest = Vec::new();
        upstream_peer.read_to_end(&mut rest).await.expect("read");
        assert!(rest.is_empty(), "Terminate reached the upstream: {rest:?}");
    }

    #[tokio::test]
    async fn a_client_leaving_mid_request_leaves_the_upstream_unusable() {
        let (mut client_peer, mut upstream_peer, relay) = start(None);
        let query = message(b'Q', b"select pg_sleep(10)\0");
        client_peer.write_all(&query).await.expect("write");
        expect_read(&mut upstream_peer, &query).await;
        drop(client_peer);
        let (stopped, relay, _) = relay.await.expect("join");
        assert_eq!(stopped.expect("relay"), Stop::ClientClosed);
        assert!(!relay.between_requests(), "a query was in flight");
    }

    #[tokio::test]
    async fn relays_both_ways_until_the_upstream_closes() {
        let (mut client_peer, mut upstream_peer, relay) = start(None);
        client_peer.write_all(b"Q-query").await.expect("write");
        expect_read(&mut upstream_peer, b"Q-query").await;
        upstream_peer.write_all(b"T-rows").await.expect("write");
        expect_read(&mut client_peer, b"T-rows").await;
        drop(upstream_peer);
        let (stopped, relay, _) = relay.await.expect("join");
        assert_eq!(stopped.expect("relay"), Stop::UpstreamClosed);
        assert!(!relay.between_requests());
    }

    #[tokio::test]
    async fn stops_only_when_every_pipelined_request_is_answered_outside_a_transaction() {
        // Two queries in one write, then an extended-protocol batch whose
        // Sync comes later.
        let mut requests = message(b'Q', b"begin\0");
        requests.extend(message(b'Q', b"commit\0"));
        requests.extend(message(b'P', b"\0select 1\0\0\0"));
        let (mut client_peer, mut upstream_peer, relay) = start(Some(&requests));
        expect_read(&mut upstream_peer, &requests).await;
        for status in [b"T", b"I"] {
            upstream_peer
                .write_all(&message(b'Z', status))
                .await
                .expect("write");
        }
        upstream_peer
            .write_all(&message(b'1', b""))
            .await
            .expect("write");
        let mut replies = message(b'Z', b"T");
        replies.extend(message(b'Z', b"I"));
        replies.extend(message(b'1', b""));
        expect_read(&mut client_peer, &replies).await;
        assert!(!relay.is_finished(), "stopped before the Parse was synced");
        let sync = message(b'S', b"");
        client_peer.write_all(&sync).await.expect("write");
        expect_read(&mut upstream_peer, &sync).await;
        upstream_peer
            .write_all(&message(b'Z', b"I"))
            .await
            .expect("write");
        // The client has its last ReadyForQuery when the relay stops.
        expect_read(&mut client_peer, &message(b'Z', b"I")).await;
        let (stopped, _, _) = relay.await.expect("join");
        assert_eq!(stopped.expect("relay"), Stop::Idle);
    }

    #[tokio::test]
    async fn a_transaction_left_open_does_not_stop_the_relay() {
        let begin = message(b'Q', b"begin\0");
        let (mut client_peer, mut upstream_peer, relay) = start(Some(&begin));
        expect_read(&mut upstream_peer, &begin).await;
        let ready = message(b'Z', b"T");
        upstream_peer.write_all(&ready).await.expect("write");
        expect_read(&mut client_peer, &ready).await;
        tokio::task::yield_now().await;
        assert!(!relay.is_finished(), "released inside a transaction");
        drop(client_peer);
        let (stopped, relay, _) = relay.await.expect("join");
        assert_eq!(stopped.expect("relay"), Stop::ClientClosed);
        assert!(relay.between_requests(), "rolled back by the reset");
        assert!(!relay.is_idle());
    }

    #[tokio::test]
    async fn a_terminate_among_forwarded_bytes_ends_the_relay_there() {
        let (mut client, _client_peer) = tokio::io::duplex(4096);
        let (mut upstream, mut upstream_peer) = tokio::io::duplex(4096);
        let query = message(b'Q', b"select 1\0");
        let mut bytes = query.clone();
        bytes.extend(message(b'X', b""));
        let mut relay = Relay::new(None);
        relay.forward(&bytes, &mut upstream).await.expect("forward");
        let stopped = relay.run(&mut client, &mut upstream).await.expect("run");
        assert_eq!(stopped, Stop::ClientTerminated);
        drop(upstream);
        let mut sent = Vec::new();
        upstream_peer.read_to_end(&mut sent).await.expect("read");
        assert_eq!(sent, query);
    }
}
