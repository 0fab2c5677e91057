//! A local identity provider: keys, a JWKS endpoint on loopback, and tokens
//! shaped like Clerk's session tokens.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Which of the issuer's keys signs a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA 2048, RS256, kid `rsa-1`.
    Rsa,
    /// The same RSA key with RSASSA-PSS (PS256).
    RsaPss,
    /// The same RSA key with SHA-512 (RS512).
    Rsa512,
    /// P-256, ES256, kid `ec-1`.
    Ec,
    /// P-384, ES384, kid `ec384-1`.
    Ec384,
    /// Ed25519, EdDSA, kid `ed-1`.
    Ed25519,
}

impl KeyKind {
    /// The JWS `alg` this key signs with.
    pub fn alg(self) -> &'static str {
        match self {
            Self::Rsa => "RS256",
            Self::RsaPss => "PS256",
            Self::Rsa512 => "RS512",
            Self::Ec => "ES256",
            Self::Ec384 => "ES384",
            Self::Ed25519 => "EdDSA",
        }
    }

    /// The key's `kid` in the JWKS.
    pub fn kid(self) -> &'static str {
        match self {
            Self::Rsa | Self::RsaPss | Self::Rsa512 => "rsa-1",
            Self::Ec => "ec-1",
            Self::Ec384 => "ec384-1",
            Self::Ed25519 => "ed-1",
        }
    }
}

/// What to put in a token.
#[derive(Debug, Clone)]
pub struct TokenSpec {
    /// The `sub` claim (Clerk: `user_...`).
    pub sub: String,
    /// Signing key.
    pub key: KeyKind,
    /// Lifetime from `now` (`exp = iat + ttl`).
    pub ttl: Duration,
    /// The issue time; tests move it to make expired or future tokens.
    pub now: SystemTime,
    /// Extra or overriding claims.
    pub claims: Map<String, Value>,
}

impl TokenSpec {
    /// A one-hour RS256 token for `sub`, issued now.
    pub fn new(sub: &str) -> Self {
        Self {
            sub: sub.to_owned(),
            key: KeyKind::Rsa,
            ttl: Duration::from_secs(3600),
            now: SystemTime::now(),
            claims: Map::new(),
        }
    }

    /// Signs with `key` instead.
    pub fn key(mut self, key: KeyKind) -> Self {
        self.key = key;
        self
    }

    /// Sets the issue time.
    pub fn issued_at(mut self, now: SystemTime) -> Self {
        self.now = now;
        self
    }

    /// Sets the lifetime.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Adds or overrides a claim.
    pub fn claim(mut self, name: &str, value: Value) -> Self {
        self.claims.insert(name.to_owned(), value);
        self
    }
}

struct Keys {
    issuer: String,
    /// Published RSA keys by kid; the last one signs.
    rsa: RwLock<Vec<(String, Arc<RsaKeyPair>)>>,
    ec: EcdsaKeyPair,
    ec384: EcdsaKeyPair,
    ed: Ed25519KeyPair,
}

impl Keys {
    fn current_rsa(&self) -> (String, Arc<RsaKeyPair>) {
        let keys = self.rsa.read().unwrap_or_else(PoisonError::into_inner);
        let (kid, key) = keys.last().expect("an RSA key always exists");
        (kid.clone(), Arc::clone(key))
    }
}

/// Mints tokens with the issuer's keys. Cheap to clone.
#[derive(Clone)]
pub struct Signer {
    keys: Arc<Keys>,
}

impl Signer {
    /// Generates fresh keys for an issuer named `issuer` (its `iss`).
    pub fn generate(issuer: &str) -> anyhow::Result<Self> {
        let rsa = RsaKeyPair::generate(KeySize::Rsa2048).context("generating an RSA key")?;
        let ec = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .context("generating a P-256 key")?;
        let ec384 = EcdsaKeyPair::generate(&ECDSA_P384_SHA384_FIXED_SIGNING)
            .context("generating a P-384 key")?;
        let ed = Ed25519KeyPair::generate().context("generating an Ed25519 key")?;
        Ok(Self {
            keys: Arc::new(Keys {
                issuer: issuer.to_owned(),
                rsa: RwLock::new(vec![(KeyKind::Rsa.kid().to_owned(), Arc::new(rsa))]),
                ec,
                ec384,
                ed,
            }),
        })
    }

