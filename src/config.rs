//! `proxy.toml`: parsing, defaults, secrets, and conversion into the
//! libraries' settings. Every key is documented in the repository's
//! `proxy.toml`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use authgres_jwt::{ClaimPath, FetchSettings, KeySource, ProviderConfig, UserIdConflict, UserIds};
use authgres_wire::{
    ClaimsKey, CleartextTokens, ClientLimits, ClusterConfig, ConnectionLimits, Policy, PoolLimits,
    ProxyConfig, RoleConfig, TokenLogin, UpstreamConfig, UpstreamTls, defaults as wire,
};
use jsonwebtoken::Algorithm;
use serde::Deserialize;

/// The file as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// KEY=VALUE file with secrets; environment variables override it.
    pub secrets_file: Option<PathBuf>,
    #[serde(default)]
    pub listen: Listen,
    #[serde(default)]
    pub upstream: Upstream,
    #[serde(default)]
    pub identity: Identity,
    #[serde(default = "default_roles")]
    pub roles: BTreeMap<String, Role>,
    #[serde(default)]
    pub providers: Vec<Provider>,
    /// `[http]`: absent disables HTTP.
    pub http: Option<Http>,
    /// `[admin]`: absent disables the admin listener.
    pub admin: Option<Admin>,
    /// `[cluster]`: absent means the instance runs alone.
    pub cluster: Option<Cluster>,
}

/// `[cluster]`: this instance's id and its peers, for cancel requests.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub instance_id: u16,
    /// `ID = "host:port"` for every instance, this one included.
    #[serde(default)]
    pub peers: BTreeMap<String, String>,
    /// A `host:port` name resolving to every instance.
    pub peer_dns: Option<String>,
}

/// `[admin]`: metrics, health, pools, clients, reload.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// `host:port`, or `unix:PATH` (relative to this file) for a Unix
    /// socket only the proxy's user can connect to.
    pub address: String,
    /// Connections held at once; more are answered 503 and closed. Its own
    /// budget: a flood of admin connections takes no file descriptors
    /// from clients.
    pub max_connections: usize,
    /// Time to send a request's headers, and on a kept-alive connection
    /// to start the next request.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A connection with nothing read or written this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Names besides IP addresses and `localhost` that requests may give
    /// as their `Host` (a scraper's DNS name for the proxy); any other is
    /// refused, so a web page that rebinds its name to this host cannot
    /// read the admin routes.
    pub allowed_hosts: Vec<String>,
}

impl Default for Admin {
    fn default() -> Self {
        let limits = crate::admin::Limits::default();
        Self {
            address: "127.0.0.1:9432".into(),
            max_connections: limits.max_connections,
            header_timeout: limits.header_timeout,
            idle_timeout: limits.idle_timeout,
            allowed_hosts: Vec::new(),
        }
    }
}

impl Admin {
    /// The address to listen on: a Unix socket's path resolved against
    /// the config file's directory.
    pub fn address(&self, loaded: &Loaded) -> String {
        match crate::admin::unix_path(&self.address) {
            Some(path) => format!("unix:{}", loaded.path(path).display()),
            None => self.address.clone(),
        }
    }

    /// The listener's limits, checked.
    pub fn limits(&self) -> anyhow::Result<crate::admin::Limits> {
        if self.max_connections == 0 {
            bail!("[admin] max_connections must be at least 1");
        }
        for (key, value) in [
            ("header_timeout", self.header_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if value.is_zero() {
                bail!("[admin] {key} must be longer than 0s");
            }
        }
        Ok(crate::admin::Limits {
            max_connections: self.max_connections,
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            allowed_hosts: self.allowed_hosts.clone(),
        })
    }
}

/// `[http]`: the /sql endpoint and WebSocket transport.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Http {
    pub address: String,
    #[serde(default)]
    pub tls: bool,
    #[serde(default = "http_defaults::max_bytes")]
    pub max_request_bytes: usize,
    #[serde(default = "http_defaults::max_request_bytes_total")]
    pub max_request_bytes_total: usize,
    #[serde(default = "http_defaults::max_bytes")]
    pub max_response_bytes: usize,
    #[serde(default = "http_defaults::pool_size")]
    pub pool_size: usize,
    #[serde(default = "http_defaults::checkout_timeout", with = "humantime_serde")]
    pub checkout_timeout: Duration,
    #[serde(default = "http_defaults::header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    #[serde(default = "http_defaults::body_timeout", with = "humantime_serde")]
    pub body_timeout: Duration,
    #[serde(default = "http_defaults::statement_timeout", with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// Load balancers whose connections begin with a PROXY protocol v2
    /// header (as `[listen] proxy_protocol_from`, for this listener).
    #[serde(default)]
    pub proxy_protocol_from: Vec<Trusted>,
}

