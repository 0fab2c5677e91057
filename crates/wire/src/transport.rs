//! The client's transport: plain TCP, or TLS reached by SSLRequest or by
//! direct TLS (first byte 0x16 with ALPN "postgresql", Postgres 17+).

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// How a client reached the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// The Postgres protocol over TCP (TLS or not).
    Wire,
    /// The Postgres protocol over a WebSocket.
    WebSocket,
    /// `POST /sql`.
    Http,
}

impl Transport {
    /// The label of the transport in logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::Wire => "tcp",
            Self::WebSocket => "websocket",
            Self::Http => "http",
        }
    }
}

/// ALPN protocol name Postgres uses for TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";
/// First byte of a TLS record carrying a handshake.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// ALPN protocol name of HTTP/1.1, for the HTTP listener.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Why TLS settings could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsConfigError {
    /// A PEM file could not be read or parsed.
    #[error("reading {what} {}: {source}", path.display())]
    Read {
        /// Which file ("TLS certificate", "TLS key", "CA file").
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("{} holds no certificate", .0.display())]
    NoCertificate(PathBuf),
    /// A CA certificate is not usable.
    #[error("CA file {}: {source}", path.display())]
    BadCa {
        /// Its path.
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// The certificate and key do not fit together.
    #[error("TLS certificate and key do not fit: {0}")]
    Mismatch(rustls::Error),
    /// The platform's CA roots could not be loaded, or another TLS setting
    /// failed.
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
}

/// Builds a TLS acceptor from PEM files (certificate chain and private key)
/// that offers the `alpn` protocol: [`ALPN_POSTGRESQL`] for the wire
/// listener, [`ALPN_HTTP1`] for HTTP. A client offering only other
/// protocols is refused; one offering none is accepted.
pub fn tls_acceptor(
    cert_pem: &Path,
    key_pem: &Path,
    alpn: &[u8],
) -> Result<tokio_rustls::TlsAcceptor, TlsConfigError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    fn read<'a>(
        what: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(pem::Error) -> TlsConfigError + 'a {
        move |source| TlsConfigError::Read {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
    let certs = CertificateDer::pem_file_iter(cert_pem)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(read("TLS certificate", cert_pem))?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate(cert_pem.to_path_buf()));
    }
    let key = PrivateKeyDer::from_pem_file(key_pem).map_err(read("TLS key", key_pem))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Setup)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsConfigError::Mismatch)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Keepalive probes sent before a silent peer is given up on.
const KEEPALIVE_PROBES: u32 = 6;

/// Readies a TCP socket for Postgres traffic: no Nagle delay, and with
/// `keepalive`, probes after that much idle time (then every sixth of it,
/// [`KEEPALIVE_PROBES`] times), so a peer that vanished without a FIN is
/// noticed within about twice `keepalive` instead of hours.
pub(crate) fn tune(tcp: &TcpStream, keepalive: Option<Duration>) {
    let _ = tcp.set_nodelay(true);
    if let Some(idle) = keepalive {
        let probes = socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval((idle / 6).max(Duration::from_secs(1)))
            .with_retries(KEEPALIVE_PROBES);
        if let Err(error) = socket2::SockRef::from(tcp).set_tcp_keepalive(&probes) {
            tracing::debug!(%error, "cannot set TCP keepalive");
        }
    }
}

/// A connection that is plain or TLS; both sides of the proxy use it.
pub enum MaybeTls<P, T> {
    /// Unencrypted.
    Plain(P),
    /// Encrypted (boxed: a TLS session is large and this enum is moved around).
    Tls(Box<T>),
}

/// Plain TCP says from tokio's readiness, cleared by the read that found
/// the socket empty and set by the event that wakes its reader; TLS may
/// hold decrypted bytes the socket does not show, so it cannot tell.
impl<T> crate::relay::ReadHint for MaybeTls<TcpStream, T> {
    fn known_unreadable(&self) -> bool {
        match self {
            Self::Plain(tcp) => read_readiness_clear(tcp),
            Self::Tls(_) => false,
        }
    }
}

/// Whether tokio's read readiness of `tcp` is clear: cleared by the read
/// that found the socket empty, set by the event that brings bytes (or
/// the peer's close). While clear, nothing has arrived since that read.
pub(crate) fn read_readiness_clear(tcp: &TcpStream) -> bool {
    tcp.try_io(tokio::io::Interest::READABLE, || Ok(()))
        .is_err()
}

/// A client connection: TCP, or TLS accepted by the proxy.
pub type ClientStream = MaybeTls<TcpStream, TlsStream<TcpStream>>;

