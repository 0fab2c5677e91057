//! Token → [`Identity`]: provider selection, key and algorithm, signature,
//! claims, role.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use crate::error::VerifyError;
use crate::keystore::{Fetched, KeyStatus, KeyStore};
use crate::provider::{ConfigError, KeySource, ProviderConfig, RoleClaim, SYMMETRIC};
use crate::token_cache::{self, LastToken, TokenCache, Verified};
use crate::user_id::{Namespaces, UserIdConflict, check_user_ids};

/// Largest token accepted, in bytes; matches the wire's password limit.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// The next [`Verifier`]'s id.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A verified token: who the client is and what it may log in as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Name of the provider that issued the token.
    pub provider: Arc<str>,
    /// The token's `sub`, as the provider wrote it.
    pub subject: String,
    /// What `auth.user_id()` returns: the provider's `user_id_prefix`
    /// followed by `sub`, or `sub` alone when it has none. The claims the
    /// proxy signs carry it as their `sub`.
    pub user_id: String,
    /// The database role to log in as: the requested role, or the token's
    /// role claim when the provider has `role_claim`.
    pub role: String,
    /// The verified claims as compact, ASCII-only JSON (non-ASCII characters
    /// as `\u` escapes), `sub` replaced by [`user_id`](Self::user_id), exactly
    /// what SQL sees: ASCII survives any
    /// client_encoding conversion byte for byte, so the signature over it
    /// verifies in every database encoding.
    pub claims_json: Arc<str>,
    /// The token's `exp` (unix seconds).
    pub expires_at: u64,
    /// The provider's issuer (the token's `iss`), for audit.
    pub issuer: Arc<str>,
    /// The token's `jti`, when it has one, for audit.
    pub token_id: Option<String>,
    /// The tenant the token belongs to: the provider's `tenant_claim`
    /// (Clerk's `org_id`), when it has one and the token carries it.
    pub tenant: Option<String>,
}

/// Verifies tokens against the configured providers.
pub struct Verifier {
    providers: Vec<Arc<ProviderConfig>>,
    names: Vec<Arc<str>>,
    /// Their issuers, shared by every identity they verify.
    issuers: Vec<Arc<str>>,
    /// Each provider's user-id prefix and the prefixes it must keep out of.
    namespaces: Namespaces,
    keys: Arc<KeyStore>,
    verified: TokenCache,
    /// Kept across [`Verifier::reconfigured`], so counters only grow.
    stats: Arc<Stats>,
    /// Unique to this verifier: a [`LastToken`] it filled answers only
    /// to it, not to the one a reload puts in its place.
    id: u64,
}

/// Counters of the verified-token cache.
#[derive(Debug, Default)]
struct Stats {
    hits: AtomicU64,
    misses: AtomicU64,
}

/// What the verified-token cache saved: logins that skipped the signature
/// check, and logins that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCacheStats {
    /// Tokens found verified already.
    pub hits: u64,
    /// Tokens verified in full (the cache enabled and not holding them).
    pub misses: u64,
}

impl Verifier {
    /// A verifier for these providers; fails on a provider that cannot work.
    pub fn new(providers: Vec<ProviderConfig>) -> Result<Self, ConfigError> {
        Self::with_token_cache(providers, token_cache::DEFAULT_CAPACITY)
    }

    /// Like [`new`](Self::new), remembering at most `capacity` verified
    /// tokens (0 disables the cache: every login checks the signature).
    pub fn with_token_cache(
        providers: Vec<ProviderConfig>,
        capacity: u64,
    ) -> Result<Self, ConfigError> {
        Self::build(providers, capacity, None)
    }

    /// A verifier for a new configuration that keeps what this one learned
    /// where it still holds: the fetched keys of every provider whose
    /// issuer, key source and fetch settings are unchanged, and the
    /// counters. Verified tokens are not kept: the new providers decide.
    pub fn reconfigured(
        &self,
        providers: Vec<ProviderConfig>,
        capacity: u64,
    ) -> Result<Self, ConfigError> {
        Self::build(providers, capacity, Some(self))
    }

