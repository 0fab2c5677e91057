//! Byte relay between an authenticated client and its upstream backend.
//!
//! After the handshake the proxy does not parse queries: bytes flow both ways
//! until either side closes or fails, and then both are closed. Postgres has
//! no use for half-open sessions, so the first side to end ends the session.
//! The server-to-client direction follows message headers
//! ([`MessageScanner`]) to know where transactions end, which is where an
//! expired token ends the session when expiry is enforced.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::time::Instant;

use crate::backend;
use crate::error::SqlState;
use crate::scan::MessageScanner;

/// Buffer for client-to-server bytes: queries and binds are small. Idle
/// sessions hold both buffers, so they are sized for memory per session
/// (`cargo bench --bench idle_memory`) as much as for throughput.
const CLIENT_BUFFER: usize = 2 * 1024;
/// Buffer for server-to-client bytes: result rows.
const SERVER_BUFFER: usize = 8 * 1024;
/// Transaction status of ReadyForQuery when no transaction is open.
const IDLE: u8 = b'I';

/// Which side ended the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client closed (normally after Terminate).
    Client,
    /// The upstream server closed (shutdown, FATAL, terminated backend).
    Upstream,
    /// The token expired and expiry is enforced: the proxy ended the session
    /// at a transaction boundary.
    TokenExpired,
}

/// How a relay ended, and whether the upstream connection can serve
/// another client.
#[derive(Debug)]
pub struct Relayed {
    /// Which side ended it.
    pub ended: Ended,
    /// The upstream sat between messages with no request in flight and the
    /// client's Terminate was not forwarded: after a reset it is reusable.
    pub reusable: bool,
}

/// Message tag of Terminate.
const TERMINATE: u8 = b'X';