/// An upstream connection: TCP, or TLS the proxy started.
pub type UpstreamStream = MaybeTls<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

impl UpstreamStream {
    /// The TCP connection underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Self::Plain(tcp) => tcp,
            Self::Tls(tls) => tls.get_ref().0,
        }
    }
}

impl<P, T> AsyncRead for MaybeTls<P, T>
where
    P: AsyncRead + Unpin,
    T: AsyncRead + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<P, T> AsyncWrite for MaybeTls<P, T>
where
    P: AsyncWrite + Unpin,
    T: AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// How the proxy secures its connection to the upstream server.
#[derive(Clone)]
pub enum UpstreamTls {
    /// No TLS (a server on the same host or a private network).
    Disable,
    /// TLS with the server certificate verified against `roots` for the
    /// configured host name (libpq's `verify-full`).
    VerifyFull(Arc<rustls::ClientConfig>),
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Disable => "disable",
            Self::VerifyFull(_) => "verify-full",
        })
    }
}

impl UpstreamTls {
    /// `verify-full` trusting the certificates in `ca_pem`, or the
    /// platform's roots when `None`.
    pub fn verify_full(ca_pem: Option<&Path>) -> Result<Self, TlsConfigError> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(TlsConfigError::Setup)?;
        let config = match ca_pem {
            Some(path) => {
                let read = |source| TlsConfigError::Read {
                    what: "CA file",
                    path: path.to_path_buf(),
                    source,
                };
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path).map_err(read)? {
                    roots
                        .add(cert.map_err(read)?)
                        .map_err(|source| TlsConfigError::BadCa {
                            path: path.to_path_buf(),
                            source,
                        })?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => {
                use rustls_platform_verifier::BuilderVerifierExt as _;
                builder
                    .with_platform_verifier()
                    .map_err(TlsConfigError::Setup)?
                    .with_no_client_auth()
            }
        };
        Ok(Self::VerifyFull(Arc::new(config)))
    }
}

/// Sends a CancelRequest for (`pid`, `key`) to `address` and waits, until
/// `deadline`, for the other side to close: Postgres, and authgres, close
/// once they have acted on it.
pub(crate) async fn send_cancel_request(
    address: &str,
    pid: i32,
    key: &[u8],
    deadline: tokio::time::Instant,
) -> std::io::Result<()> {
    let timed_out = || std::io::Error::from(std::io::ErrorKind::TimedOut);
    let mut stream = tokio::time::timeout_at(deadline, TcpStream::connect(address))
        .await
        .map_err(|_| timed_out())??;
    let out = crate::proto::startup::cancel_request(pid, key);
    tokio::time::timeout_at(
        deadline,
        tokio::io::AsyncWriteExt::write_all(&mut stream, &out),
    )
    .await
    .map_err(|_| timed_out())??;
    let mut sink = [0u8; 1];
    let _ = tokio::time::timeout_at(
        deadline,
        tokio::io::AsyncReadExt::read(&mut stream, &mut sink),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn plain_tcp_is_known_unreadable_only_between_an_empty_read_and_new_bytes() {
        use crate::relay::ReadHint as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut peer = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut stream: ClientStream = MaybeTls::Plain(tcp);
        peer.write_all(b"hello").await.expect("write");
        let mut buf = [0u8; 64];
        // The bytes wake the reader; a read shorter than its buffer
        // clears the readiness.
        let n = stream.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"hello");
        assert!(stream.known_unreadable());
        // New bytes set it again once the driver sees them.
        peer.write_all(b"more").await.expect("write");
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            while stream.known_unreadable() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "new bytes never showed");
        let n = stream.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], b"more");
        // So does the peer's close.
        assert!(stream.known_unreadable());
        drop(peer);
        let waited = tokio::time::timeout(Duration::from_secs(5), async {
            while stream.known_unreadable() {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
        .await;
        assert!(waited.is_ok(), "the close never showed");
    }

    #[tokio::test]
    async fn tuned_sockets_probe_idle_peers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        tune(&client, Some(Duration::from_secs(60)));
        let socket = socket2::SockRef::from(&client);
        assert!(socket.tcp_nodelay().expect("nodelay"));
        assert!(socket.keepalive().expect("keepalive"));
        assert_eq!(
            socket.tcp_keepalive_time().expect("time"),
            Duration::from_secs(60)
        );
        assert_eq!(
            socket.tcp_keepalive_interval().expect("interval"),
            Duration::from_secs(10)
        );
        assert_eq!(
            socket.tcp_keepalive_retries().expect("retries"),
            KEEPALIVE_PROBES
        );
    }
}