/// An entry of `proxy_protocol_from`: an address or CIDR block, checked as
/// the file is parsed (so a mistake is reported at its line and column).
#[derive(Debug, Clone, Copy)]
pub struct Trusted(pub authgres_wire::AddressBlock);

impl<'de> Deserialize<'de> for Trusted {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map(Self).map_err(serde::de::Error::custom)
    }
}

/// The peers a listener trusts to send a PROXY header.
pub fn proxy_protocol_from(entries: &[Trusted]) -> authgres_wire::ProxyProtocolFrom {
    authgres_wire::ProxyProtocolFrom::new(entries.iter().map(|t| t.0).collect())
}

mod http_defaults {
    use std::time::Duration;

    pub fn header_timeout() -> Duration {
        authgres_http::DEFAULT_HEADER_TIMEOUT
    }
    pub fn body_timeout() -> Duration {
        authgres_http::DEFAULT_BODY_TIMEOUT
    }
    pub fn statement_timeout() -> Duration {
        authgres_http::DEFAULT_STATEMENT_TIMEOUT
    }

    pub fn max_bytes() -> usize {
        authgres_http::DEFAULT_MAX_BYTES
    }
    pub fn max_request_bytes_total() -> usize {
        authgres_http::DEFAULT_MAX_REQUEST_BYTES_TOTAL
    }
    pub fn pool_size() -> usize {
        authgres_http::DEFAULT_POOL_SIZE
    }
    pub fn checkout_timeout() -> Duration {
        authgres_wire::defaults::CHECKOUT_TIMEOUT
    }
}

/// `[listen]`: the client-facing side.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    pub address: String,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub auth_timeout: Duration,
    pub max_connections: usize,
    pub max_unauthenticated: usize,
    pub max_unauthenticated_per_source: usize,
    pub cleartext_tokens: Cleartext,
    pub enforce_token_expiry: bool,
    /// "0s" disables each of these.
    #[serde(with = "humantime_serde")]
    pub idle_transaction_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub client_write_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub tcp_keepalive: Duration,
    /// How long a drain waits for clients to reach a boundary and leave.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// After SIGTERM, how long to keep serving with /readyz at 503 before
    /// the drain starts (for load balancers to notice).
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Unix socket through which a new process takes over the listeners.
    pub handover_socket: Option<PathBuf>,
    /// Load balancers (addresses or CIDR blocks) whose connections begin
    /// with a PROXY protocol v2 header naming the client.
    pub proxy_protocol_from: Vec<Trusted>,
}

impl Default for Listen {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:6432".into(),
            tls_cert: None,
            tls_key: None,
            auth_timeout: wire::AUTH_TIMEOUT,
            max_connections: wire::MAX_CONNECTIONS,
            max_unauthenticated: wire::MAX_UNAUTHENTICATED,
            max_unauthenticated_per_source: wire::MAX_UNAUTHENTICATED_PER_SOURCE,
            cleartext_tokens: Cleartext::Loopback,
            enforce_token_expiry: false,
            idle_transaction_timeout: wire::IDLE_TRANSACTION_TIMEOUT,
            client_write_timeout: wire::CLIENT_WRITE_TIMEOUT,
            tcp_keepalive: wire::TCP_KEEPALIVE,
            shutdown_timeout: wire::SHUTDOWN_TIMEOUT,
            drain_delay: Duration::ZERO,
            handover_socket: None,
            proxy_protocol_from: Vec::new(),
        }
    }
}

