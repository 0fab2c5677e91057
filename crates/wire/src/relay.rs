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

/// Buffer size per direction.
const RELAY_BUFFER: usize = 16 * 1024;
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

/// Relays until one side ends, then shuts down both. With `token_expiry`,
/// the session ends at the first transaction boundary after that instant.
pub async fn relay<C, U>(client: C, upstream: U, token_expiry: Option<Instant>) -> io::Result<Ended>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    // The client has sent something since the last ReadyForQuery: a
    // request is in flight, so the session is not at a boundary.
    let client_waiting = AtomicBool::new(false);

    let client_to_upstream = async {
        let mut buf = vec![0u8; RELAY_BUFFER];
        loop {
            let n = client_read.read(&mut buf).await?;
            if n == 0 {
                return Ok(Ended::Client);
            }
            client_waiting.store(true, Ordering::SeqCst);
            upstream_write.write_all(&buf[..n]).await?;
            upstream_write.flush().await?;
        }
    };
    let upstream_to_client = async {
        let mut buf = vec![0u8; RELAY_BUFFER];
        let mut scanner = MessageScanner::default();
        let mut expired = false;
        let expiry = tokio::time::sleep_until(token_expiry.unwrap_or_else(Instant::now));
        tokio::pin!(expiry);
        loop {
            tokio::select! {
                read = upstream_read.read(&mut buf) => {
                    let n = read?;
                    if n == 0 {
                        return Ok(Ended::Upstream);
                    }
                    let status = scanner.feed(&buf[..n]);
                    client_write.write_all(&buf[..n]).await?;
                    client_write.flush().await?;
                    if status.is_some() {
                        client_waiting.store(false, Ordering::SeqCst);
                    }
                    if expired && status == Some(IDLE) && scanner.at_boundary() {
                        return Ok(Ended::TokenExpired);
                    }
                }
                () = &mut expiry, if token_expiry.is_some() && !expired => {
                    expired = true;
                    let idle = scanner.last_status() == Some(IDLE)
                        && scanner.at_boundary()
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
        // Terminate ('X'): the backend ends cleanly instead of logging an
        // unexpected EOF.
        let _ = upstream_write.write_all(&[b'X', 0, 0, 0, 4]).await;
    }
    // Best effort: a side that already failed cannot be shut down cleanly.
    let _ = client_write.shutdown().await;
    let _ = upstream_write.shutdown().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[tokio::test]
    async fn relays_both_ways_and_closing_one_side_closes_the_other() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let relay = tokio::spawn(relay(client, upstream, None));
        client_peer.write_all(b"Q-query").await.expect("write");
        let mut got = [0u8; 7];
        upstream_peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"Q-query");
        upstream_peer.write_all(b"T-rows").await.expect("write");
        let mut got = [0u8; 6];
        client_peer.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"T-rows");

        drop(upstream_peer);
        assert_eq!(relay.await.expect("join").expect("relay"), Ended::Upstream);
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.expect("clean EOF");
        assert!(rest.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_token_ends_the_session_at_the_end_of_the_transaction() {
        let (client, mut client_peer) = tokio::io::duplex(4096);
        let (upstream, mut upstream_peer) = tokio::io::duplex(4096);
        let expiry = Instant::now() + Duration::from_secs(60);
        let relay = tokio::spawn(relay(client, upstream, Some(expiry)));
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
        client_peer.write_all(b"Q-commit").await.expect("write");
        let mut query = [0u8; 8];
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
            relay.await.expect("join").expect("relay"),
            Ended::TokenExpired
        );
        let mut rest = Vec::new();
        client_peer.read_to_end(&mut rest).await.expect("read");
        let commit_and_ready = message(b'C', b"COMMIT\0").len() + 6;
        assert_eq!(rest[commit_and_ready], b'E', "an ErrorResponse follows");
        let mut terminate = Vec::new();
        upstream_peer
            .read_to_end(&mut terminate)
            .await
            .expect("read");
        assert_eq!(terminate, [b'X', 0, 0, 0, 4]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_session_ends_when_its_token_expires() {
        let (client, mut client_peer) = tokio::io::duplex(4096);
        let (upstream, mut upstream_peer) = tokio::io::duplex(4096);
        let expiry = Instant::now() + Duration::from_secs(60);
        let relay = tokio::spawn(relay(client, upstream, Some(expiry)));
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
            relay.await.expect("join").expect("relay"),
            Ended::TokenExpired
        );
    }
}