    fn build(
        providers: Vec<ProviderConfig>,
        capacity: u64,
        previous: Option<&Self>,
    ) -> Result<Self, ConfigError> {
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
        let user_ids: Vec<_> = providers.iter().map(|p| &p.user_ids).collect();
        check_user_ids(&user_ids).map_err(|conflict| user_id_conflict(&providers, &conflict))?;
        let namespaces = Namespaces::new(&user_ids);
        let providers: Vec<_> = providers.into_iter().map(Arc::new).collect();
        let keys = KeyStore::new(&providers, previous.map(|p| &*p.keys)).map_err(
            |(provider, error)| ConfigError {
                provider,
                reason: error.to_string(),
            },
        )?;
        Ok(Self {
            names: providers
                .iter()
                .map(|p| Arc::from(p.name.as_str()))
                .collect(),
            issuers: providers
                .iter()
                .map(|p| Arc::from(p.issuer.as_str()))
                .collect(),
            namespaces,
            providers,
            keys,
            verified: TokenCache::new(capacity),
            stats: previous.map_or_else(Arc::default, |p| Arc::clone(&p.stats)),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Where each provider's keys stand at `now`.
    pub fn key_status(&self, now: SystemTime) -> Vec<KeyStatus> {
        self.keys.status(unix(now))
    }

    /// Empties the verified-token cache for good, for a verifier a reload
    /// replaced: sessions of the old configuration may live for hours and
    /// must not keep up to [`token_cache::DEFAULT_CAPACITY`] tokens each
    /// resident. Logins still under way on it verify in full.
    pub fn retire(&self) {
        self.verified.retire();
    }

    /// The verified-token cache's hits and misses so far.
    pub fn token_cache_stats(&self) -> TokenCacheStats {
        TokenCacheStats {
            hits: self.stats.hits.load(Ordering::Relaxed),
            misses: self.stats.misses.load(Ordering::Relaxed),
        }
    }

    /// The configured providers.
    pub fn providers(&self) -> impl Iterator<Item = &ProviderConfig> {
        self.providers.iter().map(|p| p.as_ref())
    }

    /// Fetches every JWKS provider's keys now (at startup, so the first
    /// logins do not wait); failures are logged and retried on use.
    pub async fn prefetch(&self, now: SystemTime) {
        let now = unix(now);
        for (index, provider) in self.providers.iter().enumerate() {
            if provider.keys != KeySource::SharedSecretOnly {
                let _ = self.keys.keys(index, now).await;
            }
        }
    }

    /// How many verified tokens are remembered (for metrics and tests).
    pub fn verified_tokens(&self) -> u64 {
        self.verified.len()
    }

    /// Waits for background key refreshes to finish (tests, shutdown).
    pub async fn settle(&self) {
        self.keys.settle().await;
    }

    /// The name of the provider whose issuer the token names, unverified:
    /// for labelling a refusal, never for trusting anything.
    pub fn provider_of(&self, token: &str) -> Option<Arc<str>> {
        if token.len() > MAX_TOKEN_LEN {
            return None;
        }
        let issuer = unverified_issuer(token).ok()?;
        let index = self.providers.iter().position(|p| p.issuer == issuer)?;
        self.names.get(index).cloned()
    }

    /// Verifies `token` for a login as `role` at time `now`.
    pub async fn verify(
        &self,
        token: &str,
        role: &str,
        now: SystemTime,
    ) -> Result<Identity, VerifyError> {
        self.verify_remembering(token, role, now, None).await
    }

    /// Verifies `token` as [`Verifier::verify`] does, first against `last`
    /// when given: the token the same connection presented before (see
    /// [`LastToken`]), where `token` is left remembered once it verified.
    pub async fn verify_remembering(
        &self,
        token: &str,
        role: &str,
        now: SystemTime,
        mut last: Option<&mut LastToken>,
    ) -> Result<Identity, VerifyError> {
        let now = unix(now);
        if token.len() > MAX_TOKEN_LEN {
            return Err(VerifyError::Malformed("token too long"));
        }
        let cached = self.verified.enabled();
        if cached
            && let Some(last) = last.as_deref_mut()
            && let Some(hit) = last.get(self.id, token)
        {
            if self.still_trusted(hit).await {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                return self.identity_of(hit, role, now);
            }
            last.forget();
        }
        let cache_key = if cached {
            TokenCache::key(token)
        } else {
            [0; 32]
        };
        if let Some(hit) = self.verified.get(&cache_key) {
            if self.still_trusted(&hit).await {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                let identity = self.identity_of(&hit, role, now);
                if let Some(last) = last {
                    last.remember(self.id, token, hit);
                }
                return identity;
            }
            self.verified.remove(&cache_key);
        }
        if cached {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
        }
        let verified = Arc::new(self.verify_uncached(token, now).await?);
        let provider = &self.providers[verified.provider];
        let role = resolve_role(provider, &verified.claims, role);
        let mut identity = verified.identity.clone();
        if cached {
            self.verified.insert(cache_key, Arc::clone(&verified));
            if let Some(last) = last {
                last.remember(self.id, token, verified);
            }
        }
        identity.role = role?;
        Ok(identity)
    }

    /// The identity of a token verified before, for a login as `role` at
    /// `now`: its time-dependent claims and the role are checked again.
    fn identity_of(&self, hit: &Verified, role: &str, now: u64) -> Result<Identity, VerifyError> {
        let provider = &self.providers[hit.provider];
        check_claims(&hit.claims, provider, now)?;
        let mut identity = hit.identity.clone();
        identity.role = resolve_role(provider, &hit.claims, role)?;
        Ok(identity)
    }

    /// Whether a cached token's key is still published by its provider.
    async fn still_trusted(&self, hit: &Verified) -> bool {
        if hit.shared_secret {
            return true;
        }
        match (&hit.kid, self.keys.cached(hit.provider).await) {
            (Some(kid), Some(fetched)) => fetched.keys.has_kid(kid),
            (None, Some(_)) => true,
            (_, None) => false,
        }
    }

    async fn verify_uncached(&self, token: &str, now: u64) -> Result<Verified, VerifyError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| VerifyError::Malformed("header is not a supported JWS header"))?;
        let issuer = unverified_issuer(token)?;
        let index = self
            .providers
            .iter()
            .position(|p| p.issuer == issuer)
            .ok_or_else(|| VerifyError::UnknownIssuer {
                presented: crate::error::cut(&issuer),
                expected: self.providers.iter().map(|p| p.issuer.clone()).collect(),
            })?;
        let provider = &self.providers[index];
        let alg = header.alg;
        if !provider.algorithms.contains(&alg) {
            return Err(VerifyError::AlgorithmNotAllowed {
                alg: format!("{alg:?}"),
            });
        }
        let kid = header.kid;
        let claims = if SYMMETRIC.contains(&alg) {
            // validate() guarantees HS* is allowed only with a shared secret.
            let secret =
                provider
                    .shared_secret
                    .as_deref()
                    .ok_or(VerifyError::AlgorithmNotAllowed {
                        alg: format!("{alg:?}"),
                    })?;
            decode(
                token,
                alg,
                std::iter::once(&DecodingKey::from_secret(secret)),
            )?
        } else {
            let keys = self.keys_for(index, now, kid.as_deref(), alg).await?;
            decode(
                token,
                alg,
                keys.keys.candidates(kid.as_deref(), alg).map(|k| &k.key),
            )?
        };
        check_claims(&claims, provider, now)?;
        let subject = match claims.get("sub") {
            Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
            _ => return Err(VerifyError::MissingClaim("sub".into())),
        };
        let user_id = self.namespaces.user_id(index, &subject)?;
        // The one NumericDate parser: a fractional `exp` is a time, not 0
        // (which `enforce_token_expiry` read as long expired).
        let expires_at = numeric_date(&claims, "exp")?.unwrap_or(0);
        // Signed with the user id as `sub`: every reading of the identity
        // in SQL (`auth.user_id()`, `auth.uid()`, `auth.jwt() ->> 'sub'`)
        // carries the issuer's prefix. Without a prefix the claims are
        // the token's, byte for byte.
        let claims_json = if user_id == subject {
            crate::claims_json::ascii_json(&claims)?
        } else {
            let mut signed = claims.clone();
            signed.insert("sub".to_owned(), Value::String(user_id.clone()));
            crate::claims_json::ascii_json(&signed)?
        };
        let tenant = tenant(provider, &claims)?;
        let token_id = match claims.get("jti") {
            Some(Value::String(jti)) => Some(crate::error::cut(jti)),
            _ => None,
        };
        let identity = Identity {
            provider: Arc::clone(&self.names[index]),
            subject,
            user_id,
            role: String::new(),
            claims_json: Arc::from(claims_json),
            expires_at,
            issuer: Arc::clone(&self.issuers[index]),
            token_id,
            tenant,
        };
        Ok(Verified {
            provider: index,
            shared_secret: SYMMETRIC.contains(&alg),
            kid,
            claims,
            identity,
        })
    }

    /// The provider's keys holding a key for `kid` and `alg`, refetching
    /// once (rate-limited) when the kid is unknown.
    async fn keys_for(
        &self,
        index: usize,
        now: u64,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<Arc<Fetched>, VerifyError> {
        let unavailable = || VerifyError::KeysUnavailable {
            provider: self.providers[index].name.clone(),
        };
        let fetched = self
            .keys
            .keys(index, now)
            .await
            .map_err(|_| unavailable())?;
        if fetched.keys.candidates(kid, alg).next().is_some() {
            return Ok(fetched);
        }
        let known_kid = kid.is_none_or(|kid| fetched.keys.has_kid(kid));
        let fetched = if known_kid {
            fetched
        } else {
            match self
                .keys
                .refetch_for_unknown_kid(index, now, &fetched)
                .await
            {
                Some(refetched) => refetched,
                None => fetched,
            }
        };
        if fetched.keys.candidates(kid, alg).next().is_some() {
            return Ok(fetched);
        }
        Err(match kid {
            Some(kid) if fetched.keys.has_kid(kid) => VerifyError::AlgorithmNotAllowed {
                alg: format!("{alg:?}"),
            },
            _ => VerifyError::UnknownKey {
                kid: kid.map(str::to_owned),
            },
        })
    }
}

/// A [`UserIdConflict`] as a [`ConfigError`] naming the providers.
fn user_id_conflict(providers: &[ProviderConfig], conflict: &UserIdConflict) -> ConfigError {
    let name = |index: usize| providers.get(index).map_or("", |p| p.name.as_str());
    let (provider, reason) = match conflict {
        UserIdConflict::BadPrefix { provider, reason } => {
            (name(*provider), format!("user_id_prefix {reason}"))
        }
        UserIdConflict::SameNamespace { first, second } => (
            name(*second),
            format!(
                "gives the same user id as provider {:?} to the same sub; set distinct \
                 user_id_prefix values, or shared_user_ids on both if the same sub is the \
                 same person",
                name(*first)
            ),
        ),
        UserIdConflict::NestedPrefixes { first, second } => (
            name(*second),
            format!(
                "its user_id_prefix and provider {:?}'s start with one another",
                name(*first)
            ),
        ),
    };
    ConfigError {
        provider: provider.to_owned(),
        reason,
    }
}

fn unix(now: SystemTime) -> u64 {
    now.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
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
    parsed.iss.ok_or(VerifyError::MissingClaim("iss".into()))
}

/// Checks the signature with each candidate key in turn.
fn decode<'a>(
    token: &str,
    alg: Algorithm,
    keys: impl Iterator<Item = &'a DecodingKey>,
) -> Result<Map<String, Value>, VerifyError> {
    let mut validation = Validation::new(alg);
    // Time and audience are checked by `check_claims` against the injected
    // clock; here only the signature and the JSON shape.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let mut last = VerifyError::BadSignature;
    for key in keys {
        match jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation) {
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
    let issuer = claims.get("iss").and_then(Value::as_str);
    if issuer != Some(provider.issuer.as_str()) {
        return Err(VerifyError::UnknownIssuer {
            presented: crate::error::cut(issuer.unwrap_or_default()),
            expected: vec![provider.issuer.clone()],
        });
    }
    let exp = numeric_date(claims, "exp")?.ok_or(VerifyError::MissingClaim("exp".into()))?;
    if now >= exp.saturating_add(leeway) {
        return Err(VerifyError::Expired);
    }
    if let Some(nbf) = numeric_date(claims, "nbf")?
        && nbf > now.saturating_add(leeway)
    {
        return Err(VerifyError::NotYetValid);
    }
    // `iat` in the future is not refused (providers backdate `nbf` for clock
    // skew, not `iat`); it only bounds the token's age when configured.
    let iat = numeric_date(claims, "iat")?;
    if let Some(max_age) = provider.max_token_age {
        let iat = iat.ok_or(VerifyError::MissingClaim("iat".into()))?;
        if now > iat.saturating_add(max_age.as_secs()).saturating_add(leeway) {
            return Err(VerifyError::TooOld);
        }
    }
    if !provider.audience.is_empty() {
        let accepted = |aud: &str| provider.audience.iter().any(|a| a == aud);
        let ok = match claims.get("aud") {
            Some(Value::String(aud)) => accepted(aud),
            Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).any(accepted),
            _ => false,
        };
        if !ok {
            let presented = claims
                .get("aud")
                .map_or_else(|| "absent".to_owned(), Value::to_string);
            return Err(VerifyError::WrongAudience {
                presented: crate::error::cut(&presented),
                expected: provider.audience.clone(),
            });
        }
    }
    for name in &provider.required_claims {
        if claims.get(name).is_none_or(Value::is_null) {
            return Err(VerifyError::MissingClaim(name.clone()));
        }
    }
    Ok(())
}

/// The role a login gets: the requested role when the provider has no
/// role claim, otherwise as [`RoleClaim`] rules; either way one the
/// provider may use.
fn resolve_role(
    provider: &ProviderConfig,
    claims: &Map<String, Value>,
    requested: &str,
) -> Result<String, VerifyError> {
    let allowed = |role: &str| provider.roles.iter().any(|r| r == role);
    let Some(rule) = &provider.role_claim else {
        return if allowed(requested) {
            Ok(requested.to_owned())
        } else {
            Err(VerifyError::RoleNotAllowed {
                provider: provider.name.clone(),
                role: requested.to_owned(),
            })
        };
    };
    let granted = granted_roles(rule, claims, allowed);
    let floor = rule.default.as_deref().filter(|d| allowed(d));
    let chosen = if requested == rule.token_chooses {
        granted.first().map(String::as_str).or(floor)
    } else {
        (granted.iter().any(|g| g == requested) || floor == Some(requested)).then_some(requested)
    };
    if let Some(role) = chosen {
        return Ok(role.to_owned());
    }
    Err(VerifyError::RoleNotGranted {
        requested: crate::error::cut(requested),
        granted: granted.into_iter().take(8).collect(),
    })
}

/// The provider's roles `rule`'s claim grants, in claim order: the claim
/// is a string or a list of strings (anything else grants nothing),
/// mapped through `rule.values` when it has any.
fn granted_roles(
    rule: &RoleClaim,
    claims: &Map<String, Value>,
    allowed: impl Fn(&str) -> bool,
) -> Vec<String> {
    let values: Vec<&str> = match rule.path.lookup(claims) {
        Some(Value::String(one)) => vec![one.as_str()],
        Some(Value::Array(many)) => many.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let mut granted: Vec<String> = Vec::new();
    for value in values {
        let role = if rule.values.is_empty() {
            Some(value)
        } else {
            rule.values.get(value).map(String::as_str)
        };
        if let Some(role) = role.filter(|r| allowed(r))
            && !granted.iter().any(|g| g == role)
        {
            granted.push(role.to_owned());
        }
    }
    granted
}

/// Longest tenant value accepted: a tenant names pools, limits and
/// databases, so it stays a short key.
pub const MAX_TENANT_LEN: usize = 128;

/// The token's tenant, by the provider's `tenant_claim`: a string or an
/// integer, or `None` when the claim is absent (a user outside any
/// organisation). Any other value is refused rather than guessed at.
fn tenant(
    provider: &ProviderConfig,
    claims: &Map<String, Value>,
) -> Result<Option<String>, VerifyError> {
    let Some(path) = &provider.tenant_claim else {
        return Ok(None);
    };
    let bad = || VerifyError::MissingClaim("tenant (tenant_claim): a string or an integer".into());
    match path.lookup(claims) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(tenant)) if tenant.is_empty() => Ok(None),
        Some(Value::String(tenant)) if tenant.len() <= MAX_TENANT_LEN => Ok(Some(tenant.clone())),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(Some(n.to_string())),
        Some(_) => Err(bad()),
    }
}

/// A NumericDate claim (RFC 7519 §2): seconds, possibly fractional.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, VerifyError> {
    match claims.get(name) {
        None => Ok(None),
        #[allow(
            clippy::cast_possible_truncation,
            reason = "a fractional time claim counts in whole seconds; the cast saturates"
        )]
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
            .map(Some)
            .ok_or_else(|| VerifyError::MissingClaim(name.to_owned())),
        Some(_) => Err(VerifyError::MissingClaim(name.to_owned())),
    }
}