/// `listen.cleartext_tokens`.
#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum Cleartext {
    Allow,
    Loopback,
    Refuse,
}

/// `[upstream]`: the real Postgres.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
    pub databases: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub tls: UpstreamTlsMode,
    pub tls_ca_file: Option<PathBuf>,
    pub pool_mode: PoolMode,
    pub pool_mode_by_database: std::collections::HashMap<String, PoolMode>,
    pub pool_size: usize,
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub server_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub health_check_after: Duration,
    #[serde(with = "humantime_serde")]
    pub internal_query_timeout: Duration,
}

impl Upstream {
    /// Pool limits with this many connections per (database, role).
    fn pool_limits(&self, size: usize, checkout_timeout: Duration) -> PoolLimits {
        PoolLimits {
            max_per_key: size,
            checkout_timeout,
            idle_timeout: self.idle_timeout,
            server_lifetime: self.server_lifetime,
            health_check_after: self.health_check_after,
            internal_query_timeout: self.internal_query_timeout,
        }
    }
}

/// `upstream.pool_mode` and the values of `upstream.pool_mode_by_database`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Each client gets a connection for its session; it is reset and kept
    /// for the next client when the client leaves.
    Session,
    /// Each client holds a connection for one transaction at a time.
    Transaction,
    /// Each client gets a login of its own, closed when it leaves.
    None,
}

impl From<PoolMode> for authgres_wire::PoolMode {
    fn from(mode: PoolMode) -> Self {
        match mode {
            PoolMode::Session => Self::Session,
            PoolMode::Transaction => Self::Transaction,
            PoolMode::None => Self::None,
        }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 5432,
            databases: Vec::new(),
            connect_timeout: wire::CONNECT_TIMEOUT,
            tls: UpstreamTlsMode::Disable,
            tls_ca_file: None,
            pool_mode: PoolMode::Session,
            pool_mode_by_database: std::collections::HashMap::new(),
            pool_size: wire::POOL_SIZE,
            checkout_timeout: wire::CHECKOUT_TIMEOUT,
            idle_timeout: wire::IDLE_TIMEOUT,
            server_lifetime: wire::SERVER_LIFETIME,
            health_check_after: wire::HEALTH_CHECK_AFTER,
            internal_query_timeout: wire::INTERNAL_QUERY_TIMEOUT,
        }
    }
}

/// `upstream.tls`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum UpstreamTlsMode {
    Disable,
    VerifyFull,
}

/// What the upstream pools are built with, from the file: fixed until a
/// restart, so a reload names each change rather than applying it to some
/// connections and not others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamFixed {
    host: String,
    port: u16,
    connect_timeout: Duration,
    tls: UpstreamTlsMode,
    /// The contents of `tls_ca_file`: a new CA in the same file is a
    /// change.
    ca: Option<Vec<u8>>,
    /// `[listen] tcp_keepalive`, which upstream sockets use too.
    tcp_keepalive: Duration,
}

impl UpstreamFixed {
    /// The settings that differ in `new`, named as the file names them.
    pub fn changed(&self, new: &Self) -> Vec<&'static str> {
        let mut changed = Vec::new();
        if self.host != new.host {
            changed.push("[upstream] host");
        }
        if self.port != new.port {
            changed.push("[upstream] port");
        }
        if self.connect_timeout != new.connect_timeout {
            changed.push("[upstream] connect_timeout");
        }
        if self.tls != new.tls {
            changed.push("[upstream] tls");
        } else if self.ca != new.ca {
            changed.push("[upstream] tls_ca_file");
        }
        if self.tcp_keepalive != new.tcp_keepalive {
            changed.push("[listen] tcp_keepalive (upstream connections)");
        }
        changed
    }
}

/// `[identity]`: the claims-signing key and the verified-token cache.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Identity {
    pub claims_key_env: String,
    pub verified_token_cache: u64,
}

