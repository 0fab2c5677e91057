//! The settings a proxy runs with, and their defaults, defined once here:
//! the binary's `proxy.toml` parser takes its defaults from [`defaults`].

use std::collections::HashMap;
use std::time::Duration;

pub use crate::budget::ConnectionLimits;
pub use crate::relay::ClientLimits;
pub use crate::routing::{DatabaseName, DatabaseRoute};
use crate::upstream::UpstreamConfig;

/// What admission decides on.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Roles served, by name.
    pub roles: HashMap<String, RoleConfig>,
    /// Databases served on the `[upstream]` server; empty serves any
    /// (when there are no `routes`).
    pub databases: Vec<String>,
    /// `[databases]` entries by the name clients connect to.
    pub routes: HashMap<String, DatabaseRoute>,
    /// Whether a token may travel over an unencrypted connection.
    pub cleartext_tokens: CleartextTokens,
    /// Whether the Postgres listener has a certificate: a refused cleartext
    /// login says to use TLS only when TLS is there to use.
    pub tls_offered: bool,
}

impl Policy {
    /// Whether `database` is one the proxy serves: a `[databases]` entry
    /// clients may name, or one of `databases`. An empty `databases`
    /// serves any name only when there are no entries, so a tenant's
    /// database cannot be reached past its entry by its own name.
    pub fn serves_database(&self, database: &str) -> bool {
        match self.routes.get(database) {
            Some(entry) => entry.direct,
            None if self.databases.is_empty() => self.routes.is_empty(),
            None => self.databases.iter().any(|d| d == database),
        }
    }
}

/// Every default, in one place.
pub mod defaults {
    use std::time::Duration;

    /// From accept until the password must have arrived.
    pub const AUTH_TIMEOUT: Duration = Duration::from_secs(15);
    /// Concurrent client connections, all listeners together.
    pub const MAX_CONNECTIONS: usize = 1000;
    /// Of those, connections that have not authenticated yet.
    pub const MAX_UNAUTHENTICATED: usize = 200;
    /// Unauthenticated connections from one source address.
    pub const MAX_UNAUTHENTICATED_PER_SOURCE: usize = 20;
    /// How long a client may sit idle inside a transaction block, holding
    /// its backend (and its locks).
    pub const IDLE_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(300);
    /// How long a client may leave results unread.
    pub const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
    /// Idle time before TCP keepalive probes, on client and upstream
    /// sockets alike.
    pub const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
    /// Time allowed to connect and log in upstream.
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Deadline of each exchange the proxy starts on its own on an upstream
    /// connection (reset, identity attach, health check, session-state
    /// read); a connection that misses it is closed.
    pub const INTERNAL_QUERY_TIMEOUT: Duration = Duration::from_secs(5);
    /// Upstream connections per (database, role) for Postgres clients.
    pub const POOL_SIZE: usize = 100;
    /// How long a client waits for a pooled connection.
    pub const CHECKOUT_TIMEOUT: Duration = Duration::from_secs(5);
    /// Idle pooled connections older than this are closed.
    pub const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
    /// Pooled connections older than this are closed instead of reused.
    pub const SERVER_LIFETIME: Duration = Duration::from_secs(3600);
    /// A pooled connection idle longer than this is checked before reuse.
    pub const HEALTH_CHECK_AFTER: Duration = Duration::from_secs(30);
    /// How long a transaction-pooled client keeps its connection after a
    /// transaction while nobody else waits for one.
    pub const KEEP_BETWEEN_TRANSACTIONS: Duration = Duration::from_secs(1);
    /// How long a drain waits for clients to finish before closing them.
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
}

/// A database role clients may log in as.
#[derive(Debug, Clone)]
pub struct RoleConfig {
    /// The proxy's password for this role upstream (`None`: trust).
    pub password: Option<String>,
    /// Whether a verified token is required (`false`: anonymous access,
    /// no password asked, no identity attached).
    pub requires_token: bool,
    /// How a Postgres-protocol client hands the token over.
    pub login: TokenLogin,
}

