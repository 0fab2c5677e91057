//! One identity provider's settings, validated before use.

use std::collections::HashMap;
use std::time::Duration;

use jsonwebtoken::Algorithm;

use crate::claim_path::ClaimPath;
use crate::user_id::UserIds;

/// Default clock leeway applied to `exp` and `nbf`.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Where a provider's verification keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A JWKS at this URL.
    Jwks(String),
    /// OIDC discovery: `{issuer}/.well-known/openid-configuration` names the JWKS.
    Discovery,
    /// No public keys: only the shared secret (HS256/384/512).
    SharedSecretOnly,
}

/// How a provider's JWKS is fetched and kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchSettings {
    /// Shortest time fetched keys are used before a refresh (floor for
    /// Cache-Control max-age, and the TTL when the provider sends none).
    pub min_ttl: Duration,
    /// Longest time fetched keys are used before a refresh (cap for max-age).
    pub max_ttl: Duration,
    /// A token with an unknown `kid` triggers at most one refetch per
    /// provider in this interval.
    pub unknown_kid_interval: Duration,
    /// While the provider is unreachable, the last good keys keep working
    /// this long after they were fetched.
    pub max_staleness: Duration,
    /// Time allowed to connect.
    pub connect_timeout: Duration,
    /// Time allowed for one whole request.
    pub timeout: Duration,
    /// Retries after a failed attempt (connection errors and 5xx only).
    pub retries: u32,
    /// Largest response body accepted.
    pub max_body: usize,
    /// PEM CA certificates to trust instead of the platform's roots.
    pub ca_pem: Option<Vec<u8>>,
    /// Allow `http://` on hosts other than loopback (labs only).
    pub allow_insecure_http: bool,
}

impl Default for FetchSettings {
    fn default() -> Self {
        Self {
            min_ttl: Duration::from_secs(300),
            max_ttl: Duration::from_secs(3600),
            unknown_kid_interval: Duration::from_secs(30),
            max_staleness: Duration::from_secs(24 * 3600),
            connect_timeout: Duration::from_secs(2),
            timeout: Duration::from_secs(5),
            retries: 2,
            max_body: 64 * 1024,
            ca_pem: None,
            allow_insecure_http: false,
        }
    }
}

/// The roles a token's claim grants, and how the startup `user` chooses
/// among them:
///
/// - a `user` equal to [`RoleClaim::token_chooses`] (`authenticated`: one
///   connection string for every user of an app) is the first role the
///   claim grants, else the default, else refused;
/// - any other `user` the claim grants is that role, and so is
///   [`RoleClaim::default`] (the floor every token of the provider may use);
/// - any other `user` is refused: the claim and the user disagree.
///
/// Only roles in the provider's `roles` are ever granted, so a claim can
/// never name a role the operator did not list.
#[derive(Debug, Clone)]
pub struct RoleClaim {
    /// Where the claim is: a string or a list of strings.
    pub path: ClaimPath,
    /// Claim values mapped to role names (Clerk's `org:admin` → `editor`).
    /// When not empty, only mapped values grant a role.
    pub values: HashMap<String, String>,
    /// The role of a token whose claim grants none of the provider's
    /// roles; `None`: such a token is refused.
    pub default: Option<String>,
    /// The startup user that lets the token choose its role.
    pub token_chooses: String,
}

impl RoleClaim {
    /// A claim at `path` whose values are role names, with no default,
    /// chosen by the startup user `token_chooses`.
    pub fn new(path: ClaimPath, token_chooses: &str) -> Self {
        Self {
            path,
            values: HashMap::new(),
            default: None,
            token_chooses: token_chooses.to_owned(),
        }
    }
}

