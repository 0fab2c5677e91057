//! A local identity provider: keys, a JWKS endpoint on loopback, and tokens
//! shaped like Clerk's session tokens.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use aws_lc_rs::encoding::AsDer as _;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RSA_PKCS1_SHA256,
    RsaKeyPair,
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
    /// P-256, ES256, kid `ec-1`.
    Ec,
    /// Ed25519, EdDSA, kid `ed-1`.
    Ed25519,
}

impl KeyKind {
    /// The JWS `alg` this key signs with.
    pub fn alg(self) -> &'static str {
        match self {
            Self::Rsa => "RS256",
            Self::Ec => "ES256",
            Self::Ed25519 => "EdDSA",
        }
    }

    /// The key's `kid` in the JWKS.
    pub fn kid(self) -> &'static str {
        match self {
            Self::Rsa => "rsa-1",
            Self::Ec => "ec-1",
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
    rsa: RsaKeyPair,
    ec: EcdsaKeyPair,
    ed: Ed25519KeyPair,
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
        let ed = Ed25519KeyPair::generate().context("generating an Ed25519 key")?;
        Ok(Self {
            keys: Arc::new(Keys {
                issuer: issuer.to_owned(),
                rsa,
                ec,
                ed,
            }),
        })
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
        let header = json!({"alg": spec.key.alg(), "kid": spec.key.kid(), "typ": "JWT"});
        self.sign_raw(&header, &Value::Object(claims), spec.key)
    }

    /// Signs any header and payload with one of the keys, for tests that
    /// forge tokens (wrong `alg`, missing claims, ...).
    pub fn sign_raw(&self, header: &Value, payload: &Value, key: KeyKind) -> String {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let signature = self.sign_bytes(signing_input.as_bytes(), key);
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    fn sign_bytes(&self, message: &[u8], key: KeyKind) -> Vec<u8> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        match key {
            KeyKind::Rsa => {
                let mut signature = vec![0; self.keys.rsa.public_modulus_len()];
                self.keys
                    .rsa
                    .sign(&RSA_PKCS1_SHA256, &rng, message, &mut signature)
                    .expect("RSA signing with a generated key succeeds");
                signature
            }
            KeyKind::Ec => self
                .keys
                .ec
                .sign(&rng, message)
                .expect("ECDSA signing with a generated key succeeds")
                .as_ref()
                .to_vec(),
            KeyKind::Ed25519 => self.keys.ed.sign(message).as_ref().to_vec(),
        }
    }

    /// The public keys as a JWKS document.
    pub fn jwks(&self) -> Value {
        let rsa = self.keys.rsa.public_key();
        let ec_point = self.keys.ec.public_key().as_ref();
        // An uncompressed P-256 point: 0x04 || x (32 bytes) || y (32 bytes).
        let (x, y) = ec_point[1..].split_at(32);
        json!({"keys": [
            {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": KeyKind::Rsa.kid(),
             "n": URL_SAFE_NO_PAD.encode(rsa.modulus().big_endian_without_leading_zero()),
             "e": URL_SAFE_NO_PAD.encode(rsa.exponent().big_endian_without_leading_zero())},
            {"kty": "EC", "use": "sig", "alg": "ES256", "crv": "P-256", "kid": KeyKind::Ec.kid(),
             "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)},
            {"kty": "OKP", "use": "sig", "alg": "EdDSA", "crv": "Ed25519", "kid": KeyKind::Ed25519.kid(),
             "x": URL_SAFE_NO_PAD.encode(self.keys.ed.public_key().as_ref())},
        ]})
    }

    /// The RSA public key as DER (RFC 8017 `RSAPublicKey`), for key-confusion
    /// attacks that HMAC-sign with a public key.
    pub fn rsa_public_der(&self) -> Vec<u8> {
        self.keys.rsa.public_key().as_ref().to_vec()
    }

    /// Saves the private keys (for `authgres token` beside a running demo).
    /// The file is created with mode 0600.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let rsa = self.keys.rsa.as_der().context("exporting the RSA key")?;
        let ec = self.keys.ec.to_pkcs8v1().context("exporting the EC key")?;
        let ed = self
            .keys
            .ed
            .to_pkcs8()
            .context("exporting the Ed25519 key")?;
        let document = json!({
            "issuer": self.keys.issuer,
            "rsa": STANDARD.encode(rsa.as_ref()),
            "ec": STANDARD.encode(ec.as_ref()),
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
                rsa: RsaKeyPair::from_pkcs8(&field("rsa")?)
                    .map_err(|e| anyhow::anyhow!("RSA key: {e}"))?,
                ec: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &field("ec")?)
                    .map_err(|e| anyhow::anyhow!("EC key: {e}"))?,
                ed: Ed25519KeyPair::from_pkcs8(&field("ed25519")?)
                    .map_err(|e| anyhow::anyhow!("Ed25519 key: {e}"))?,
            }),
        })
    }
}

/// A [`Signer`] whose JWKS is served over HTTP on loopback. The server stops
/// on drop.
pub struct Issuer {
    signer: Signer,
    jwks_url: String,
    /// JWKS requests served so far, for single-flight and refetch tests.
    fetches: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl Issuer {
    /// Generates keys and serves `/.well-known/jwks.json` on 127.0.0.1.
    /// The issuer (`iss`) is the server's base URL, like Clerk's frontend API.
    pub async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let signer = Signer::generate(&base)?;
        let body = Arc::new(signer.jwks().to_string());
        let fetches = Arc::new(AtomicUsize::new(0));
        let server = tokio::spawn(serve_jwks(listener, body, Arc::clone(&fetches)));
        Ok(Self {
            jwks_url: format!("{base}/.well-known/jwks.json"),
            signer,
            fetches,
            server,
        })
    }

    /// The token signer.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// The `iss` of this issuer's tokens.
    pub fn issuer(&self) -> &str {
        self.signer.issuer()
    }

    /// Where the JWKS is served.
    pub fn jwks_url(&self) -> &str {
        &self.jwks_url
    }

    /// How many times the JWKS has been served.
    pub fn jwks_fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    /// A one-hour RS256 token for `sub`.
    pub fn token(&self, sub: &str) -> String {
        self.signer.mint(&TokenSpec::new(sub))
    }

    /// A token as `spec` says.
    pub fn mint(&self, spec: &TokenSpec) -> String {
        self.signer.mint(spec)
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// A minimal HTTP/1.1 responder: every GET of the JWKS path gets the JWKS,
/// anything else 404. Enough for a JWKS client; not a general server.
async fn serve_jwks(
    listener: tokio::net::TcpListener,
    body: Arc<String>,
    fetches: Arc<AtomicUsize>,
) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let body = Arc::clone(&body);
        let fetches = Arc::clone(&fetches);
        tokio::spawn(async move {
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => request.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
            }
            let line = String::from_utf8_lossy(&request);
            let found = line.starts_with("GET /.well-known/jwks.json ");
            if found {
                fetches.fetch_add(1, Ordering::SeqCst);
            }
            let response = if found {
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
                     cache-control: max-age=300\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".into()
            };
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}