/// How a Postgres-protocol client (TCP or WebSocket) hands its token over.
/// The proxy must choose before the client says anything beyond its
/// startup packet, so this is per role. `/sql` always takes the token from
/// its header.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TokenLogin {
    /// As the password (AuthenticationCleartextPassword): every driver.
    #[default]
    Password,
    /// SASL OAUTHBEARER, as Postgres 18's libpq speaks it with
    /// `oauth_issuer` and `oauth_client_id`; libpq refuses the offer
    /// without those settings.
    OAuthBearer {
        /// The issuer's OpenID discovery document, where a client without
        /// a token is sent.
        discovery_url: String,
        /// The scope the client should ask the issuer for.
        scope: String,
    },
}

/// Whether a token may travel over an unencrypted connection
/// (`[listen] cleartext_tokens`: `allow`, `loopback`, `refuse`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CleartextTokens {
    /// Always allowed.
    Allow,
    /// Allowed only from loopback peers (default).
    #[serde(rename = "loopback")]
    LoopbackOnly,
    /// Never: token logins need TLS.
    Refuse,
}

/// How a database's clients share upstream connections (`[upstream]
/// pool_mode`: `none`, `session`, `transaction`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// Every client gets a login of its own, closed when it leaves.
    None,
    /// A client holds a connection for its whole session; it is reset and
    /// kept for the next client when the client leaves.
    Session,
    /// A client holds a connection for one transaction at a time.
    Transaction,
}

impl PoolMode {
    /// The mode as configured and reported (`none`, `session`,
    /// `transaction`).
    pub fn label(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Session => "session",
            Self::Transaction => "transaction",
        }
    }
}

/// Limits of an upstream pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// Connections per (database, role), busy and idle together.
    pub max_per_key: usize,
    /// How long a checkout waits for a free slot.
    pub checkout_timeout: Duration,
    /// Idle connections older than this are closed.
    pub idle_timeout: Duration,
    /// Connections older than this are closed instead of reused.
    pub server_lifetime: Duration,
    /// A connection idle longer than this is checked before reuse.
    pub health_check_after: Duration,
    /// Deadline of the proxy's own exchanges on a connection.
    pub internal_query_timeout: Duration,
    /// How long a transaction-pooled client keeps its connection after a
    /// transaction while no other client waits for one of its (database,
    /// role): its next transaction then needs no checkout. Zero returns
    /// every connection at its transaction's end.
    pub keep_between_transactions: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_per_key: defaults::POOL_SIZE,
            checkout_timeout: defaults::CHECKOUT_TIMEOUT,
            idle_timeout: defaults::IDLE_TIMEOUT,
            server_lifetime: defaults::SERVER_LIFETIME,
            health_check_after: defaults::HEALTH_CHECK_AFTER,
            internal_query_timeout: defaults::INTERNAL_QUERY_TIMEOUT,
            keep_between_transactions: defaults::KEEP_BETWEEN_TRANSACTIONS,
        }
    }
}

/// Several instances behind one load balancer: who this one is, and where
/// the others are, so a CancelRequest reaches the instance holding the
/// session whichever instance receives it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This instance's id (0..=1023), unique among its peers; 0 when it
    /// runs alone.
    pub instance_id: u16,
    /// Every instance's Postgres-protocol address by id (this one's too).
    pub peers: HashMap<u16, String>,
    /// A name resolving to every instance (`host:port`, e.g. a Kubernetes
    /// headless Service): a cancel for an instance not in `peers` goes to
    /// each address it resolves to.
    pub peer_dns: Option<String>,
}