/// Relays until one side ends. The client is shut down; the upstream is
/// left to the caller (reset and pooled, or dropped), and never receives
/// the client's Terminate. With `token_expiry`, the session ends at the
/// first transaction boundary after that instant.
pub async fn relay<C, U>(
    client: C,
    upstream: &mut U,
    token_expiry: Option<Instant>,
) -> io::Result<Relayed>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    // The client has sent something since the last ReadyForQuery: a
    // request is in flight, so the session is not at a boundary.
    let client_waiting = AtomicBool::new(false);
    let mut client_messages = MessageScanner::default();
    // The session starts idle: the proxy sent the handshake's ReadyForQuery.
    let mut server_messages = MessageScanner::after_ready(IDLE);

    let client_to_upstream = async {
        let mut buf = vec![0u8; CLIENT_BUFFER];
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, io::Error>(Ended::Client);
            }
            let (forward, terminated) = match client_messages.feed_until(&buf[..n], TERMINATE) {
                Some(at) => (at, true),
                None => (n, false),
            };
            if forward > 0 {
                client_waiting.store(true, Ordering::SeqCst);
                upstream_write.write_all(&buf[..forward]).await?;
                upstream_write.flush().await?;
            }
            if terminated {
                return Ok(Ended::Client);
            }
        }
    };
    let upstream_to_client = async {
        let mut buf = vec![0u8; SERVER_BUFFER];
        let mut expired = false;
        let expiry = tokio::time::sleep_until(token_expiry.unwrap_or_else(Instant::now));
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                read = upstream_read.read(&mut buf) => {
                    let n = read?;
                    if n == 0 {
                        return Ok::<_, io::Error>(Ended::Upstream);
                    }
                    let status = server_messages.feed(&buf[..n]);
                    client_write.write_all(&buf[..n]).await?;
                    client_write.flush().await?;
                    if status.is_some() {
                        client_waiting.store(false, Ordering::SeqCst);
                    }
                    if expired && status == Some(IDLE) && server_messages.at_boundary() {
                        return Ok(Ended::TokenExpired);
                    }
                }
                () = &mut expiry, if token_expiry.is_some() && !expired => {
                    expired = true;
                    let idle = server_messages.last_status() == Some(IDLE)
                        && server_messages.at_boundary()
                        && !client_waiting.load(Ordering::SeqCst);
                    if idle {
                        return Ok(Ended::TokenExpired);
                    }
                }
            }
        }
    };
    let outcome = tokio::select! {
        ended = client_to_upstream => ended,
        ended = upstream_to_client => ended,
    };
    if let Ok(Ended::TokenExpired) = outcome {
        let mut out = BytesMut::new();
        backend::fatal_error(
            SqlState::InvalidPassword,
            "the session's token expired",
            Some("reconnect with a fresh token"),
            &mut out,
        );
        let _ = client_write.write_all(&out).await;
        let _ = client_write.flush().await;
    }
    // Best effort: a client that already failed cannot be shut down cleanly.
    let _ = client_write.shutdown().await;
    let ended = outcome?;
    let reusable = ended != Ended::Upstream
        && server_messages.last_status().is_some()
        && server_messages.at_boundary()
        && client_messages.at_boundary()
        && !client_waiting.load(Ordering::SeqCst);
    Ok(Relayed { ended, reusable })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::DuplexStream;

    #[tokio::test]
    async fn terminate_is_not_forwarded_and_leaves_the_upstream_reusable() {
        let (mut client_peer, mut upstream_peer, relay) = start_keeping_upstream(None);
        client_peer
            .write_all(&message(b'Q', b"select 1\0"))
            .await
            .expect("write");
        let mut query = vec![0u8; 14];
        upstream_peer.read_exact(&mut query).await.expect("read");
        upstream_peer
            .write_all(&message(b'Z', b"I"))
            .await
            .expect("write");
        let mut ready = [0u8; 6];
        client_peer.read_exact(&mut ready).await.expect("read");
        client_peer
            .write_all(&message(b'X', b""))
            .await
            .expect("write");
        let (relayed, upstream) = relay.await.expect("join");
        let relayed = relayed.expect("relay");
        assert_eq!(relayed.ended, Ended::Client);
        assert!(relayed.reusable);
        drop(upstream);
        let mut rest = Vec::new();
        upstream_peer.read_to_end(&mut rest).await.expect("read");
        assert!(rest.is_empty(), "Terminate reached the upstream: {rest:?}");
    }

    #[tokio::test]
    async fn a_client_leaving_mid_request_makes_the_upstream_unusable() {
        let (mut client_peer, mut upstream_peer, relay) = start(None);
        upstream_peer
            .write_all(&message(b'Z', b"I"))
            .await
            .expect("write");
        let mut ready = [0u8; 6];
        client_peer.read_exact(&mut ready).await.expect("read");
        client_peer
            .write_all(&message(b'Q', b"select pg_sleep(10)\0"))
            .await
            .expect("write");
        let mut query = vec![0u8; 25];
        upstream_peer.read_exact(&mut query).await.expect("read");
        drop(client_peer);
        let relayed = relay.await.expect("join").expect("relay");
        assert_eq!(relayed.ended, Ended::Client);
        assert!(!relayed.reusable, "a query was in flight");
    }

    type Relaying = tokio::task::JoinHandle<io::Result<Relayed>>;

    /// A relay between two in-memory pipes: (client peer, upstream peer, relay).
    fn start(expiry: Option<Instant>) -> (DuplexStream, DuplexStream, Relaying) {
        let (client, client_peer) = tokio::io::duplex(4096);
        let (mut upstream, upstream_peer) = tokio::io::duplex(4096);
        let relay = tokio::spawn(async move { relay(client, &mut upstream, expiry).await });
        (client_peer, upstream_peer, relay)
    }

    /// Like [`start`], handing back the upstream stream when the relay ends.
    fn start_keeping_upstream(
        expiry: Option<Instant>,
    ) -> (
        DuplexStream,
        DuplexStream,
        tokio::task::JoinHandle<(io::Result<Relayed>, DuplexStream)>,
    ) {
        let (client, client_peer) = tokio::io::duplex(4096);
        let (mut upstream, upstream_peer) = tokio::io::duplex(4096);
        let relay = tokio::spawn(async move {
            let relayed = relay(client, &mut upstream, expiry).await;
            (relayed, upstream)
        });
        (client_peer, upstream_peer, relay)
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn relays_both_ways_and_closing_one_side_closes_the_other() {
        let (mut client_peer, mut upstream_peer, relay) = start(None);
        client_peer.write_all(b"Q-query").await.expect("write");
        let mut got = [0u8; 7];
        upstream_peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"Q-query");
        upstream_peer.write_all(b"T-rows").await.expect("write");
        let mut got = [0u8; 6];
        client_peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"T-rows");

        drop(upstream_peer);
        let relayed = relay.await.expect("join").expect("relay");
        assert_eq!(relayed.ended, Ended::Upstream);
        assert!(!relayed.reusable);
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.expect("clean EOF");
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_token_ends_the_session_at_the_end_of_the_transaction() {
        let (mut client_peer, mut upstream_peer, relay) =
            start(Some(Instant::now() + Duration::from_secs(60)));
        // A transaction is open when the token expires.
        upstream_peer
            .write_all(&message(b'Z', b"T"))
            .await
            .expect("write");
        let mut got = vec![0u8; 6];
        client_peer.read_exact(&mut got).await.expect("read");
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(!relay.is_finished(), "ended inside a transaction");
        // COMMIT completes: the next idle ReadyForQuery ends the session.
        let commit = message(b'Q', b"commit\0");
        client_peer.write_all(&commit).await.expect("write");
        let mut query = vec![0u8; commit.len()];
        upstream_peer.read_exact(&mut query).await.expect("read");
        upstream_peer
            .write_all(&message(b'C', b"COMMIT\0"))
            .await
            .expect("write");
        upstream_peer
            .write_all(&message(b'Z', b"I"))
            .await
            .expect("write");
        assert_eq!(
            relay.await.expect("join").expect("relay").ended,
            Ended::TokenExpired
        );
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.expect("read");
        let commit_and_ready = message(b'C', b"COMMIT\0").len() + 6;
        assert_eq!(rest[commit_and_ready], b'E', "an ErrorResponse follows");
        // The upstream is the caller's to reset or close: nothing more was sent.
        let mut rest = Vec::new();
        upstream_peer.read_to_end(&mut rest).await.expect("read");
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_session_ends_when_its_token_expires() {
        let (mut client_peer, mut upstream_peer, relay) =
            start(Some(Instant::now() + Duration::from_secs(60)));
        upstream_peer
            .write_all(&message(b'Z', b"I"))
            .await
            .expect("write");
        let mut got = vec![0u8; 6];
        client_peer.read_exact(&mut got).await.expect("read");
        tokio::time::sleep(Duration::from_secs(59)).await;
        assert!(!relay.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            relay.await.expect("join").expect("relay").ended,
            Ended::TokenExpired
        );
    }
}
