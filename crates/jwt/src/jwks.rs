//! Fetching and caching a provider's JSON Web Key Set ([RFC 7517]).
//!
//! [`KeySet::parse`] keeps only keys usable for signatures and skips keys it
//! cannot parse instead of failing the whole set (providers publish
//! encryption keys and exotic curves beside their signing keys).
//! [`JwksCache`] fetches each provider's set once (single-flight: a burst of
//! connections causes one fetch) and refetches at most once per
//! [`UNKNOWN_KID_REFETCH_INTERVAL`] when a token names an unknown key.
//!
//! [RFC 7517]: https://www.rfc-editor.org/rfc/rfc7517

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::provider::ProviderConfig;

/// Largest JWKS response body accepted.
pub const MAX_JWKS_BODY: usize = 64 * 1024;
/// Time allowed to connect to a JWKS endpoint.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Time allowed for a whole JWKS fetch.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A token with an unknown `kid` triggers at most one refetch per provider in
/// this interval, so a flood of forged kids cannot become a fetch storm.
pub const UNKNOWN_KID_REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// One verification key and the algorithms it may verify.
pub struct VerifyingKey {
    /// The JWK `kid`, when the provider sets one.
    pub kid: Option<String>,
    /// Algorithms this key fits, decided by kty/crv/alg, never by a token.
    pub algorithms: Vec<Algorithm>,
    /// The key itself.
    pub key: DecodingKey,
}

/// The usable signing keys of one provider.
#[derive(Default)]
pub struct KeySet {
    /// Keys in the order the provider published them.
    pub keys: Vec<VerifyingKey>,
}

impl KeySet {
    /// Parses a JWKS document, skipping keys that are not usable signature
    /// keys. Fails only when the document itself is not a JWKS.
    pub fn parse(body: &[u8]) -> Result<Self, FetchError> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document =
            serde_json::from_slice(body).map_err(|e| FetchError::NotJwks(e.to_string()))?;
        let mut keys = Vec::with_capacity(document.keys.len());
        for value in document.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                tracing::debug!("skipping a JWK that does not parse");
                continue;
            };
            match verifying_key(&jwk) {
                Some(key) => keys.push(key),
                None => tracing::debug!(kid = ?jwk.common.key_id, "skipping a non-signature JWK"),
            }
        }
        Ok(Self { keys })
    }

    /// Keys that may verify a token with this `kid` and `alg`.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a VerifyingKey> + 'a {
        self.keys.iter().filter(move |key| {
            key.algorithms.contains(&alg)
                && match kid {
                    Some(kid) => key.kid.as_deref() == Some(kid),
                    None => true,
                }
        })
    }

    /// Whether any key has this `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|key| key.kid.as_deref() == Some(kid))
    }
}

fn verifying_key(jwk: &Jwk) -> Option<VerifyingKey> {
    if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let by_key: Vec<Algorithm> = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            vec![Algorithm::EdDSA]
        }
        // Symmetric keys never come from a public JWKS; anything else is
        // a key type we cannot verify with.
        _ => return None,
    };
    let algorithms = match jwk.common.key_algorithm {
        None => by_key,
        Some(declared) => {
            let declared = algorithm_of(declared)?;
            if !by_key.contains(&declared) {
                return None;
            }
            vec![declared]
        }
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyingKey {
        kid: jwk.common.key_id.clone(),
        algorithms,
        key,
    })
}

