//! Token → [`Identity`]: provider selection, signature, claims, role.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use crate::error::VerifyError;
use crate::jwks::{JwksCache, KeySet};
use crate::provider::{ConfigError, ProviderConfig};

/// Largest token accepted, in bytes; matches the wire's password limit.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// A verified token: who the client is and what it may log in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Name of the provider that issued the token.
    pub provider: String,
    /// The token's `sub`.
    pub subject: String,
    /// The verified claims as compact, ASCII-only JSON (non-ASCII characters
    /// as `\u` escapes), exactly what SQL sees: ASCII survives any
    /// client_encoding conversion byte for byte, so the signature over it
    /// verifies in every database encoding.
    pub claims_json: String,
    /// The token's `exp` (unix seconds).
    pub expires_at: u64,
}

/// Verifies tokens against the configured providers.
pub struct Verifier {
    providers: Vec<ProviderConfig>,
    jwks: JwksCache,
}

impl Verifier {
    /// A verifier for these providers; fails on a provider that cannot work.
    pub fn new(providers: Vec<ProviderConfig>) -> Result<Self, ConfigError> {
        for provider in &providers {
            provider.validate()?;
        }
        for (i, a) in providers.iter().enumerate() {
            if providers[..i]
                .iter()
                .any(|b| b.issuer == a.issuer || b.name == a.name)
            {
                return Err(ConfigError {
                    provider: a.name.clone(),
                    reason: "two providers share a name or an issuer".into(),
                });
            }
        }
        let ttl = providers
            .iter()
            .map(|p| p.jwks_ttl)
            .min()
            .unwrap_or(crate::provider::DEFAULT_JWKS_TTL);
        let jwks = JwksCache::new(ttl).map_err(|e| ConfigError {
            provider: String::new(),
            reason: format!("cannot build the HTTP client for JWKS fetches: {e}"),
        })?;
        Ok(Self { providers, jwks })
    }

    /// The configured providers.
    pub fn providers(&self) -> &[ProviderConfig] {
        &self.providers
    }

    /// Verifies `token` for a login as `role` at time `now`.
    pub async fn verify(
        &self,
        token: &str,
        role: &str,
        now: SystemTime,
    ) -> Result<Identity, VerifyError> {
        let now = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        if token.len() > MAX_TOKEN_LEN {
            return Err(VerifyError::Malformed("token too long"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| VerifyError::Malformed("header is not a supported JWS header"))?;
        let issuer = unverified_issuer(token)?;
        let provider = self
            .providers
            .iter()
            .find(|p| p.issuer == issuer)
            .ok_or(VerifyError::UnknownIssuer)?;
        if !provider.algorithms.contains(&header.alg) {
            return Err(VerifyError::AlgorithmNotAllowed {
                alg: format!("{:?}", header.alg),
            });
        }
        let kid = header.kid.as_deref();
        let mut keys = self.keys(provider).await?;
        if keys.candidates(kid, header.alg).next().is_none() {
            let unknown_kid = kid.is_some_and(|kid| !keys.has_kid(kid));
            if unknown_kid && self.jwks.allow_refetch(provider, now).await {
                keys = self.keys(provider).await?;
            }
            if keys.candidates(kid, header.alg).next().is_none() {
                return Err(match kid {
                    Some(kid) if keys.has_kid(kid) => VerifyError::AlgorithmNotAllowed {
                        alg: format!("{:?}", header.alg),
                    },
                    _ => VerifyError::UnknownKey {
                        kid: kid.map(str::to_owned),
                    },
                });
            }
        }
        let claims = verify_signature(token, header.alg, &keys, kid)?;
        check_claims(&claims, provider, now)?;
        if !provider.roles.iter().any(|r| r == role) {
            return Err(VerifyError::RoleNotAllowed {
                provider: provider.name.clone(),
                role: role.to_owned(),
            });
        }
        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            _ => return Err(VerifyError::MissingClaim("sub")),
        };
        let expires_at = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
        let claims_json = ascii_json(&Value::Object(claims))?;
        Ok(Identity {
            provider: provider.name.clone(),
            subject,
            claims_json,
            expires_at,
        })
    }

    async fn keys(&self, provider: &ProviderConfig) -> Result<Arc<KeySet>, VerifyError> {
        self.jwks
            .get(provider)
            .await
            .map_err(|_| VerifyError::KeysUnavailable {
                provider: provider.name.clone(),
            })
    }
}

/// Reads `iss` from the unverified payload, only to pick the provider whose
/// keys will then verify the signature.
fn unverified_issuer(token: &str) -> Result<String, VerifyError> {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::Malformed("not three dot-separated parts"));
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| VerifyError::Malformed("payload is not base64url"))?;
    #[derive(serde::Deserialize)]
    struct Issuer {
        iss: Option<String>,
    }
    let parsed: Issuer = serde_json::from_slice(&bytes)
        .map_err(|_| VerifyError::Malformed("payload is not a JSON object"))?;
    parsed.iss.ok_or(VerifyError::MissingClaim("iss"))
}