    /// Rotates the RSA key: a new key (kid `rsa-N`) signs from now on and is
    /// published; the previous key stays published only if `keep_old`.
    /// Returns the new kid.
    pub fn rotate_rsa(&self, keep_old: bool) -> anyhow::Result<String> {
        let key = RsaKeyPair::generate(KeySize::Rsa2048).context("generating an RSA key")?;
        let mut keys = self
            .keys
            .rsa
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let kid = format!("rsa-{}", keys.len() + 1);
        if !keep_old {
            keys.clear();
        }
        keys.push((kid.clone(), Arc::new(key)));
        Ok(kid)
    }

    /// The `iss` of minted tokens.
    pub fn issuer(&self) -> &str {
        &self.keys.issuer
    }

    /// Mints a Clerk-shaped token: `sub`, `iss`, `azp`, `sid`, `iat`, `nbf`, `exp`.
    pub fn mint(&self, spec: &TokenSpec) -> String {
        let iat = spec
            .now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let mut claims = Map::new();
        claims.insert("azp".into(), json!("http://localhost:3000"));
        claims.insert("exp".into(), json!(iat + spec.ttl.as_secs()));
        claims.insert("iat".into(), json!(iat));
        claims.insert("iss".into(), json!(self.keys.issuer));
        claims.insert("nbf".into(), json!(iat.saturating_sub(10)));
        claims.insert(
            "sid".into(),
            json!(format!("sess_{}", crate::cluster::random_hex(12))),
        );
        claims.insert("sub".into(), json!(spec.sub));
        for (name, value) in &spec.claims {
            claims.insert(name.clone(), value.clone());
        }
        let kid = match spec.key {
            KeyKind::Rsa | KeyKind::RsaPss | KeyKind::Rsa512 => self.keys.current_rsa().0,
            other => other.kid().to_owned(),
        };
        let header = json!({"alg": spec.key.alg(), "kid": kid, "typ": "JWT"});
        self.sign_raw(&header, &Value::Object(claims), spec.key)
    }

    /// Signs any header and payload with one of the keys, for tests that
    /// forge tokens (wrong `alg`, missing claims, ...).
    pub fn sign_raw(&self, header: &Value, payload: &Value, key: KeyKind) -> String {
        self.sign_raw_json(&header.to_string(), &payload.to_string(), key)
    }

