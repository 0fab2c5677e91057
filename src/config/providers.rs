//! `[[providers]]`: identity providers, their keys, and the rule that
//! no two of them give one `auth.user_id()` to two people.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use authgres_jwt::{
    ClaimPath, FetchSettings, KeySource, ProviderConfig, RoleClaim, UserIdConflict, UserIds,
};
use jsonwebtoken::Algorithm;
use serde::{Deserialize, Serialize};

use super::FileConfig;
use super::Loaded;

/// `[[providers]]`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    pub issuer: String,
    pub jwks_url: Option<String>,
    #[serde(default)]
    #[serde(skip_serializing_if = "OneOrMany::is_none")]
    pub audience: OneOrMany,
    #[serde(default = "default_provider_roles")]
    pub roles: Vec<String>,
    pub algorithms: Option<Vec<String>>,
    #[serde(default = "default_leeway", with = "humantime_serde")]
    pub leeway: Duration,
    #[serde(default)]
    pub required_claims: Vec<String>,
    #[serde(default, with = "humantime_serde")]
    pub max_token_age: Option<Duration>,
    pub role_claim: Option<String>,
    /// Claim values mapped to roles (`{ "org:admin" = "editor" }`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub role_claim_values: BTreeMap<String, String>,
    /// The role of a token whose claim grants none.
    pub role_claim_default: Option<String>,
    /// JSON path of the claim naming the client's tenant (`$.org_id`).
    pub tenant_claim: Option<String>,
    pub shared_secret_env: Option<String>,
    #[serde(default = "defaults::min_ttl", with = "humantime_serde")]
    pub jwks_min_ttl: Duration,
    #[serde(default = "defaults::max_ttl", with = "humantime_serde")]
    pub jwks_max_ttl: Duration,
    #[serde(default = "defaults::unknown_kid_interval", with = "humantime_serde")]
    pub unknown_kid_interval: Duration,
    #[serde(default = "defaults::max_staleness", with = "humantime_serde")]
    pub max_staleness: Duration,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub fetch_connect_timeout: Duration,
    #[serde(default = "defaults::timeout", with = "humantime_serde")]
    pub fetch_timeout: Duration,
    #[serde(default = "defaults::retries")]
    pub fetch_retries: u32,
    #[serde(default = "defaults::max_body")]
    pub max_jwks_bytes: usize,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Put before `sub` in `auth.user_id()`, so another provider's equal
    /// `sub` is another user. Needed (or `shared_user_ids`) as soon as a
    /// second provider shares its namespace.
    pub user_id_prefix: Option<String>,
    /// The same `sub` from this provider and another with the same prefix
    /// (or none) is the same person: set on both.
    #[serde(default)]
    pub shared_user_ids: bool,
    /// Limits per identity (`limits.rs`): unset is unlimited.
    pub max_connections_per_user: Option<u32>,
    pub max_transactions_per_user: Option<u32>,
    pub max_connections_per_tenant: Option<u32>,
    pub max_transactions_per_tenant: Option<u32>,
}

impl Provider {
    /// How its users are named beside other providers'.
    pub(super) fn user_ids(&self) -> UserIds {
        UserIds {
            prefix: self.user_id_prefix.clone(),
            shared: self.shared_user_ids,
        }
    }
}

/// Provider defaults, taken from the library so there is one source.
pub(super) mod defaults {
    use std::time::Duration;

    use authgres_jwt::FetchSettings;

    pub fn min_ttl() -> Duration {
        FetchSettings::default().min_ttl
    }
    pub fn max_ttl() -> Duration {
        FetchSettings::default().max_ttl
    }
    pub fn unknown_kid_interval() -> Duration {
        FetchSettings::default().unknown_kid_interval
    }
    pub fn max_staleness() -> Duration {
        FetchSettings::default().max_staleness
    }
    pub fn connect_timeout() -> Duration {
        FetchSettings::default().connect_timeout
    }
    pub fn timeout() -> Duration {
        FetchSettings::default().timeout
    }
    pub fn retries() -> u32 {
        FetchSettings::default().retries
    }
    pub fn max_body() -> usize {
        FetchSettings::default().max_body
    }
}

/// A string or a list of strings.
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn is_none(&self) -> bool {
        matches!(self, Self::None)
    }
}