fn verify_signature(
    token: &str,
    alg: Algorithm,
    keys: &KeySet,
    kid: Option<&str>,
) -> Result<Map<String, Value>, VerifyError> {
    let mut validation = Validation::new(alg);
    // Time and audience are checked by `check_claims` against the injected
    // clock; here only the signature and the JSON shape.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let mut last = VerifyError::BadSignature;
    for key in keys.candidates(kid, alg) {
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, &validation) {
            Ok(data) => return Ok(data.claims),
            Err(error) => {
                last = match error.kind() {
                    jsonwebtoken::errors::ErrorKind::InvalidSignature => VerifyError::BadSignature,
                    jsonwebtoken::errors::ErrorKind::InvalidAlgorithm => {
                        VerifyError::AlgorithmNotAllowed {
                            alg: format!("{alg:?}"),
                        }
                    }
                    _ => VerifyError::Malformed("token does not decode"),
                }
            }
        }
    }
    Err(last)
}

fn check_claims(
    claims: &Map<String, Value>,
    provider: &ProviderConfig,
    now: u64,
) -> Result<(), VerifyError> {
    let leeway = provider.leeway.as_secs();
    if claims.get("iss").and_then(Value::as_str) != Some(provider.issuer.as_str()) {
        return Err(VerifyError::UnknownIssuer);
    }
    let exp = numeric_date(claims, "exp")?.ok_or(VerifyError::MissingClaim("exp"))?;
    if now >= exp.saturating_add(leeway) {
        return Err(VerifyError::Expired);
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && nbf > now.saturating_add(leeway)
    {
        return Err(VerifyError::NotYetValid);
    }
    if !provider.audience.is_empty() {
        let accepted = |aud: &str| provider.audience.iter().any(|a| a == aud);
        let ok = match claims.get("aud") {
            Some(Value::String(aud)) => accepted(aud),
            Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).any(accepted),
            _ => false,
        };
        if !ok {
            return Err(VerifyError::WrongAudience);
        }
    }
    Ok(())
}

/// A NumericDate claim (RFC 7519 §2): seconds, possibly fractional.
fn numeric_date(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<u64>, VerifyError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or(VerifyError::MissingClaim(name)),
        Some(_) => Err(VerifyError::MissingClaim(name)),
    }
}

/// Compact JSON with every non-ASCII character written as a `\u` escape.
/// Refuses NUL, which Postgres text (and so jsonb) cannot hold.
fn ascii_json(value: &Value) -> Result<String, VerifyError> {
    let compact = value.to_string();
    if compact.contains("\\u0000") {
        return Err(VerifyError::Malformed("claims contain a NUL character"));
    }
    let mut out = String::with_capacity(compact.len());
    for c in compact.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_become_ascii_json_that_parses_back_the_same() {
        let value = serde_json::json!({"sub": "usér_😀", "q": "it's \\ \"x\""});
        let ascii = ascii_json(&value).expect("no NUL");
        assert!(ascii.is_ascii(), "{ascii}");
        assert_eq!(serde_json::from_str::<Value>(&ascii).expect("json"), value);
    }

    #[test]
    fn nul_in_claims_is_refused() {
        let value = serde_json::json!({"sub": "a\u{0}b"});
        assert!(ascii_json(&value).is_err());
    }
}
