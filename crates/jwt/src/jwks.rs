//! A provider's JSON Web Key Set ([RFC 7517]) as verification keys.
//!
//! [`KeySet::parse`] keeps only keys usable for signatures and skips keys it
//! cannot parse instead of failing the whole set (providers publish
//! encryption keys and exotic curves beside their signing keys).
//!
//! [RFC 7517]: https://www.rfc-editor.org/rfc/rfc7517

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::fetch::FetchError;

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
    /// Keys in the document that were not usable for signatures (encryption
    /// keys, unsupported curves, malformed entries).
    pub skipped: usize,
}

impl KeySet {
    /// Parses a JWKS document, skipping keys that are not usable signature
    /// keys. Fails only when the document itself is not a JWKS.
    pub fn parse(body: &[u8]) -> Result<Self, FetchError> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        let document: Document = serde_json::from_slice(body).map_err(|e| FetchError::Invalid {
            what: "JWKS document",
            detail: e.to_string(),
        })?;
        let mut keys = Vec::with_capacity(document.keys.len());
        let mut skipped = 0;
        for value in document.keys {
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                skipped += 1;
                continue;
            };
            match verifying_key(&jwk) {
                Some(key) => keys.push(key),
                None => skipped += 1,
            }
        }
        Ok(Self { keys, skipped })
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
        assert_eq!(set.skipped, 2);
        assert_eq!(set.keys[0].kid.as_deref(), Some("p256"));
        assert_eq!(set.keys[0].algorithms, [Algorithm::ES256]);
        assert_eq!(set.candidates(Some("p256"), Algorithm::ES256).count(), 1);
        assert_eq!(set.candidates(Some("p256"), Algorithm::RS256).count(), 0);
        assert_eq!(set.candidates(Some("enc"), Algorithm::RS256).count(), 0);
    }

    #[test]
    fn not_a_jwks_fails() {
        assert!(matches!(
            KeySet::parse(b"[]"),
            Err(FetchError::Invalid { .. })
        ));
        assert!(matches!(
            KeySet::parse(b"<html>"),
            Err(FetchError::Invalid { .. })
        ));
    }
}