impl Default for Identity {
    fn default() -> Self {
        Self {
            claims_key_env: "AUTHGRES_CLAIMS_KEY".into(),
            verified_token_cache: 100_000,
        }
    }
}

/// `[roles.NAME]`.
#[derive(Debug, Deserialize)]
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
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LoginMethod {
    /// The token as the password: every driver.
    #[default]
    Password,
    /// SASL OAUTHBEARER: psql and libpq 18 with `oauth_issuer`.
    OAuthBearer,
}

fn default_oauth_scope() -> String {
    "openid".to_owned()
}

/// `roles.NAME.token`.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TokenPolicy {
    Required,
    None,
}

fn token_required() -> TokenPolicy {
    TokenPolicy::Required
}

/// Without `[roles]`: `authenticated` only. Access without a token is
/// opt-in: a `[roles.anonymous]` with `token = "none"`.
fn default_roles() -> BTreeMap<String, Role> {
    BTreeMap::from([(
        "authenticated".to_owned(),
        Role {
            password_env: Some("AUTHGRES_AUTHENTICATED_PASSWORD".into()),
            token: TokenPolicy::Required,
            login: LoginMethod::Password,
            oauth_scope: default_oauth_scope(),
            table_access: None,
        },
    )])
}

/// `[[providers]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provider {
    pub name: String,
    pub issuer: String,
    pub jwks_url: Option<String>,
    #[serde(default)]
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
}

impl Provider {
    /// How its users are named beside other providers'.
    fn user_ids(&self) -> UserIds {
        UserIds {
            prefix: self.user_id_prefix.clone(),
            shared: self.shared_user_ids,
        }
    }
}

/// Provider defaults, taken from the library so there is one source.
mod defaults {
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
#[derive(Debug, Deserialize, Default)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

fn default_provider_roles() -> Vec<String> {
    vec!["authenticated".into()]
}
fn default_leeway() -> Duration {
    authgres_jwt::DEFAULT_LEEWAY
}

/// A config file with its secrets resolved.
pub struct Loaded {
    pub file: FileConfig,
    /// Directory of the config file; relative paths are resolved from it.
    pub base: PathBuf,
    pub secrets: Secrets,
}

impl Loaded {
    /// Reads and checks `path`.
    pub fn from_path(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let file: FileConfig =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        check_user_ids(&file, &text)
            .with_context(|| format!("checking config {}", path.display()))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let secrets = Secrets::load(file.secrets_file.as_ref().map(|p| base.join(p)))?;
        Ok(Self {
            file,
            base,
            secrets,
        })
    }

    /// Resolves a path from the config against the config's directory.
    pub fn path(&self, relative: &Path) -> PathBuf {
        self.base.join(relative)
    }

    /// The claims key, or an error naming where to put it.
    pub fn claims_key(&self) -> anyhow::Result<ClaimsKey> {
        let name = &self.file.identity.claims_key_env;
        let hex = self
            .secrets
            .get(name)
            .with_context(|| format!("{name} is not set: run `authgres init-db` or set it"))?;
        ClaimsKey::from_hex(&hex).with_context(|| format!("{name} is not a valid claims key"))
    }

    /// Provider settings for the verifier.
    pub fn providers(&self) -> anyhow::Result<Vec<ProviderConfig>> {
        self.file
            .providers
            .iter()
            .map(|p| self.provider(p))
            .collect()
    }

