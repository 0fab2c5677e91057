//! The local identity provider's keys (RSA, EC P-256 and P-384, Ed25519)
//! and the tokens it signs, shaped like Clerk's session tokens.

use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

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
        #[allow(
            clippy::expect_used,
            reason = "the key list starts with one and never shrinks to none"
        )]
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
                #[allow(
                    clippy::expect_used,
                    reason = "signing with a key we generated cannot fail"
                )]
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
                #[allow(
                    clippy::expect_used,
                    reason = "signing with a key we generated cannot fail"
                )]
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
