//! Byte relay between an authenticated client and its upstream backend.
//!
//! After the handshake the proxy does not parse traffic: bytes flow both ways
//! until either side closes or fails, and then both are closed. Postgres has
//! no use for half-open sessions, so the first side to end ends the session.

use std::io;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

/// Buffer size per direction; large enough for typical result batches.
const RELAY_BUFFER: usize = 64 * 1024;

/// Which side ended the session.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The client closed (normally after Terminate).
    Client,
    /// The upstream server closed (shutdown, FATAL, terminated backend).
    Upstream,
}

/// Relays until one side ends, then shuts down both.
pub async fn relay<C, U>(client: C, upstream: U) -> io::Result<Ended>
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (client_read, mut client_write) = tokio::io::split(client);
    let (upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let mut client_read = tokio::io::BufReader::with_capacity(RELAY_BUFFER, client_read);
    let mut upstream_read = tokio::io::BufReader::with_capacity(RELAY_BUFFER, upstream_read);
    let outcome = tokio::select! {
        result = tokio::io::copy_buf(&mut client_read, &mut upstream_write) => {
            result.map(|_| Ended::Client)
        }
        result = tokio::io::copy_buf(&mut upstream_read, &mut client_write) => {
            result.map(|_| Ended::Upstream)
        }
    };
    // Best effort: a side that already failed cannot be shut down cleanly.
    let _ = client_write.shutdown().await;
    let _ = upstream_write.shutdown().await;
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    #[tokio::test]
    async fn relays_both_ways_and_closing_one_side_closes_the_other() {
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let relay = tokio::spawn(relay(client, upstream));
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
}
