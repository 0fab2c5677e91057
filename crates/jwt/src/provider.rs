//! One identity provider's settings, validated before use.

use std::time::Duration;

use jsonwebtoken::Algorithm;

/// Default clock leeway applied to `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// Default lifetime of a fetched JWKS before it is fetched again.
pub const DEFAULT_JWKS_TTL: Duration = Duration::from_secs(300);

/// An identity provider whose tokens may log in.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Name used in logs and errors.
    pub name: String,
    /// Exact `iss` claim of this provider's tokens; selects the provider.
    pub issuer: String,
    /// Where the provider publishes its JWKS.
    pub jwks_url: String,
    /// Accepted `aud` values; empty means `aud` is not checked.
    pub audience: Vec<String>,
    /// Database roles this provider's tokens may log in as.
    pub roles: Vec<String>,
    /// Signature algorithms accepted; the key still decides which one fits.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: Duration,
    /// How long a fetched JWKS is used before it is fetched again.
    pub jwks_ttl: Duration,
    /// Allow `http://` JWKS URLs on hosts other than loopback (tests, labs).
    pub allow_insecure_http: bool,
}

impl ProviderConfig {
    /// A provider with default leeway, TTL and every asymmetric algorithm.
    pub fn new(name: &str, issuer: &str, jwks_url: &str, roles: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            issuer: issuer.to_owned(),
            jwks_url: jwks_url.to_owned(),
            audience: Vec::new(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            algorithms: ASYMMETRIC.to_vec(),
            leeway: DEFAULT_LEEWAY,
            jwks_ttl: DEFAULT_JWKS_TTL,
            allow_insecure_http: false,
        }
    }

    /// Checks what can be checked without the network.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |reason: String| ConfigError {
            provider: self.name.clone(),
            reason,
        };
        if self.issuer.is_empty() {
            return Err(err("issuer is empty".into()));
        }
        if self.roles.is_empty() {
            return Err(err(
                "roles is empty: the provider could log in as nothing".into()
            ));
        }
        if self.algorithms.iter().any(|a| !ASYMMETRIC.contains(a)) {
            return Err(err(
                "only asymmetric algorithms (RS*, PS*, ES256, ES384, EdDSA) are supported".into(),
            ));
        }
        let url = self.jwks_url.as_str();
        if let Some(rest) = url.strip_prefix("http://") {
            let host = rest.split(['/', '?']).next().unwrap_or("");
            if !is_loopback_authority(host) && !self.allow_insecure_http {
                return Err(err(format!(
                    "jwks_url {url} uses http on a non-loopback host; use https"
                )));
            }
        } else if !url.starts_with("https://") {
            return Err(err(format!("jwks_url {url} is not an http(s) URL")));
        }
        Ok(())
    }
}

/// The algorithms a public JWKS can carry keys for.
pub(crate) const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

fn is_loopback_authority(authority: &str) -> bool {
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A provider setting that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("provider {provider:?}: {reason}")]
pub struct ConfigError {
    /// Provider name.
    pub provider: String,
    /// What is wrong and how to fix it.
    pub reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_only_on_loopback() {
        let ok = |url: &str| ProviderConfig::new("p", "iss", url, &["authenticated"]).validate();
        assert!(ok("https://example.com/jwks").is_ok());
        assert!(ok("http://127.0.0.1:8080/jwks").is_ok());
        assert!(ok("http://[::1]:8080/jwks").is_ok());
        assert!(ok("http://localhost/jwks").is_ok());
        assert!(ok("http://example.com/jwks").is_err());
        assert!(ok("http://127.0.0.1.example.com/jwks").is_err());
        assert!(ok("ftp://example.com/jwks").is_err());
    }
}
