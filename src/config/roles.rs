//! `[identity]` and `[roles.NAME]`: the claims key's name, the login
//! roles, their passwords, whether they need a token and how it is sent.

use std::collections::BTreeMap;

use anyhow::bail;
use authgres_wire::TokenLogin;
use serde::{Deserialize, Serialize};

use super::Loaded;
use super::providers::Provider;
use super::providers::discovery_url;

/// `[identity]`: the claims-signing key and the verified-token cache.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentitySection {
    pub claims_key_env: String,
    pub verified_token_cache: u64,
}

impl Default for IdentitySection {
    fn default() -> Self {
        Self {
            claims_key_env: "AUTHGRES_CLAIMS_KEY".into(),
            verified_token_cache: authgres_jwt::DEFAULT_TOKEN_CACHE_CAPACITY,
        }
    }
}

/// `[roles.NAME]`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Role {
    /// Environment variable (or secrets-file key) holding the password.
    pub password_env: Option<String>,
    /// "required" or "none".
    #[serde(default = "token_required")]
    pub token: TokenPolicy,
    /// How Postgres-protocol clients hand the token over.
    #[serde(default)]
    pub login: LoginMethod,
    /// With `login = "oauthbearer"`: the scope clients ask the issuer for.
    #[serde(default = "default_oauth_scope")]
    pub oauth_scope: String,
    /// What `init-db` grants the role on the tables of schema `public`
    /// (default: `read_write` with a token, `read_only` without).
    #[serde(default)]
    table_access: Option<TableAccess>,
    /// Limits per identity (`limits.rs`): unset is unlimited.
    pub max_connections_per_user: Option<u32>,
    pub max_transactions_per_user: Option<u32>,
    pub max_connections_per_tenant: Option<u32>,
    pub max_transactions_per_tenant: Option<u32>,
}

impl Role {
    /// What `init-db` grants the role on the tables of schema `public`.
    pub fn table_access(&self) -> TableAccess {
        self.table_access.unwrap_or(match self.token {
            TokenPolicy::Required => TableAccess::ReadWrite,
            TokenPolicy::None => TableAccess::ReadOnly,
        })
    }
}

/// `roles.NAME.table_access`.
#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TableAccess {
    /// SELECT, INSERT, UPDATE, DELETE: RLS policies decide which rows.
    ReadWrite,
    /// SELECT only.
    ReadOnly,
    /// Only the schema: the operator grants table by table.
    None,
}

/// `roles.NAME.login`.
#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoginMethod {
    /// The token as the password: every driver.
    #[default]
    Password,
    /// SASL OAUTHBEARER: psql and libpq 18 with `oauth_issuer`.
    OAuthBearer,
}

pub(super) fn default_oauth_scope() -> String {
    "openid".to_owned()
}

/// `roles.NAME.token`.
#[derive(Debug, Deserialize, Serialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TokenPolicy {
    Required,
    None,
}

pub(super) fn token_required() -> TokenPolicy {
    TokenPolicy::Required
}

/// The role a token logs in as unless configured otherwise: the only role
/// without `[roles]`, and the one a provider allows by default.
pub const DEFAULT_ROLE: &str = "authenticated";

/// Without `[roles]`: `authenticated` only. Access without a token is
/// opt-in: a `[roles.anonymous]` with `token = "none"`.
pub(super) fn default_roles() -> BTreeMap<String, Role> {
    BTreeMap::from([(
        DEFAULT_ROLE.to_owned(),
        Role {
            password_env: Some("AUTHGRES_AUTHENTICATED_PASSWORD".into()),
            token: TokenPolicy::Required,
            login: LoginMethod::Password,
            oauth_scope: default_oauth_scope(),
            table_access: None,
            max_connections_per_user: None,
            max_transactions_per_user: None,
            max_connections_per_tenant: None,
            max_transactions_per_tenant: None,
        },
    )])
}

impl Loaded {
    /// How role `name`'s clients hand their token over. An OAUTHBEARER
    /// role sends clients to its provider's discovery document, so exactly
    /// one provider must serve it (libpq checks the document's issuer
    /// against its own `oauth_issuer`).
    pub(super) fn token_login(&self, name: &str, role: &Role) -> anyhow::Result<TokenLogin> {
        if role.login == LoginMethod::Password {
            return Ok(TokenLogin::Password);
        }
        if role.token == TokenPolicy::None {
            bail!("role {name:?}: login = \"oauthbearer\" needs token = \"required\"");
        }
        let serving: Vec<&Provider> = self
            .file
            .providers
            .iter()
            .filter(|p| p.roles.iter().any(|r| r == name))
            .collect();
        let [provider] = serving[..] else {
            bail!(
                "role {name:?}: login = \"oauthbearer\" needs exactly one provider listing it \
                 in `roles` (found {}): the client is sent to that issuer for its token",
                serving.len()
            );
        };
        Ok(TokenLogin::OAuthBearer {
            discovery_url: discovery_url(&provider.issuer),
            scope: role.oauth_scope.clone(),
        })
    }
}