    fn provider(&self, p: &Provider) -> anyhow::Result<ProviderConfig> {
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
        config.algorithms = match &p.algorithms {
            Some(algorithms) => algorithms
                .iter()
                .map(|a| {
                    a.parse()
                        .map_err(|_| anyhow::anyhow!("unknown algorithm {a:?}"))
                })
                .collect::<anyhow::Result<_>>()
                .with_context(context)?,
            None if config.keys == KeySource::SharedSecretOnly => {
                vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]
            }
            None if shared_secret.is_some() => {
                let mut all = config.algorithms.clone();
                all.extend([Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]);
                all
            }
            None => config.algorithms.clone(),
        };
        config.leeway = p.leeway;
        config.required_claims = p.required_claims.clone();
        config.max_token_age = p.max_token_age;
        config.role_claim = p
            .role_claim
            .as_deref()
            .map(ClaimPath::parse)
            .transpose()
            .with_context(context)?;
        config.shared_secret = shared_secret;
        config.fetch = FetchSettings {
            min_ttl: p.jwks_min_ttl,
            max_ttl: p.jwks_max_ttl,
            unknown_kid_interval: p.unknown_kid_interval,
            max_staleness: p.max_staleness,
            connect_timeout: p.fetch_connect_timeout,
            timeout: p.fetch_timeout,
            retries: p.fetch_retries,
            max_body: p.max_jwks_bytes,
            ca_pem: match &p.ca_file {
                Some(path) => Some(
                    std::fs::read(self.path(path))
                        .with_context(|| format!("reading ca_file {}", path.display()))
                        .with_context(context)?,
                ),
                None => None,
            },
            allow_insecure_http: p.allow_insecure_http,
        };
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

    /// How role `name`'s clients hand their token over. An OAUTHBEARER
    /// role sends clients to its provider's discovery document, so exactly
    /// one provider must serve it (libpq checks the document's issuer
    /// against its own `oauth_issuer`).
    fn token_login(&self, name: &str, role: &Role) -> anyhow::Result<TokenLogin> {
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

    /// What the upstream pools are built with, the CA file read.
    pub fn upstream_fixed(&self) -> anyhow::Result<UpstreamFixed> {
        let upstream = &self.file.upstream;
        let ca = match (upstream.tls, &upstream.tls_ca_file) {
            (UpstreamTlsMode::VerifyFull, Some(file)) => {
                let path = self.path(file);
                Some(
                    std::fs::read(&path)
                        .with_context(|| format!("[upstream] tls_ca_file {}", path.display()))?,
                )
            }
            _ => None,
        };
        Ok(UpstreamFixed {
            host: upstream.host.clone(),
            port: upstream.port,
            connect_timeout: upstream.connect_timeout,
            tls: upstream.tls,
            ca,
            tcp_keepalive: self.file.listen.tcp_keepalive,
        })
    }

    /// Wire settings.
    pub fn proxy_config(&self) -> anyhow::Result<ProxyConfig> {
        let mut roles = HashMap::new();
        for (name, role) in &self.file.roles {
            let password = match &role.password_env {
                Some(var) => Some(self.secrets.get(var).with_context(|| {
                    format!("role {name:?}: {var} is not set: run `authgres init-db` or set it")
                })?),
                None => None,
            };
            roles.insert(
                name.clone(),
                RoleConfig {
                    password,
                    requires_token: role.token == TokenPolicy::Required,
                    login: self.token_login(name, role)?,
                },
            );
        }
        let listen = &self.file.listen;
        Ok(ProxyConfig {
            upstream: UpstreamConfig {
                host: self.file.upstream.host.clone(),
                port: self.file.upstream.port,
                connect_timeout: self.file.upstream.connect_timeout,
                tls: match self.file.upstream.tls {
                    UpstreamTlsMode::Disable => UpstreamTls::Disable,
                    UpstreamTlsMode::VerifyFull => UpstreamTls::verify_full(
                        self.file
                            .upstream
                            .tls_ca_file
                            .as_ref()
                            .map(|p| self.path(p))
                            .as_deref(),
                    )
                    .context("[upstream] tls")?,
                },
                tcp_keepalive: enabled(listen.tcp_keepalive),
            },
            admission: Policy {
                roles,
                databases: self.file.upstream.databases.clone(),
                cleartext_tokens: match listen.cleartext_tokens {
                    Cleartext::Allow => CleartextTokens::Allow,
                    Cleartext::Loopback => CleartextTokens::LoopbackOnly,
                    Cleartext::Refuse => CleartextTokens::Refuse,
                },
                tls_offered: listen.tls_cert.is_some(),
            },
            auth_timeout: listen.auth_timeout,
            proxy_protocol_from: proxy_protocol_from(&listen.proxy_protocol_from),
            connections: ConnectionLimits {
                max_connections: listen.max_connections,
                max_unauthenticated: listen.max_unauthenticated.min(listen.max_connections),
                max_unauthenticated_per_source: listen.max_unauthenticated_per_source,
            },
            client_limits: ClientLimits {
                idle_in_transaction: enabled(listen.idle_transaction_timeout),
                stalled_reader: enabled(listen.client_write_timeout),
            },
            tcp_keepalive: enabled(listen.tcp_keepalive),
            enforce_token_expiry: listen.enforce_token_expiry,
            pool_mode: self.file.upstream.pool_mode.into(),
            pool_mode_by_database: (self.file.upstream.pool_mode_by_database.iter())
                .map(|(database, mode)| (database.clone(), (*mode).into()))
                .collect(),
            pool_limits: {
                let upstream = &self.file.upstream;
                upstream.pool_limits(upstream.pool_size, upstream.checkout_timeout)
            },
            cluster: self.cluster()?,
        })
    }

    /// `[cluster]`, checked.
    fn cluster(&self) -> anyhow::Result<ClusterConfig> {
        let Some(cluster) = &self.file.cluster else {
            return Ok(ClusterConfig::default());
        };
        let id_range = 1..=authgres_wire::MAX_INSTANCE_ID;
        let check = |id: u16, what: &str| {
            if id_range.contains(&id) {
                Ok(id)
            } else {
                bail!("[cluster] {what} must be between 1 and {}", id_range.end())
            }
        };
        let instance_id = check(cluster.instance_id, "instance_id")?;
        let mut peers = HashMap::new();
        for (id, address) in &cluster.peers {
            let parsed = id
                .parse::<u16>()
                .ok()
                .with_context(|| format!("[cluster.peers] key {id:?} is not an instance id"))?;
            peers.insert(check(parsed, "peer ids")?, address.clone());
        }
        if cluster.peers.is_empty() && cluster.peer_dns.is_none() {
            bail!("[cluster] needs peers or peer_dns: where the other instances are");
        }
        Ok(ClusterConfig {
            instance_id,
            peers,
            peer_dns: cluster.peer_dns.clone(),
        })
    }

    /// HTTP settings, when `[http]` is present.
    pub fn http(&self) -> Option<authgres_http::HttpConfig> {
        self.file.http.as_ref().map(|h| authgres_http::HttpConfig {
            max_request_bytes: h.max_request_bytes,
            max_request_bytes_total: h.max_request_bytes_total,
            max_response_bytes: h.max_response_bytes,
            pool: self
                .file
                .upstream
                .pool_limits(h.pool_size, h.checkout_timeout),
            header_timeout: h.header_timeout,
            body_timeout: h.body_timeout,
            statement_timeout: h.statement_timeout,
            proxy_protocol_from: proxy_protocol_from(&h.proxy_protocol_from),
        })
    }

    /// The wire listener's TLS acceptor, when a certificate and key are
    /// configured.
    pub fn tls(&self) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
        self.tls_with_alpn(authgres_wire::ALPN_POSTGRESQL)
    }