/// Everything a session needs to know.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// The real Postgres.
    pub upstream: UpstreamConfig,
    /// Who may log in.
    pub admission: Policy,
    /// Time from accept until the password must have arrived (and, for
    /// a peer in `proxy_protocol_from`, until its PROXY header must have).
    pub auth_timeout: Duration,
    /// Peers (load balancers) whose connections begin with a PROXY
    /// protocol v2 header naming the client's address.
    pub proxy_protocol_from: crate::proxied::ProxyProtocolFrom,
    /// How many client connections the proxy holds, all listeners together.
    pub connections: ConnectionLimits,
    /// Limits on clients that hold a backend without using it.
    pub client_limits: ClientLimits,
    /// Idle time before TCP keepalive probes (`None`: the system's).
    pub tcp_keepalive: Option<Duration>,
    /// End sessions at the first transaction boundary after their token's
    /// `exp` (by default a session outlives its token, like any password
    /// login).
    pub enforce_token_expiry: bool,
    /// How clients share upstream connections, unless their database has
    /// its own mode in `pool_mode_by_database`.
    pub pool_mode: PoolMode,
    /// Per-database pool modes.
    pub pool_mode_by_database: HashMap<String, PoolMode>,
    /// Limits of the upstream pool.
    pub pool_limits: PoolLimits,
    /// Peers, for cancel requests.
    pub cluster: ClusterConfig,
    /// The operators' console; `None`: there is none.
    pub console: Option<ConsoleConfig>,
    /// The audit log; `None`: there is none.
    pub audit: Option<crate::audit::AuditConfig>,
    /// What is counted per identity and tenant.
    pub usage: crate::usage::UsageConfig,
    /// Connections and transactions per user and per tenant, by role and
    /// by provider.
    pub identity_limits: crate::limits::LimitTable,
}

/// The operators' console (pgbouncer's admin database): who may log in to
/// it, under which database name.
#[derive(Clone)]
pub struct ConsoleConfig {
    /// The database name a client asks for to reach the console.
    pub database: String,
    /// Who may log in.
    pub users: Vec<ConsoleUser>,
}

/// One console user.
#[derive(Clone)]
pub struct ConsoleUser {
    /// The name given as the startup packet's `user`.
    pub name: String,
    /// The password (from the secrets file or the environment).
    pub password: String,
    /// What the user may run.
    pub access: ConsoleAccess,
}

/// What a console user may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleAccess {
    /// Every command (pgbouncer's `admin_users`).
    Admin,
    /// `SHOW` only (pgbouncer's `stats_users`).
    Stats,
}

impl ConsoleConfig {
    /// What `user` may run if `password` is theirs. Every user's password
    /// is compared, in constant time, found or not, so the time taken does
    /// not say which names exist.
    pub fn authenticate(&self, user: &str, password: &str) -> Option<ConsoleAccess> {
        let mut access = None;
        for candidate in &self.users {
            let same = aws_lc_rs::constant_time::verify_slices_are_equal(
                candidate.password.as_bytes(),
                password.as_bytes(),
            )
            .is_ok();
            if same && candidate.name == user {
                access = Some(candidate.access);
            }
        }
        access
    }
}

impl std::fmt::Debug for ConsoleConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let users: Vec<_> = self.users.iter().map(|u| (&u.name, u.access)).collect();
        f.debug_struct("ConsoleConfig")
            .field("database", &self.database)
            .field("users", &users)
            .finish()
    }
}

impl ProxyConfig {
    /// The pool mode of `database`.
    pub fn pool_mode_for(&self, database: &str) -> PoolMode {
        self.pool_mode_by_database
            .get(database)
            .copied()
            .unwrap_or(self.pool_mode)
    }

    /// The pool mode of an admitted client: its `[databases]` entry's, or
    /// its database's.
    pub fn pool_mode_of(&self, admitted: &crate::admission::Admitted) -> PoolMode {
        let name = admitted.destination.entry.as_deref();
        self.pool_mode_for(name.unwrap_or(&admitted.database))
    }

    /// Whether any database is pooled.
    pub fn pools(&self) -> bool {
        self.pool_mode != PoolMode::None
            || self
                .pool_mode_by_database
                .values()
                .any(|m| *m != PoolMode::None)
    }

    /// The proxy's password for `role` upstream.
    pub fn password(&self, role: &str) -> Option<&str> {
        self.admission
            .roles
            .get(role)
            .and_then(|role| role.password.as_deref())
    }
}