fn algorithm_of(declared: KeyAlgorithm) -> Option<Algorithm> {
    Some(match declared {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

/// Why a JWKS could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Connection, TLS or timeout failure.
    #[error("request failed: {0}")]
    Http(String),
    /// The endpoint answered with a non-success status (redirects included).
    #[error("endpoint answered HTTP {0}")]
    Status(u16),
    /// The body exceeded [`MAX_JWKS_BODY`].
    #[error("response body exceeds {MAX_JWKS_BODY} bytes")]
    TooLarge,
    /// The body is not a JWKS document.
    #[error("response is not a JWKS document: {0}")]
    NotJwks(String),
}

/// Per-provider JWKS cache with single-flight fetches.
pub struct JwksCache {
    http: reqwest::Client,
    sets: moka::future::Cache<String, Arc<KeySet>>,
    /// When each provider last refetched for an unknown kid (unix seconds).
    last_forced: Mutex<HashMap<String, u64>>,
}

impl JwksCache {
    /// A cache whose entries live for `ttl`.
    pub fn new(ttl: Duration) -> Result<Self, FetchError> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| FetchError::Http(e.to_string()))?;
        Ok(Self {
            http,
            sets: moka::future::Cache::builder()
                .time_to_live(ttl)
                .max_capacity(1024)
                .build(),
            last_forced: Mutex::new(HashMap::new()),
        })
    }

    /// The provider's key set, fetched if not cached. Concurrent callers
    /// share one fetch; failures are not cached.
    pub async fn get(&self, provider: &ProviderConfig) -> Result<Arc<KeySet>, Arc<FetchError>> {
        self.sets
            .try_get_with_by_ref(&provider.name, self.fetch(provider))
            .await
    }

    /// Drops the cached set so the next [`get`](Self::get) fetches again,
    /// unless this provider already refetched within
    /// [`UNKNOWN_KID_REFETCH_INTERVAL`] of `now` (unix seconds). Returns
    /// whether a refetch is allowed.
    pub async fn allow_refetch(&self, provider: &ProviderConfig, now: u64) -> bool {
        {
            let mut last = self
                .last_forced
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let previous = last.get(&provider.name).copied();
            if previous.is_some_and(|t| now < t + UNKNOWN_KID_REFETCH_INTERVAL.as_secs()) {
                return false;
            }
            last.insert(provider.name.clone(), now);
        }
        self.sets.invalidate(&provider.name).await;
        true
    }

    async fn fetch(&self, provider: &ProviderConfig) -> Result<Arc<KeySet>, FetchError> {
        let result = self.fetch_once(&provider.jwks_url).await;
        match &result {
            Ok(set) => tracing::info!(
                provider = %provider.name,
                keys = set.keys.len(),
                "fetched JWKS"
            ),
            Err(error) => tracing::warn!(
                provider = %provider.name,
                url = %provider.jwks_url,
                %error,
                "could not fetch JWKS"
            ),
        }
        result.map(Arc::new)
    }

    async fn fetch_once(&self, url: &str) -> Result<KeySet, FetchError> {
        let mut response = self
            .http
            .get(url)
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?;
        if !response.status().is_success() {
            return Err(FetchError::Status(response.status().as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|len| len > MAX_JWKS_BODY as u64)
        {
            return Err(FetchError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| FetchError::Http(e.to_string()))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BODY {
                return Err(FetchError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        KeySet::parse(&body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_encryption_and_unparsable_keys() {
        let body = br#"{"keys":[
            {"kty":"RSA","use":"enc","kid":"enc","n":"sXch","e":"AQAB","alg":"RSA-OAEP"},
            {"kty":"EC","crv":"P-256","kid":"broken","x":"!!"},
            {"kty":"EC","crv":"P-256","kid":"p256",
             "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}
        ]}"#;
        let set = KeySet::parse(body).expect("a JWKS");
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.keys[0].kid.as_deref(), Some("p256"));
        assert_eq!(set.keys[0].algorithms, [Algorithm::ES256]);
        assert_eq!(set.candidates(Some("p256"), Algorithm::ES256).count(), 1);
        assert_eq!(set.candidates(Some("p256"), Algorithm::RS256).count(), 0);
        assert_eq!(set.candidates(Some("enc"), Algorithm::RS256).count(), 0);
    }

    #[test]
    fn not_a_jwks_fails() {
        assert!(matches!(KeySet::parse(b"[]"), Err(FetchError::NotJwks(_))));
        assert!(matches!(
            KeySet::parse(b"<html>"),
            Err(FetchError::NotJwks(_))
        ));
    }
}
