//! A local identity provider: the [`Signer`]'s JWKS and OIDC discovery
//! document served over HTTP or HTTPS on loopback.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::signer::{Signer, TokenSpec};

/// How the issuer's HTTP endpoint answers, for tests of provider failures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behavior {
    /// Serves the JWKS and the OIDC discovery document.
    Normal,
    /// Answers every request with HTTP 503.
    Down,
    /// Waits this long before answering normally.
    Slow(Duration),
    /// Serves a JWKS document larger than any sane limit (256 KiB).
    Oversize,
    /// Serves a body that is not JSON.
    Malformed,
    /// Redirects the JWKS path to this URL.
    Redirect(String),
    /// Serves this text as the JWKS (provider-shaped documents).
    Document(String),
}

struct ServerState {
    signer: Signer,
    base: String,
    behavior: Mutex<Behavior>,
    /// `Cache-Control: max-age` sent with the JWKS, if any.
    max_age: Mutex<Option<u64>>,
    /// JWKS requests served so far, for single-flight and refetch tests.
    fetches: AtomicUsize,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

/// A [`Signer`] whose JWKS (`/.well-known/jwks.json`) and OIDC discovery
/// document (`/.well-known/openid-configuration`) are served over HTTP or
/// HTTPS on loopback. The server stops on drop.
pub struct Issuer {
    state: Arc<ServerState>,
    server: tokio::task::JoinHandle<()>,
}

impl Issuer {
    /// Generates keys and serves them over HTTP on 127.0.0.1. The issuer
    /// (`iss`) is the server's base URL, like Clerk's frontend API.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_inner(None).await
    }

    /// Like [`start`](Self::start), over HTTPS with `certs`' localhost
    /// certificate; clients must trust `certs.ca_pem`.
    pub async fn start_https(certs: &crate::tls::TestCerts) -> anyhow::Result<Self> {
        use rustls::pki_types::pem::PemObject as _;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_slice_iter(certs.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(certs.key_pem.as_bytes())?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        Self::start_inner(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_inner(tls: Option<tokio_rustls::TlsAcceptor>) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let port = listener.local_addr()?.port();
        // HTTPS uses the name the test certificate is for.
        let host = if tls.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        let base = format!("{scheme}://{host}:{port}");
        let state = Arc::new(ServerState {
            signer: Signer::generate(&base)?,
            base,
            behavior: Mutex::new(Behavior::Normal),
            max_age: Mutex::new(Some(300)),
            fetches: AtomicUsize::new(0),
            tls,
        });
        let server = tokio::spawn(serve_http(listener, Arc::clone(&state)));
        Ok(Self { state, server })
    }

    /// The token signer.
    pub fn signer(&self) -> &Signer {
        &self.state.signer
    }

    /// The `iss` of this issuer's tokens (the server's base URL).
    pub fn issuer(&self) -> &str {
        self.state.signer.issuer()
    }

    /// Where the JWKS is served.
    pub fn jwks_url(&self) -> String {
        format!("{}/.well-known/jwks.json", self.state.base)
    }

    /// How many times the JWKS has been served.
    pub fn jwks_fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }

    /// Changes how the endpoint answers from the next request on.
    pub fn set_behavior(&self, behavior: Behavior) {
        *self
            .state
            .behavior
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = behavior;
    }

    /// Sets (or, with `None`, omits) the JWKS `Cache-Control: max-age`.
    pub fn set_max_age(&self, seconds: Option<u64>) {
        *self
            .state
            .max_age
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = seconds;
    }

    /// A one-hour RS256 token for `sub`.
    pub fn token(&self, sub: &str) -> String {
        self.state.signer.mint(&TokenSpec::new(sub))
    }

    /// A token as `spec` says.
    pub fn mint(&self, spec: &TokenSpec) -> String {
        self.state.signer.mint(spec)
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A minimal HTTP/1.1 responder, one request per connection: enough for a
/// JWKS client; not a general server.
async fn serve_http(listener: tokio::net::TcpListener, state: Arc<ServerState>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            match &state.tls {
                Some(acceptor) => {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        answer(tls, &state).await;
                    }
                }
                None => answer(tcp, &state).await,
            }
        });
    }
}

async fn answer<S>(mut stream: S, state: &ServerState)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => request.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
    let line = String::from_utf8_lossy(&request);
    let path = line.split(' ').nth(1).unwrap_or("").to_owned();
    let behavior = state
        .behavior
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if let Behavior::Slow(delay) = behavior {
        tokio::time::sleep(delay).await;
    }
    let jwks_path = path == "/.well-known/jwks.json";
    if jwks_path {
        state.fetches.fetch_add(1, Ordering::SeqCst);
    }
    let max_age = *state.max_age.lock().unwrap_or_else(PoisonError::into_inner);
    let (status, headers, body) = match (&behavior, path.as_str()) {
        (Behavior::Down, _) => ("503 Service Unavailable", String::new(), String::new()),
        (Behavior::Redirect(to), "/.well-known/jwks.json") => {
            ("302 Found", format!("location: {to}\r\n"), String::new())
        }
        (Behavior::Oversize, "/.well-known/jwks.json") => {
            let padding = "x".repeat(256 * 1024);
            (
                "200 OK",
                String::new(),
                format!("{{\"keys\":[],\"pad\":\"{padding}\"}}"),
            )
        }
        (Behavior::Document(text), "/.well-known/jwks.json") => {
            ("200 OK", String::new(), text.clone())
        }
        (Behavior::Malformed, "/.well-known/jwks.json") => (
            "200 OK",
            String::new(),
            "<html>maintenance</html>".to_owned(),
        ),
        (_, "/.well-known/jwks.json") => (
            "200 OK",
            max_age
                .map(|age| format!("cache-control: public, max-age={age}\r\n"))
                .unwrap_or_default(),
            state.signer.jwks().to_string(),
        ),
        (_, "/.well-known/openid-configuration") => (
            "200 OK",
            String::new(),
            json!({
                "issuer": state.signer.issuer(),
                "jwks_uri": format!("{}/.well-known/jwks.json", state.base),
            })
            .to_string(),
        ),
        _ => ("404 Not Found", String::new(), String::new()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         {headers}connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}