    /// The same certificate for HTTPS (ALPN http/1.1).
    pub fn http_tls(&self) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
        self.tls_with_alpn(authgres_wire::ALPN_HTTP1)
    }

    fn tls_with_alpn(&self, alpn: &[u8]) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
        match (&self.file.listen.tls_cert, &self.file.listen.tls_key) {
            (Some(cert), Some(key)) => {
                authgres_wire::tls_acceptor(&self.path(cert), &self.path(key), alpn)
                    .map(Some)
                    .context("[listen] tls_cert and tls_key")
            }
            (None, None) => Ok(None),
            _ => bail!("[listen] needs both tls_cert and tls_key, or neither"),
        }
    }
}

/// Refuses providers that would give one `auth.user_id()` to different
/// people (the rule is `authgres_jwt::check_user_ids`), pointing at them in
/// `text` and naming both ways out.
fn check_user_ids(file: &FileConfig, text: &str) -> anyhow::Result<()> {
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
fn provider_positions(text: &str) -> Vec<(usize, usize)> {
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
fn quoted(names: &[&str]) -> String {
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
fn discovery_url(issuer: &str) -> String {
    if issuer.contains("/.well-known/") {
        issuer.to_owned()
    } else {
        format!("{issuer}/.well-known/openid-configuration")
    }
}

/// A duration setting where zero means "off".
fn enabled(duration: Duration) -> Option<Duration> {
    (!duration.is_zero()).then_some(duration)
}

/// Secrets from the environment and the optional secrets file.
pub struct Secrets {
    file: Option<PathBuf>,
    values: HashMap<String, String>,
}

impl Secrets {
    fn load(file: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut values = HashMap::new();
        if let Some(path) = &file
            && path.exists()
        {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading secrets file {}", path.display()))?;
            values = parse_env_file(&text);
        }
        Ok(Self { file, values })
    }

    /// The secret `name`: the environment wins over the file.
    pub fn get(&self, name: &str) -> Option<String> {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| self.values.get(name).cloned())
    }

    /// The secrets file, if configured.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

/// Parses `KEY=VALUE` lines; `#` comments, blank lines and `export ` allowed.
pub fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_example_config_parses() {
        let text = include_str!("../proxy.toml");
        let file: FileConfig = toml::from_str(text).expect("proxy.toml parses");
        assert!(file.roles.contains_key("authenticated"));
        assert!(!file.providers.is_empty());
    }

    #[test]
    fn commented_examples_in_proxy_toml_parse_too() {
        let uncommented: String = include_str!("../proxy.toml")
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with('[')
                        || rest.split_once(" = ").is_some_and(|(key, _)| {
                            !key.is_empty()
                                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        }) =>
                {
                    rest
                }
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let file: FileConfig = toml::from_str(&uncommented).expect("uncommented proxy.toml parses");
        check_user_ids(&file, &uncommented).expect("its providers name their users apart");
        let names: Vec<_> = file.providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["clerk", "auth0", "supabase"]);
        assert!(file.listen.tls_cert.is_some());
        let cluster = file.cluster.expect("[cluster]");
        assert_eq!((cluster.instance_id, cluster.peers.len()), (1, 2));
    }

    /// A config from `text`, with no secrets file.
    fn loaded(text: &str) -> Loaded {
        Loaded {
            file: toml::from_str(text).expect("parses"),
            base: PathBuf::from("."),
            secrets: Secrets {
                file: None,
                values: HashMap::new(),
            },
        }
    }

    const OAUTH_ROLE: &str = "[roles.person]\nlogin = \"oauthbearer\"\n";
    const PROVIDER: &str = "[[providers]]\nname = \"a\"\nissuer = \"https://id.example/\"\n\
                            jwks_url = \"https://id.example/jwks\"\n";

    #[test]
    fn an_oauthbearer_role_is_sent_to_its_one_provider() {
        let config = loaded(&format!("{OAUTH_ROLE}{PROVIDER}roles = [\"person\"]\n"));
        let role = &config.proxy_config().expect("valid").admission.roles["person"];
        assert_eq!(
            role.login,
            TokenLogin::OAuthBearer {
                discovery_url: "https://id.example//.well-known/openid-configuration".into(),
                scope: "openid".into(),
            }
        );
    }

    #[test]
    fn discovery_urls_give_libpq_back_the_exact_issuer() {
        assert_eq!(
            discovery_url("https://id.example"),
            "https://id.example/.well-known/openid-configuration"
        );
        // libpq cuts at "/.well-known/": "https://t.auth0.com/" again.
        assert_eq!(
            discovery_url("https://t.auth0.com/"),
            "https://t.auth0.com//.well-known/openid-configuration"
        );
        let given = "https://id.example/.well-known/oauth-authorization-server";
        assert_eq!(discovery_url(given), given);
    }

    #[test]
    fn an_oauthbearer_role_needs_exactly_one_provider_and_a_token() {
        let two = format!(
            "{OAUTH_ROLE}{PROVIDER}roles = [\"person\"]\n{}roles = [\"person\"]\n",
            PROVIDER.replace("\"a\"", "\"b\"")
        );
        for (text, expected) in [
            (format!("{OAUTH_ROLE}{PROVIDER}"), "found 0"),
            (two, "found 2"),
            (
                format!("{OAUTH_ROLE}token = \"none\"\n{PROVIDER}roles = [\"person\"]\n"),
                "needs token = \"required\"",
            ),
        ] {
            let error = loaded(&text).proxy_config().expect_err("refused");
            assert!(format!("{error:#}").contains(expected), "{error:#}");
        }
    }

    /// Issue 21 item 5: an identity was a sub without its issuer.
    #[test]
    fn two_providers_in_one_user_namespace_are_refused_with_where_and_how() {
        let b = PROVIDER
            .replace("\"a\"", "\"b\"")
            .replace("id.example", "other.example");
        let text = format!("{PROVIDER}{b}");
        let file: FileConfig = toml::from_str(&text).expect("parses");
        let error = format!("{:#}", check_user_ids(&file, &text).expect_err("refused"));
        for expected in [
            "providers \"a\" (line 1, column 1) and \"b\" (line 5, column 1)",
            "both serve role \"authenticated\"",
            "user_id_prefix = \"b:\"",
            "shared_user_ids = true under both",
        ] {
            assert!(error.contains(expected), "{expected:?} in {error}");
        }
        for (fix, ok) in [
            ("user_id_prefix = \"a:\"\n", "user_id_prefix = \"b:\"\n"),
            ("shared_user_ids = true\n", "shared_user_ids = true\n"),
            // A bare provider may stay beside a prefixed one.
            ("", "user_id_prefix = \"b:\"\n"),
        ] {
            let text = format!("{PROVIDER}{fix}{b}{ok}");
            let file: FileConfig = toml::from_str(&text).expect("parses");
            check_user_ids(&file, &text).expect("fixed");
        }
        let nested = format!("{PROVIDER}user_id_prefix = \"a\"\n{b}user_id_prefix = \"ab\"\n");
        let file: FileConfig = toml::from_str(&nested).expect("parses");
        let error = format!("{:#}", check_user_ids(&file, &nested).expect_err("nested"));
        assert!(error.contains("starts with the other"), "{error}");
        let single: FileConfig = toml::from_str(PROVIDER).expect("parses");
        check_user_ids(&single, PROVIDER).expect("one provider needs nothing");
    }

    #[test]
    fn proxy_protocol_from_takes_addresses_and_blocks_and_points_at_mistakes() {
        let config = loaded(
            "[listen]\nproxy_protocol_from = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n\
             [http]\naddress = \"127.0.0.1:0\"\nproxy_protocol_from = [\"127.0.0.2\"]\n\
             [roles.web]\n",
        );
        let wire = config.proxy_config().expect("valid").proxy_protocol_from;
        assert!(wire.contains([10, 1, 2, 3].into()));
        assert!(wire.contains([192, 0, 2, 7].into()));
        assert!(!wire.contains([192, 0, 2, 8].into()));
        let http = config.http().expect("[http]").proxy_protocol_from;
        assert!(http.contains([127, 0, 0, 2].into()));
        assert!(!http.contains([10, 1, 2, 3].into()));
        for (entry, expected) in [
            ("\"10.0.0.1/8\"", "did you mean \"10.0.0.0/8\""),
            ("\"balancer.internal\"", "not an IP address or CIDR block"),
            ("10", "invalid type"),
        ] {
            let text = format!(
                "[listen]\naddress = \"127.0.0.1:6432\"\nproxy_protocol_from = [{entry}]\n"
            );
            let error = toml::from_str::<FileConfig>(&text).expect_err("refused");
            let message = error.to_string();
            assert!(message.contains(expected), "{message}");
            assert!(message.contains("line 3, column"), "{message}");
        }
    }

    #[test]
    fn env_file_lines() {
        let parsed = parse_env_file("# c\nA=1\nexport B=\"two\"\n\nC = x=y\n");
        assert_eq!(parsed["A"], "1");
        assert_eq!(parsed["B"], "two");
        assert_eq!(parsed["C"], "x=y");
    }
}
