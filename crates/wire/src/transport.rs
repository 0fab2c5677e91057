//! The client's transport: plain TCP, or TLS reached by SSLRequest or by
//! direct TLS (first byte 0x16 with ALPN "postgresql", Postgres 17+).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// ALPN protocol name Postgres uses for TLS.
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";
/// First byte of a TLS record carrying a handshake.
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// ALPN protocol name of HTTP/1.1, for the HTTP listener.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

/// Builds a TLS acceptor from PEM files (certificate chain and private key)
/// that offers the `alpn` protocol: [`ALPN_POSTGRESQL`] for the wire
/// listener, [`ALPN_HTTP1`] for HTTP. A client offering only other
/// protocols is refused; one offering none is accepted.
pub fn tls_acceptor(
    cert_pem: &std::path::Path,
    key_pem: &std::path::Path,
    alpn: &[u8],
) -> Result<tokio_rustls::TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert_pem)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("reading TLS certificate {}: {e}", cert_pem.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert_pem.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key_pem)
        .map_err(|e| format!("reading TLS key {}: {e}", key_pem.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A connection that is plain or TLS; both sides of the proxy use it.
pub enum MaybeTls<P, T> {
    /// Unencrypted.
    Plain(P),
    /// Encrypted (boxed: a TLS session is large and this enum is moved around).
    Tls(Box<T>),
}

/// A client connection: TCP, or TLS accepted by the proxy.
pub type ClientStream = MaybeTls<TcpStream, TlsStream<TcpStream>>;

/// An upstream connection: TCP, or TLS the proxy started.
pub type UpstreamStream = MaybeTls<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

impl<P, T> MaybeTls<P, T> {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls(_))
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
    pub fn verify_full(ca_pem: Option<&std::path::Path>) -> Result<Self, String> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let config = match ca_pem {
            Some(path) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("reading CA file {}: {e}", path.display()))?
                {
                    let cert = cert.map_err(|e| format!("CA file {}: {e}", path.display()))?;
                    roots
                        .add(cert)
                        .map_err(|e| format!("CA file {}: {e}", path.display()))?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            None => {
                use rustls_platform_verifier::BuilderVerifierExt as _;
                builder
                    .with_platform_verifier()
                    .map_err(|e| format!("loading the platform's CA roots: {e}"))?
                    .with_no_client_auth()
            }
        };
        Ok(Self::VerifyFull(Arc::new(config)))
    }
}
