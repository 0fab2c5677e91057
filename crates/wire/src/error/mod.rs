//! Every way a session can fail, and one classification of each.
//!
//! [`Classify`] decides, by an exhaustive `match` per error type, three
//! things at once: what the client is told ([`ClientView`]: a SQLSTATE and
//! words that never carry upstream addresses, provider responses or
//! tokens), how loudly it is logged ([`Severity`]: a client's mistake is
//! not a service fault), and the label it is counted under. A new variant
//! does not compile until it is classified.

use std::io;
use std::time::Duration;

use crate::admission::Refusal;
use crate::proto::ledger::Violation;
use crate::proto::negotiate;
use crate::proto::startup::FrameError;
use crate::proxied::HeaderRefusal;

mod upstream;

pub use crate::classify::{Classify, ClientView, Severity, SqlState};
pub use upstream::UpstreamError;

/// How a client broke the protocol.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolViolation {
    /// A startup-phase packet could not be parsed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The transport negotiation was refused.
    #[error(transparent)]
    Negotiation(#[from] negotiate::NegotiationRefusal),
    /// A message the relay must not forward.
    #[error(transparent)]
    Relay(#[from] Violation),
    /// An OAUTHBEARER message could not be read.
    #[error(transparent)]
    OAuth(#[from] crate::proto::oauthbearer::Malformed),
    /// The client chose a SASL mechanism it was not offered.
    #[error("SASL mechanism {0:?} was not offered (expected OAUTHBEARER)")]
    SaslMechanism(String),
    /// A console message too large, too small, or not UTF-8.
    #[error("console message of {0} bytes refused (at most 64 KiB of UTF-8 text)")]
    ConsoleMessage(usize),
}

/// Every reason a client session ends before or instead of relaying.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The client's bytes broke the protocol.
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolViolation),
    /// The client connected with direct TLS but did not offer ALPN "postgresql".
    #[error("direct TLS without ALPN \"postgresql\"")]
    MissingAlpn,
    /// The TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// The startup message names no user.
    #[error("startup message missing the user parameter")]
    MissingUser,
    /// A console login with an unknown user or a wrong password.
    #[error("console login refused for user {0:?}")]
    ConsoleLogin(String),
    /// The console's DISABLE holds the database shut to new logins.
    #[error("database {0:?} is disabled")]
    DatabaseDisabled(String),
    /// The startup asked for a replication connection.
    #[error("replication connections are not supported")]
    Replication,
    /// A startup parameter tried to set a protected setting.
    #[error("startup parameter {0:?} is not allowed")]
    ForbiddenParameter(String),
    /// Admission refused the client.
    #[error("{0}")]
    Refused(#[from] Refusal),
    /// An OAUTHBEARER client asked where to get a token and was told: it
    /// fetches one and connects again.
    #[error("OAuth client for role {0:?} was sent to the issuer for a token")]
    OAuthDiscovery(String),
    /// The client did not finish the handshake in time.
    #[error("client did not authenticate within {0:?}")]
    AuthTimeout(Duration),
    /// Too many client connections.
    #[error("too many client connections")]
    TooManyConnections,
    /// A peer in `proxy_protocol_from` did not begin with a PROXY protocol
    /// v2 header we accept.
    #[error(transparent)]
    ProxyHeader(HeaderRefusal),
    /// Every pooled connection for the client's database and role stayed
    /// busy for the whole checkout timeout.
    #[error(
        "no upstream connection for database {database:?} role {role:?} became free within {waited:?}"
    )]
    PoolExhausted {
        /// Database asked for.
        database: String,
        /// Role asked for.
        role: String,
        /// The checkout timeout.
        waited: Duration,
    },
    /// The client's user or tenant is at a limit per identity.
    #[error(transparent)]
    IdentityLimit(#[from] crate::limits::LimitRefusal),
    /// The session's token expired and expiry is enforced.
    #[error("the session's token expired")]
    TokenExpired,
    /// The proxy is shutting down: the session was closed at a transaction
    /// boundary, or when the drain ran out of time.
    #[error("the proxy is shutting down")]
    ShuttingDown,
    /// The client sat idle inside a transaction past the limit.
    #[error("the client was idle inside a transaction for {0:?}")]
    IdleInTransaction(Duration),
    /// The client left results unread past the limit.
    #[error("the client did not read its results for {0:?}")]
    ClientStalled(Duration),
    /// Transaction pooling could not read the session state a transaction
    /// left (its settings, prepared statements, identity): the client's
    /// next transaction would have run without them, so the session ends.
    #[error("the session's state could not be read after a transaction: {0}")]
    SessionStateLost(#[source] UpstreamError),
    /// Logging in upstream or readying the connection failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The client connection failed.
    #[error("client I/O: {0}")]
    ClientIo(#[source] io::Error),
}

impl From<crate::relay::RelayError> for SessionError {
    /// A relay's I/O failure is the client's or the backend's, by the side
    /// that failed: a lost backend reaches the operator as one.
    fn from(error: crate::relay::RelayError) -> Self {
        match error {
            crate::relay::RelayError::Client(error) => Self::ClientIo(error),
            crate::relay::RelayError::Upstream(error) => Self::Upstream(UpstreamError::Io(error)),
        }
    }
}

impl Classify for SessionError {
    // A flat match, one arm per variant, longer than a function should be:
    // every message a client can be told about its session reads here, in
    // one place, and a new variant does not compile until it has one.
    fn client_view(&self) -> Option<ClientView> {
        use SqlState as S;
        match self {
            Self::Protocol(ProtocolViolation::Negotiation(
                negotiate::NegotiationRefusal::DataBeforeEncryption,
            )) => ClientView::new(
                S::ProtocolViolation,
                "received unencrypted data after SSL request",
                None,
            ),
            Self::Protocol(violation) => {
                ClientView::new(S::ProtocolViolation, violation.to_string(), None)
            }
            Self::MissingAlpn | Self::Tls(_) | Self::ClientIo(_) => None,
            Self::MissingUser => ClientView::new(
                S::InvalidAuthorization,
                "no PostgreSQL user name specified in startup packet",
                Some("connect as user \"authenticated\" with your token as the password"),
            ),
            Self::ConsoleLogin(user) => ClientView::new(
                S::InvalidPassword,
                format!("password authentication failed for user \"{user}\""),
                None,
            ),
            Self::DatabaseDisabled(database) => ClientView::new(
                S::CannotConnectNow,
                format!("database \"{database}\" does not allow connections now"),
                Some("an operator disabled it (the console's DISABLE): try again later"),
            ),
            Self::Replication => ClientView::new(
                S::FeatureNotSupported,
                "replication connections are not supported by authgres",
                None,
            ),
            Self::ForbiddenParameter(name) => ClientView::new(
                S::InsufficientPrivilege,
                format!("startup parameter \"{name}\" may not be set through authgres"),
                Some("remove it from the connection options"),
            ),
            Self::Refused(refusal) => refusal.client_view(),
            Self::IdentityLimit(refusal) => refusal.client_view(),
            Self::OAuthDiscovery(role) => ClientView::new(
                S::InvalidAuthorization,
                format!("OAuth bearer authentication failed for user \"{role}\""),
                None,
            ),
            Self::AuthTimeout(_) => ClientView::new(
                S::ProtocolViolation,
                "authentication timed out: no password was sent",
                None,
            ),
            Self::TooManyConnections | Self::ProxyHeader(HeaderRefusal::Busy) => ClientView::new(
                S::TooManyConnections,
                "sorry, too many clients already",
                None,
            ),
            Self::ProxyHeader(HeaderRefusal::Closed | HeaderRefusal::Io(_)) => None,
            Self::ProxyHeader(refusal) => ClientView::new(
                S::ProtocolViolation,
                refusal.to_string(),
                Some(
                    "this address is in the proxy's proxy_protocol_from: connect through the load \
                     balancer, or have it send PROXY protocol v2 (HAProxy: send-proxy-v2)",
                ),
            ),
            Self::PoolExhausted { waited, .. } => ClientView::new(
                S::TooManyConnections,
                format!(
                    "no database connection became free within {}s",
                    waited.as_secs_f64()
                ),
                Some("the pool for this database and role is busy; raise pool_size or retry"),
            ),
            Self::ShuttingDown => ClientView::new(
                S::AdminShutdown,
                "terminating connection due to administrator command",
                Some("the proxy is restarting or shutting down: reconnect"),
            ),
            Self::TokenExpired => ClientView::new(
                S::InvalidPassword,
                "the session's token expired",
                Some("reconnect with a fresh token"),
            ),
            Self::IdleInTransaction(limit) => ClientView::new(
                S::IdleInTransactionTimeout,
                format!(
                    "terminating connection: idle inside a transaction for {}s",
                    limit.as_secs_f64()
                ),
                Some("commit or roll back promptly; the limit is idle_transaction_timeout"),
            ),
            Self::ClientStalled(limit) => ClientView::new(
                S::ConnectionFailure,
                format!(
                    "terminating connection: results unread for {}s",
                    limit.as_secs_f64()
                ),
                None,
            ),
            Self::SessionStateLost(_) => ClientView::new(
                S::ConnectionFailure,
                "terminating connection: the session's settings could not be carried to its \
                 next transaction",
                Some("reconnect; the proxy's log says why the server did not answer"),
            ),
            Self::Upstream(error) => error.client_view(),
        }
    }

    fn severity(&self) -> Severity {
        match self {
            Self::TokenExpired
            | Self::ShuttingDown
            | Self::OAuthDiscovery(_)
            | Self::ClientIo(_) => Severity::Routine,
            Self::Protocol(_)
            | Self::MissingAlpn
            | Self::Tls(_)
            | Self::MissingUser
            | Self::ConsoleLogin(_)
            | Self::Replication
            | Self::ForbiddenParameter(_)
            | Self::AuthTimeout(_)
            | Self::IdleInTransaction(_)
            | Self::ClientStalled(_) => Severity::Client,
            Self::TooManyConnections
            | Self::DatabaseDisabled(_)
            | Self::PoolExhausted { .. }
            | Self::ProxyHeader(HeaderRefusal::Busy) => Severity::Service,
            Self::ProxyHeader(HeaderRefusal::Closed | HeaderRefusal::Io(_)) => Severity::Routine,
            Self::ProxyHeader(_) => Severity::Client,
            Self::Refused(refusal) => refusal.severity(),
            Self::IdentityLimit(refusal) => refusal.severity(),
            Self::SessionStateLost(error) | Self::Upstream(error) => error.severity(),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Protocol(_) => "protocol_violation",
            Self::MissingAlpn => "tls_alpn",
            Self::Tls(_) => "tls_handshake",
            Self::MissingUser => "missing_user",
            Self::ConsoleLogin(_) => "console_login",
            Self::DatabaseDisabled(_) => "database_disabled",
            Self::Replication => "replication",
            Self::ForbiddenParameter(_) => "forbidden_parameter",
            Self::Refused(refusal) => refusal.label(),
            Self::IdentityLimit(refusal) => refusal.label(),
            Self::OAuthDiscovery(_) => "oauth_discovery",
            Self::AuthTimeout(_) => "auth_timeout",
            Self::TooManyConnections => "too_many_connections",
            Self::ProxyHeader(_) => "proxy_header",
            Self::PoolExhausted { .. } => "pool_exhausted",
            Self::TokenExpired => "token_expired",
            Self::ShuttingDown => "shutting_down",
            Self::IdleInTransaction(_) => "idle_in_transaction",
            Self::ClientStalled(_) => "client_stalled",
            Self::SessionStateLost(_) => "session_state_lost",
            Self::Upstream(error) => error.label(),
            Self::ClientIo(_) => "client_io",
        }
    }
}