/// An identity provider whose tokens may log in.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    /// Name used in logs and errors.
    pub name: String,
    /// Exact `iss` claim of this provider's tokens; selects the provider.
    pub issuer: String,
    /// Where the verification keys come from.
    pub keys: KeySource,
    /// Accepted `aud` values; empty means `aud` is not checked.
    pub audience: Vec<String>,
    /// Database roles this provider's tokens may log in as.
    pub roles: Vec<String>,
    /// Signature algorithms accepted; the key still decides which one fits.
    pub algorithms: Vec<Algorithm>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`.
    pub leeway: Duration,
    /// Claims every token must carry (beyond `iss`, `exp` and `sub`).
    pub required_claims: Vec<String>,
    /// Refuse tokens issued (`iat`) longer ago than this.
    pub max_token_age: Option<Duration>,
    /// Take the database role from a claim: which roles a token grants,
    /// and the startup user's part in choosing among them.
    pub role_claim: Option<RoleClaim>,
    /// The claim naming the client's tenant (Clerk's `$.org_id`), for
    /// routing to a tenant's database and for limits per tenant.
    pub tenant_claim: Option<ClaimPath>,
    /// Shared secret for HS256/384/512 (Supabase's legacy JWT secret).
    pub shared_secret: Option<Vec<u8>>,
    /// JWKS fetching and caching.
    pub fetch: FetchSettings,
    /// How its users are named in `auth.user_id()` beside other providers'.
    pub user_ids: UserIds,
}

impl ProviderConfig {
    /// A provider with a JWKS URL and defaults for everything else.
    pub fn new(name: &str, issuer: &str, jwks_url: &str, roles: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            issuer: issuer.to_owned(),
            keys: KeySource::Jwks(jwks_url.to_owned()),
            audience: Vec::new(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            algorithms: ASYMMETRIC.to_vec(),
            leeway: DEFAULT_LEEWAY,
            required_claims: Vec::new(),
            max_token_age: None,
            role_claim: None,
            tenant_claim: None,
            shared_secret: None,
            fetch: FetchSettings::default(),
            user_ids: UserIds::default(),
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
        if let Some(rule) = &self.role_claim {
            let listed = |role: &String| self.roles.contains(role);
            if let Some(default) = rule.default.as_ref().filter(|d| !listed(d)) {
                return Err(err(format!(
                    "role_claim_default {default:?} is not among the provider's roles"
                )));
            }
            if let Some(role) = rule.values.values().find(|r| !listed(r)) {
                return Err(err(format!(
                    "role_claim_values maps to {role:?}, which is not among the provider's roles"
                )));
            }
        }
        if self.algorithms.is_empty() {
            return Err(err("algorithms is empty".into()));
        }
        let symmetric = self.algorithms.iter().any(|a| SYMMETRIC.contains(a));
        if symmetric && self.shared_secret.is_none() {
            return Err(err(
                "HS256/384/512 need a shared secret; public keys never verify HMAC tokens".into(),
            ));
        }
        if self.shared_secret.as_ref().is_some_and(|s| s.len() < 32) {
            return Err(err("the shared secret must be at least 32 bytes".into()));
        }
        if self.keys == KeySource::SharedSecretOnly && self.shared_secret.is_none() {
            return Err(err("no jwks_url, no discovery and no shared secret".into()));
        }
        let f = &self.fetch;
        if f.min_ttl > f.max_ttl {
            return Err(err("jwks_min_ttl is longer than jwks_max_ttl".into()));
        }
        match &self.keys {
            KeySource::Jwks(url) => {
                check_url(url, f.allow_insecure_http).map_err(|refused| err(refused.to_string()))?
            }
            KeySource::Discovery => check_url(&self.issuer, f.allow_insecure_http)
                .map_err(|reason| err(format!("discovery from the issuer: {reason}")))?,
            KeySource::SharedSecretOnly => {}
        }
        Ok(())
    }
}

/// Why the fetcher may not use a URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlRefused {
    /// Plain http to a host that is not loopback, without
    /// `allow_insecure_http`.
    #[error("{0} uses http on a non-loopback host; use https")]
    InsecureHttp(String),
    /// Neither http nor https.
    #[error("{0} is not an http(s) URL")]
    NotHttp(String),
}

/// A URL the fetcher may use: https, or http on a loopback host.
pub(crate) fn check_url(url: &str, allow_insecure_http: bool) -> Result<(), UrlRefused> {
    if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split(['/', '?', '#']).next().unwrap_or("");
        if !is_loopback_authority(host) && !allow_insecure_http {
            return Err(UrlRefused::InsecureHttp(url.to_owned()));
        }
        Ok(())
    } else if url.starts_with("https://") {
        Ok(())
    } else {
        Err(UrlRefused::NotHttp(url.to_owned()))
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

/// HMAC algorithms: only with an explicitly configured shared secret.
pub(crate) const SYMMETRIC: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

fn is_loopback_authority(authority: &str) -> bool {
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
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
        assert!(ok("http://127.0.0.1@example.com/jwks").is_err());
        assert!(ok("ftp://example.com/jwks").is_err());
    }

    #[test]
    fn hmac_needs_a_long_enough_secret() {
        let mut p = ProviderConfig::new("p", "iss", "https://x/jwks", &["authenticated"]);
        p.algorithms = vec![Algorithm::HS256];
        assert!(p.validate().is_err());
        p.shared_secret = Some(vec![1; 16]);
        assert!(p.validate().is_err());
        p.shared_secret = Some(vec![1; 32]);
        assert!(p.validate().is_ok());
    }
}