    /// Signs header and payload JSON given as text, byte for byte (for
    /// provider quirks such as Cognito's escaped slashes).
    pub fn sign_raw_json(&self, header: &str, payload: &str, key: KeyKind) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature = self.sign_bytes(signing_input.as_bytes(), key);
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    fn sign_bytes(&self, message: &[u8], key: KeyKind) -> Vec<u8> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        match key {
            KeyKind::Rsa | KeyKind::RsaPss | KeyKind::Rsa512 => {
                let padding: &'static dyn aws_lc_rs::signature::RsaEncoding = match key {
                    KeyKind::RsaPss => &aws_lc_rs::signature::RSA_PSS_SHA256,
                    KeyKind::Rsa512 => &aws_lc_rs::signature::RSA_PKCS1_SHA512,
                    _ => &RSA_PKCS1_SHA256,
                };
                let (_, rsa) = self.keys.current_rsa();
                let mut signature = vec![0; rsa.public_modulus_len()];
                rsa.sign(padding, &rng, message, &mut signature)
                    .expect("RSA signing with a generated key succeeds");
                signature
            }
            KeyKind::Ec | KeyKind::Ec384 => {
                let key = if key == KeyKind::Ec {
                    &self.keys.ec
                } else {
                    &self.keys.ec384
                };
                key.sign(&rng, message)
                    .expect("ECDSA signing with a generated key succeeds")
                    .as_ref()
                    .to_vec()
            }
            KeyKind::Ed25519 => self.keys.ed.sign(message).as_ref().to_vec(),
        }
    }

    /// The public keys as a JWKS document.
    pub fn jwks(&self) -> Value {
        let ec_point = self.keys.ec.public_key().as_ref();
        // An uncompressed P-256 point: 0x04 || x (32 bytes) || y (32 bytes).
        let (x, y) = ec_point[1..].split_at(32);
        let mut keys: Vec<Value> = self
            .keys
            .rsa
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(kid, rsa)| {
                let public = rsa.public_key();
                json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                 "n": URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero()),
                 "e": URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero())})
            })
            .collect();
        keys.push(json!({"kty": "EC", "use": "sig", "alg": "ES256", "crv": "P-256",
            "kid": KeyKind::Ec.kid(), "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)}));
        // An uncompressed P-384 point: 0x04 || x (48 bytes) || y (48 bytes).
        let (x384, y384) = self.keys.ec384.public_key().as_ref()[1..].split_at(48);
        keys.push(
            json!({"kty": "EC", "use": "sig", "alg": "ES384", "crv": "P-384",
            "kid": KeyKind::Ec384.kid(), "x": URL_SAFE_NO_PAD.encode(x384),
            "y": URL_SAFE_NO_PAD.encode(y384)}),
        );
        keys.push(
            json!({"kty": "OKP", "use": "sig", "alg": "EdDSA", "crv": "Ed25519",
            "kid": KeyKind::Ed25519.kid(),
            "x": URL_SAFE_NO_PAD.encode(self.keys.ed.public_key().as_ref())}),
        );
        json!({ "keys": keys })
    }

    /// The RSA public key as DER (RFC 8017 `RSAPublicKey`), for key-confusion
    /// attacks that HMAC-sign with a public key.
    pub fn rsa_public_der(&self) -> Vec<u8> {
        self.keys.current_rsa().1.public_key().as_ref().to_vec()
    }

    /// Saves the private keys (for `authgres token` beside a running demo).
    /// The file is created with mode 0600.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let rsa = self
            .keys
            .current_rsa()
            .1
            .as_der()
            .context("exporting the RSA key")?;
        let ec = self.keys.ec.to_pkcs8v1().context("exporting the EC key")?;
        let ec384 = self
            .keys
            .ec384
            .to_pkcs8v1()
            .context("exporting the P-384 key")?;
        let ed = self
            .keys
            .ed
            .to_pkcs8()
            .context("exporting the Ed25519 key")?;
        let document = json!({
            "issuer": self.keys.issuer,
            "rsa": STANDARD.encode(rsa.as_ref()),
            "ec": STANDARD.encode(ec.as_ref()),
            "ec384": STANDARD.encode(ec384.as_ref()),
            "ed25519": STANDARD.encode(ed.as_ref()),
        });
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        file.write_all(document.to_string().as_bytes())?;
        Ok(())
    }

    /// Loads keys written by [`save`](Self::save).
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading issuer keys from {}", path.display()))?;
        let document: Value = serde_json::from_str(&text)?;
        let field = |name: &str| -> anyhow::Result<Vec<u8>> {
            let b64 = document[name]
                .as_str()
                .with_context(|| format!("{} lacks {name}", path.display()))?;
            Ok(STANDARD.decode(b64)?)
        };
        let Some(issuer) = document["issuer"].as_str() else {
            bail!("{} lacks issuer", path.display());
        };
        Ok(Self {
            keys: Arc::new(Keys {
                issuer: issuer.to_owned(),
                rsa: RwLock::new(vec![(
                    KeyKind::Rsa.kid().to_owned(),
                    Arc::new(
                        RsaKeyPair::from_pkcs8(&field("rsa")?)
                            .map_err(|e| anyhow::anyhow!("RSA key: {e}"))?,
                    ),
                )]),
                ec: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &field("ec")?)
                    .map_err(|e| anyhow::anyhow!("EC key: {e}"))?,
                ec384: EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &field("ec384")?)
                    .map_err(|e| anyhow::anyhow!("P-384 key: {e}"))?,
                ed: Ed25519KeyPair::from_pkcs8(&field("ed25519")?)
                    .map_err(|e| anyhow::anyhow!("Ed25519 key: {e}"))?,
            }),
        })
    }
}

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
