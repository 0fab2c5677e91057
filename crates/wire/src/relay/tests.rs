use tokio::io::{AsyncReadExt as _, DuplexStream};

use super::*;
use crate::proto::framer::tests::message;

type Relaying = tokio::task::JoinHandle<(
    Result<Stop, RelayError>,
    Relay,
    (DuplexStream, DuplexStream),
)>;

/// A relay between two in-memory pipes: (client peer, upstream peer,
/// relay), the relay handing back its state and the upstream end. With
/// `first_request`, the relay stops at idle boundaries (as in transaction
/// pooling) and starts with that request read.
fn start(first_request: Option<&[u8]>) -> (DuplexStream, DuplexStream, Relaying) {
    let (mut client, client_peer) = tokio::io::duplex(4096);
    let (mut upstream, upstream_peer) = tokio::io::duplex(4096);
    let mut relay = Relay::new(None, tokio::time::Instant::now());
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

async fn send(stream: &mut DuplexStream, tag: u8, body: &[u8]) {
    stream.write_all(&message(tag, body)).await.expect("write");
}

#[tokio::test]
async fn terminate_is_not_forwarded_and_leaves_the_upstream_reusable() {
    let (mut client_peer, mut upstream_peer, relay) = start(None);
    let query = message(b'Q', b"select 1\0");
    client_peer.write_all(&query).await.expect("write");
    expect_read(&mut upstream_peer, &query).await;
    send(&mut upstream_peer, b'Z', b"I").await;
    expect_read(&mut client_peer, &message(b'Z', b"I")).await;
    send(&mut client_peer, b'X', b"").await;
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
    // Two queries in one write, then an extended-protocol batch whose Sync
    // comes later.
    let mut requests = message(b'Q', b"begin\0");
    requests.extend(message(b'Q', b"commit\0"));
    requests.extend(message(b'P', b"\0select 1\0\0\0"));
    let (mut client_peer, mut upstream_peer, relay) = start(Some(&requests));
    expect_read(&mut upstream_peer, &requests).await;
    for status in [b"T", b"I"] {
        send(&mut upstream_peer, b'Z', status).await;
    }
    send(&mut upstream_peer, b'1', b"").await;
    let mut replies = message(b'Z', b"T");
    replies.extend(message(b'Z', b"I"));
    replies.extend(message(b'1', b""));
    expect_read(&mut client_peer, &replies).await;
    tokio::task::yield_now().await;
    assert!(!relay.is_finished(), "stopped before the Parse was synced");
    let sync = message(b'S', b"");
    client_peer.write_all(&sync).await.expect("write");
    expect_read(&mut upstream_peer, &sync).await;
    send(&mut upstream_peer, b'Z', b"I").await;
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
    send(&mut upstream_peer, b'Z', b"T").await;
    expect_read(&mut client_peer, &message(b'Z', b"T")).await;
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
    let mut relay = Relay::new(None, tokio::time::Instant::now());
    relay.forward(&bytes, &mut upstream).await.expect("forward");
    let stopped = relay.run(&mut client, &mut upstream).await.expect("run");
    assert_eq!(stopped, Stop::ClientTerminated);
    drop(upstream);
    let mut sent = Vec::new();
    upstream_peer.read_to_end(&mut sent).await.expect("read");
    assert_eq!(sent, query);
}

#[tokio::test]
async fn a_malformed_flush_is_not_forwarded_and_ends_the_relay() {
    // The attack of issue 13: a Flush with a stray byte makes the server
    // skip everything up to a Sync that never comes.
    let (mut client_peer, mut upstream_peer, relay) = start(None);
    let query = message(b'Q', b"select 1\0");
    let mut bytes = query.clone();
    bytes.extend(message(b'H', b"x"));
    client_peer.write_all(&bytes).await.expect("write");
    let (stopped, relay, (_, upstream)) = relay.await.expect("join");
    assert_eq!(
        stopped.expect("relay"),
        Stop::Violation(Violation::NotEmpty("Flush"))
    );
    assert!(!relay.between_requests(), "never reused");
    drop(upstream);
    let mut sent = Vec::new();
    upstream_peer.read_to_end(&mut sent).await.expect("read");
    assert_eq!(sent, query, "only the well-formed query reached the server");
}

#[tokio::test]
async fn a_message_type_the_protocol_has_not_is_refused() {
    let (mut client_peer, _upstream_peer, relay) = start(None);
    send(&mut client_peer, b'p', b"a password mid-session\0").await;
    let (stopped, _, _) = relay.await.expect("join");
    assert_eq!(
        stopped.expect("relay"),
        Stop::Violation(Violation::UnknownMessage(b'p'))
    );
}

#[tokio::test]
async fn an_extended_error_without_a_sync_never_looks_idle() {
    // Parse fails; the server skips to a Sync. A Flush asks for nothing.
    let parse = message(b'P', b"\0selec 1\0\0\0");
    let (mut client_peer, mut upstream_peer, relay) = start(Some(&parse));
    expect_read(&mut upstream_peer, &parse).await;
    send(&mut upstream_peer, b'E', b"SERROR\0C42601\0Msyntax\0\0").await;
    send(&mut client_peer, b'H', b"").await;
    expect_read(&mut upstream_peer, &message(b'H', b"")).await;
    tokio::task::yield_now().await;
    assert!(
        !relay.is_finished(),
        "released while the server skips to a Sync"
    );
    drop(client_peer);
    let (_, relay, _) = relay.await.expect("join");
    assert!(!relay.between_requests());
}

#[tokio::test]
async fn a_message_shorter_than_its_length_field_is_refused() {
    let (mut client_peer, _upstream_peer, relay) = start(None);
    client_peer
        .write_all(&[b'Q', 0, 0, 0, 0])
        .await
        .expect("write");
    let (stopped, _, _) = relay.await.expect("join");
    assert_eq!(
        stopped.expect("relay"),
        Stop::Violation(Violation::BadLength(0))
    );
}

/// Issue 24: an observed relay counts each request cycle up to its
/// ReadyForQuery as a query (a pipelined one from the ReadyForQuery before
/// it), each return to idle as a transaction, and says how it stopped.
#[tokio::test]
async fn an_observed_relay_counts_queries_transactions_and_its_stop() {
    let (mut client, client_peer) = tokio::io::duplex(4096);
    let (mut upstream, upstream_peer) = tokio::io::duplex(4096);
    let metrics = crate::metrics::Metrics::unregistered();
    let tally = metrics.tally(crate::transport::Transport::Wire, "app", "authenticated");
    let clients = std::sync::Arc::new(crate::clients::Clients::default());
    let handle = clients.register(
        "127.0.0.1:1".parse().expect("address"),
        crate::transport::Transport::Wire,
    );
    let mut relay = Relay::new(None, tokio::time::Instant::now());
    let observed = std::sync::Arc::new(Observed {
        tally,
        activity: handle.activity(),
        audit: None,
    });
    relay.observe(std::sync::Arc::clone(&observed));
    let relay = tokio::spawn(async move { relay.run(&mut client, &mut upstream).await });
    let (mut client_peer, mut upstream_peer) = (client_peer, upstream_peer);

    // Two syncs pipelined in one write.
    let mut extended = Vec::new();
    for _ in 0..2 {
        extended.extend(message(b'P', b"\0select 1\0\0\0"));
        extended.extend(message(b'B', b"\0\0\0\0\0\0\0\0"));
        extended.extend(message(b'E', b"\0\0\0\0\0"));
        extended.extend(message(b'S', b""));
    }
    client_peer.write_all(&extended).await.expect("write");
    expect_read(&mut upstream_peer, &extended).await;
    let mut reply = Vec::new();
    for (tag, body) in [
        (b'1', &b""[..]),
        (b'2', b""),
        (b'C', b"SELECT 1\0"),
        (b'Z', b"I"),
    ] {
        reply.extend(message(tag, body));
    }
    for _ in 0..2 {
        upstream_peer.write_all(&reply).await.expect("reply");
        expect_read(&mut client_peer, &reply).await;
    }
    // A transaction block of two queries.
    for (query, status) in [(&b"begin\0"[..], b"T"), (b"commit\0", b"I")] {
        send(&mut client_peer, b'Q', query).await;
        expect_read(&mut upstream_peer, &message(b'Q', query)).await;
        send(&mut upstream_peer, b'Z', status).await;
        expect_read(&mut client_peer, &message(b'Z', status)).await;
    }
    send(&mut client_peer, b'X', b"").await;
    assert_eq!(
        relay.await.expect("join").expect("relay"),
        Stop::ClientTerminated
    );

    use std::sync::atomic::Ordering::Relaxed;
    let session = observed.tally.session();
    assert_eq!(session.queries.load(Relaxed), 4);
    assert_eq!(session.transactions.load(Relaxed), 2);
    assert_eq!(session.stop(), Some("client_terminated"));
    let [stats] = &metrics.stats()[..] else {
        panic!("one database and role");
    };
    assert_eq!((stats.query_count, stats.xact_count), (4, 2));
    assert_eq!(stats.received, session.received.load(Relaxed));
    assert_eq!(stats.sent, session.sent.load(Relaxed));
    assert_eq!(stats.sent, 2 * reply.len() as u64 + 2 * 6);
}

/// Runs `relay` until it waits on both sides (or stops).
async fn run_until_waiting(
    relay: &mut Relay,
    client: &mut DuplexStream,
    upstream: &mut DuplexStream,
) -> Option<Result<Stop, RelayError>> {
    let waiting = std::time::Duration::from_millis(50);
    tokio::time::timeout(waiting, relay.run(client, upstream))
        .await
        .ok()
}

#[tokio::test]
async fn a_relay_idle_on_both_sides_holds_no_buffers_and_takes_them_again() {
    let (mut client, mut client_peer) = tokio::io::duplex(4096);
    let (mut upstream, mut upstream_peer) = tokio::io::duplex(4096);
    let mut relay = Relay::new(None, tokio::time::Instant::now());
    let holds =
        |relay: &Relay| !relay.to_upstream.buf.is_empty() || !relay.to_client.buf.is_empty();
    assert!(!holds(&relay), "a new relay takes buffers only when used");
    assert!(
        run_until_waiting(&mut relay, &mut client, &mut upstream)
            .await
            .is_none()
    );
    assert!(!holds(&relay), "an idle session holds buffers");
    let query = message(b'Q', b"select 1\0");
    client_peer.write_all(&query).await.expect("write");
    assert!(
        run_until_waiting(&mut relay, &mut client, &mut upstream)
            .await
            .is_none()
    );
    expect_read(&mut upstream_peer, &query).await;
    assert!(holds(&relay), "mid-request, the buffers are kept");
    let answer = [message(b'C', b"SELECT 1\0"), message(b'Z', b"I")].concat();
    upstream_peer.write_all(&answer).await.expect("write");
    assert!(
        run_until_waiting(&mut relay, &mut client, &mut upstream)
            .await
            .is_none()
    );
    expect_read(&mut client_peer, &answer).await;
    assert!(!holds(&relay));
    assert!(relay.is_idle());
}

/// A client that never sends and cannot be written to (its connection
/// broke while it waited for an answer).
struct Unwritable;

impl AsyncRead for Unwritable {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for Unwritable {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl ReadHint for Unwritable {}

#[tokio::test]
async fn an_answer_the_client_cannot_take_is_still_followed() {
    // The server's answer is written to the client before the relay
    // follows it; a write that fails must not leave the ledger behind,
    // or the backend, idle by then, would be taken for a busy one (and
    // cancelled rather than closed), and the answer's counts lost.
    let (mut upstream, mut upstream_peer) = tokio::io::duplex(4096);
    let mut relay = Relay::new(None, tokio::time::Instant::now());
    let query = message(b'Q', b"select 1\0");
    relay.forward(&query, &mut upstream).await.expect("forward");
    expect_read(&mut upstream_peer, &query).await;
    assert!(relay.backend_busy());
    let mut answer = message(b'C', b"SELECT 1\0");
    answer.extend(message(b'Z', b"I"));
    upstream_peer.write_all(&answer).await.expect("write");
    let stopped = relay.run(&mut Unwritable, &mut upstream).await;
    assert!(matches!(stopped, Err(RelayError::Client(_))), "{stopped:?}");
    assert!(!relay.backend_busy(), "the ReadyForQuery was not followed");
    assert!(relay.between_requests());
}

#[test]
fn a_relay_fits_the_allocators_small_sizes() {
    // Boxed for every pooled transaction: past 1 KiB, mimalloc's
    // allocation takes its generic path, about 300 instructions more a
    // transaction (a 16-byte field took it from 1,016 to 1,032 bytes).
    let size = std::mem::size_of::<Relay>();
    assert!(size <= 1024, "a relay is {size} bytes");
}

/// A stop at the next idle boundary asked for on the poll that finds the
/// client's next request already sent: heard after the relay, the request
/// is relayed and answered first; heard before it, nothing is read.
#[tokio::test]
async fn a_stop_heard_after_the_relay_lets_what_was_sent_through_and_before_it_does_not() {
    for heard in [Heard::AfterRelay, Heard::BeforeRelay] {
        let (mut client, mut client_peer) = tokio::io::duplex(4096);
        let (mut upstream, mut upstream_peer) = tokio::io::duplex(4096);
        let query = message(b'Q', b"select 1\0");
        client_peer.write_all(&query).await.expect("write");
        let server = tokio::spawn(async move {
            let mut got = vec![0u8; query.len()];
            upstream_peer.read_exact(&mut got).await.expect("read");
            assert_eq!(got, query);
            send(&mut upstream_peer, b'Z', b"I").await;
            upstream_peer
        });
        let mut relay = Relay::new(None, tokio::time::Instant::now());
        let mut asked = false;
        let outside = |_: &Relay, _: &mut Context<'_>| match std::mem::replace(&mut asked, true) {
            false => Poll::Ready(Heed::AtIdle),
            true => Poll::Pending,
        };
        let stopped = tokio::time::timeout(
            Duration::from_secs(5),
            relay.run_heeding(&mut client, &mut upstream, heard, outside),
        )
        .await
        .expect("the relay stops");
        assert_eq!(
            stopped.map(|s| s.expect("relay")),
            Some(Stop::Idle),
            "{heard:?}"
        );
        match heard {
            Heard::AfterRelay => {
                let server = tokio::time::timeout(Duration::from_secs(5), server).await;
                server
                    .expect("the request reached the server")
                    .expect("server");
                expect_read(&mut client_peer, &message(b'Z', b"I")).await;
            }
            Heard::BeforeRelay => {
                assert!(!server.is_finished(), "nothing was read");
                server.abort();
            }
        }
    }
}

/// A relay idle on both sides, asked to stop at its next idle boundary:
/// it is at one, and stops on that same poll, whichever comes first (no
/// byte from either side would wake it again).
#[tokio::test]
async fn a_stop_asked_of_an_idle_relay_stops_it_on_the_same_poll() {
    for heard in [Heard::AfterRelay, Heard::BeforeRelay] {
        let (mut client, _client_peer) = tokio::io::duplex(4096);
        let (mut upstream, _upstream_peer) = tokio::io::duplex(4096);
        let mut relay = Relay::new(None, tokio::time::Instant::now());
        let mut asked = false;
        let outside = |_: &Relay, _: &mut Context<'_>| match std::mem::replace(&mut asked, true) {
            false => Poll::Ready(Heed::AtIdle),
            true => Poll::Pending,
        };
        let mut run = std::pin::pin!(relay.run_heeding(&mut client, &mut upstream, heard, outside));
        let first = poll_fn(|cx| Poll::Ready(run.as_mut().poll(cx))).await;
        assert!(
            matches!(first, Poll::Ready(Some(Ok(Stop::Idle)))),
            "{heard:?}: {first:?}"
        );
    }
}