pub(super) fn default_provider_roles() -> Vec<String> {
    vec![super::roles::DEFAULT_ROLE.into()]
}

pub(super) fn default_leeway() -> Duration {
    authgres_jwt::DEFAULT_LEEWAY
}

impl Loaded {
    /// Provider settings for the verifier.
    pub fn providers(&self) -> anyhow::Result<Vec<ProviderConfig>> {
        self.file
            .providers
            .iter()
            .map(|p| self.provider(p))
            .collect()
    }

    pub(super) fn provider(&self, p: &Provider) -> anyhow::Result<ProviderConfig> {
        let context = || format!("provider {:?}", p.name);
        let shared_secret = match &p.shared_secret_env {
            Some(var) => Some(
                self.secrets
                    .get(var)
                    .with_context(|| format!("{var} (shared_secret_env) is not set"))
                    .with_context(context)?
                    .into_bytes(),
            ),
            None => None,
        };
        let mut config = ProviderConfig::new(&p.name, &p.issuer, "", &[]);
        config.keys = match (&p.jwks_url, &shared_secret) {
            (Some(url), _) => KeySource::Jwks(url.clone()),
            (None, None) => KeySource::Discovery,
            (None, Some(_)) => KeySource::SharedSecretOnly,
        };
        config.roles = p.roles.clone();
        config.audience = match &p.audience {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(a) => vec![a.clone()],
            OneOrMany::Many(list) => list.clone(),
        };
        config.algorithms =
            algorithms(p, &config.keys, shared_secret.is_some(), &config.algorithms)
                .with_context(context)?;
        config.leeway = p.leeway;
        config.required_claims = p.required_claims.clone();
        config.max_token_age = p.max_token_age;
        config.role_claim = match &p.role_claim {
            Some(path) => {
                let path = ClaimPath::parse(path).with_context(context)?;
                let mut rule = RoleClaim::new(path, super::roles::DEFAULT_ROLE);
                rule.values = p.role_claim_values.clone().into_iter().collect();
                rule.default = p.role_claim_default.clone();
                Some(rule)
            }
            None if !p.role_claim_values.is_empty() || p.role_claim_default.is_some() => {
                bail!(
                    "provider {:?}: role_claim_values and role_claim_default need role_claim",
                    p.name
                )
            }
            None => None,
        };
        config.tenant_claim = p
            .tenant_claim
            .as_deref()
            .map(ClaimPath::parse)
            .transpose()
            .with_context(context)?;
        config.shared_secret = shared_secret;
        config.fetch = self.fetch_settings(p).with_context(context)?;
        config.user_ids = p.user_ids();
        for role in &config.roles {
            if !self.file.roles.contains_key(role) {
                bail!(
                    "provider {:?} lists role {role:?}, which is not under [roles]",
                    p.name
                );
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// How `p`'s keys are fetched, its CA read from `ca_file`.
    fn fetch_settings(&self, p: &Provider) -> anyhow::Result<FetchSettings> {
        let ca_pem = match &p.ca_file {
            Some(path) => Some(
                std::fs::read(self.path(path))
                    .with_context(|| format!("reading ca_file {}", path.display()))?,
            ),
            None => None,
        };
        Ok(FetchSettings {
            min_ttl: p.jwks_min_ttl,
            max_ttl: p.jwks_max_ttl,
            unknown_kid_interval: p.unknown_kid_interval,
            max_staleness: p.max_staleness,
            connect_timeout: p.fetch_connect_timeout,
            timeout: p.fetch_timeout,
            retries: p.fetch_retries,
            max_body: p.max_jwks_bytes,
            ca_pem,
            allow_insecure_http: p.allow_insecure_http,
        })
    }
}

/// The algorithms `p` accepts: those it lists, else the library's
/// (`asymmetric`), with the HMAC ones when it has a shared secret.
fn algorithms(
    p: &Provider,
    keys: &KeySource,
    shared_secret: bool,
    asymmetric: &[Algorithm],
) -> anyhow::Result<Vec<Algorithm>> {
    const HMAC: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
    Ok(match &p.algorithms {
        Some(algorithms) => algorithms
            .iter()
            .map(|a| {
                a.parse()
                    .map_err(|_| anyhow::anyhow!("unknown algorithm {a:?}"))
            })
            .collect::<anyhow::Result<_>>()?,
        None if *keys == KeySource::SharedSecretOnly => HMAC.to_vec(),
        None if shared_secret => [asymmetric, &HMAC].concat(),
        None => asymmetric.to_vec(),
    })
}

/// Refuses providers that would give one `auth.user_id()` to different
/// people (the rule is `authgres_jwt::check_user_ids`), pointing at them in
/// `text` and naming both ways out.
pub(super) fn check_user_ids(file: &FileConfig, text: &str) -> anyhow::Result<()> {
    let user_ids: Vec<UserIds> = file.providers.iter().map(Provider::user_ids).collect();
    let Err(conflict) = authgres_jwt::check_user_ids(&user_ids.iter().collect::<Vec<_>>()) else {
        return Ok(());
    };
    let at = provider_positions(text);
    let provider = |index: usize| {
        let name = file.providers.get(index).map_or("", |p| p.name.as_str());
        match at.get(index) {
            Some((line, column)) => format!("{name:?} (line {line}, column {column})"),
            None => format!("{name:?}"),
        }
    };
    let pair = |first: usize, second: usize| {
        let (a, b) = (&file.providers[first], &file.providers[second]);
        let common: Vec<&str> = (a.roles.iter())
            .filter(|role| b.roles.contains(role))
            .map(String::as_str)
            .collect();
        let roles = match common[..] {
            [] => "they serve different roles, but policies compare auth.user_id() whatever \
                   the role"
                .to_owned(),
            [role] => format!("both serve role {role:?}"),
            _ => format!("both serve roles {}", quoted(&common)),
        };
        (provider(first), provider(second), roles, b.name.as_str())
    };
    match conflict {
        UserIdConflict::BadPrefix {
            provider: index,
            reason,
        } => {
            bail!("provider {}: user_id_prefix {reason}", provider(index))
        }
        UserIdConflict::SameNamespace { first, second } => {
            let (a, b, roles, b_name) = pair(first, second);
            let namespace = match &file.providers[first].user_id_prefix {
                None => "both pass `sub` through unchanged".to_owned(),
                Some(prefix) => format!("both put {prefix:?} before `sub`"),
            };
            bail!(
                "providers {a} and {b} would give different people the same auth.user_id(): \
                 {namespace}, a `sub` is unique only among its own issuer's users, and {roles}. \
                 Either:\n  - tell their users apart with user_id_prefix, e.g. user_id_prefix = \"{b_name}:\" \
                 under provider {b_name:?} (its users' auth.user_id() becomes \
                 \"{b_name}:<sub>\"; a provider left without a prefix keeps its user ids and \
                 refuses a `sub` that starts with another's prefix); or\n  - if the same `sub` \
                 from both is the same person (users moving between two instances of one \
                 provider), set shared_user_ids = true under both"
            )
        }
        UserIdConflict::NestedPrefixes { first, second } => {
            let (a, b, roles, _) = pair(first, second);
            bail!(
                "providers {a} and {b}: one user_id_prefix starts with the other, so their user \
                 ids can coincide ({roles}). Choose prefixes that do not, e.g. end each with \":\""
            )
        }
        other => bail!("{other}"),
    }
}

/// Line and column (from 1) where each `[[providers]]` table starts.
pub(super) fn provider_positions(text: &str) -> Vec<(usize, usize)> {
    #[derive(Deserialize)]
    struct Spans {
        #[serde(default)]
        providers: Vec<toml::Spanned<toml::Table>>,
    }
    let Ok(spans) = toml::from_str::<Spans>(text) else {
        return Vec::new();
    };
    (spans.providers.iter())
        .map(|table| {
            let before = text.get(..table.span().start).unwrap_or_default();
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            (line, column)
        })
        .collect()
}

/// `"a", "b" and "c"`.
pub(super) fn quoted(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => quoted.join(""),
    }
}

/// The OpenID discovery URL an OAUTHBEARER client is sent to, built as
/// Postgres 18 builds it: the issuer with `/.well-known/openid-configuration`
/// appended, unless it names a well-known document already. libpq takes
/// the issuer back from the URL by cutting at `/.well-known/` and compares
/// it with its `oauth_issuer` byte for byte, so a trailing slash stays.
pub(super) fn discovery_url(issuer: &str) -> String {
    if issuer.contains("/.well-known/") {
        issuer.to_owned()
    } else {
        format!("{issuer}/.well-known/openid-configuration")
    }
}
