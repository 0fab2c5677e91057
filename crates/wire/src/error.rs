//! What a client is told when its connection is refused, and why.
//!
//! [`SessionError`] names every way a session can fail. Its
//! [`SessionError::client_view`] is an exhaustive `match`: a new variant must
//! decide its SQLSTATE and the words a client may see, so internal details
//! (upstream addresses, provider responses) and tokens never leak.

use std::io;

use authgres_jwt::{FailureClass, VerifyError};

use crate::frontend::FrameError;
use crate::upstream::UpstreamError;

/// The SQLSTATEs authgres sends itself (see DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SqlState {
    /// `28P01` invalid_password: the token did not verify.
    InvalidPassword,
    /// `28000` invalid_authorization_specification: role not allowed, token missing.
    InvalidAuthorization,
    /// `3D000` invalid_catalog_name: database not served.
    UnknownDatabase,
    /// `53300` too_many_connections.
    TooManyConnections,
    /// `08P01` protocol_violation.
    ProtocolViolation,
    /// `08006` connection_failure: upstream went away during the handshake.
    ConnectionFailure,
    /// `08001` sqlclient_unable_to_establish_sqlconnection: upstream unreachable.
    UnableToConnect,
    /// `0A000` feature_not_supported.
    FeatureNotSupported,
    /// `42501` insufficient_privilege.
    InsufficientPrivilege,
    /// `XX000` internal_error.
    Internal,
    /// A code relayed from the upstream server as is (five ASCII characters).
    Upstream([u8; 5]),
}

impl SqlState {
    /// The five-character code.
    pub fn code(&self) -> &str {
        match self {
            Self::InvalidPassword => "28P01",
            Self::InvalidAuthorization => "28000",
            Self::UnknownDatabase => "3D000",
            Self::TooManyConnections => "53300",
            Self::ProtocolViolation => "08P01",
            Self::ConnectionFailure => "08006",
            Self::UnableToConnect => "08001",
            Self::FeatureNotSupported => "0A000",
            Self::InsufficientPrivilege => "42501",
            Self::Internal => "XX000",
            Self::Upstream(code) => std::str::from_utf8(code).unwrap_or("XX000"),
        }
    }
}

/// Every reason a client session ends before or instead of relaying.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The client's bytes broke the protocol.
    #[error("protocol violation: {0}")]
    Frame(#[from] FrameError),
    /// Plaintext arrived after SSLRequest, before the TLS handshake.
    #[error("data arrived after SSLRequest before the TLS handshake")]
    DataBeforeTls,
    /// The client connected with direct TLS but did not offer ALPN "postgresql".
    #[error("direct TLS without ALPN \"postgresql\"")]
    MissingAlpn,
    /// TLS handshake failed.
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
    /// The client asked for TLS where none is configured, then kept talking.
    #[error("startup message missing the user parameter")]
    MissingUser,
    /// The startup asked for a replication connection.
    #[error("replication connections are not supported")]
    Replication,
    /// A startup option tried to set a protected setting.
    #[error("startup parameter {0:?} is not allowed")]
    ForbiddenParameter(String),
    /// The role is not one the proxy serves.
    #[error("role {0:?} is not served by this proxy")]
    UnknownRole(String),
    /// The database is not one the proxy serves.
    #[error("database {0:?} is not served by this proxy")]
    UnknownDatabase(String),
    /// The role needs a token and the client sent an empty password.
    #[error("no token given for role {0:?}")]
    MissingToken(String),
    /// Cleartext (non-TLS) login of a token role from a non-loopback peer.
    #[error("token login over an unencrypted connection refused")]
    CleartextRefused,
    /// The token did not verify or may not log in as the role.
    #[error("token rejected: {0}")]
    Token(#[from] VerifyError),
    /// The client did not finish the handshake in time.
    #[error("client did not authenticate within {0:?}")]
    AuthTimeout(std::time::Duration),
    /// Too many client connections.
    #[error("too many client connections")]
    TooManyConnections,
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
        waited: std::time::Duration,
    },
    /// The session's token expired and expiry is enforced.
    #[error("the session's token expired")]
    TokenExpired,
    /// Logging in upstream or attaching the identity failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// The client connection failed.
    #[error("client I/O: {0}")]
    ClientIo(#[from] io::Error),
}

/// The part of an error a client may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientView {
    /// SQLSTATE sent in the ErrorResponse.
    pub code: SqlState,
    /// Message: what went wrong, in the client's terms.
    pub message: String,
    /// What to do about it, when we can say.
    pub hint: Option<&'static str>,
}

impl SessionError {
    /// What the client is told. Exhaustive on purpose: see the module doc.
    pub fn client_view(&self) -> Option<ClientView> {
        use SqlState as S;
        let view = |code, message: String, hint| {
            Some(ClientView {
                code,
                message,
                hint,
            })
        };
        match self {
            Self::Frame(error) => view(S::ProtocolViolation, error.to_string(), None),
            Self::DataBeforeTls => view(
                S::ProtocolViolation,
                "received unencrypted data after SSL request".into(),
                None,
            ),
            Self::MissingAlpn => None,
            Self::Tls(_) => None,
            Self::MissingUser => view(
                S::InvalidAuthorization,
                "no PostgreSQL user name specified in startup packet".into(),
                Some("connect as user \"authenticated\" with your token as the password"),
            ),
            Self::Replication => view(
                S::FeatureNotSupported,
                "replication connections are not supported by authgres".into(),
                None,
            ),
            Self::ForbiddenParameter(name) => view(
                S::InsufficientPrivilege,
                format!("startup parameter \"{name}\" may not be set through authgres"),
                Some("remove it from the connection options"),
            ),
            Self::UnknownRole(role) => view(
                S::InvalidAuthorization,
                format!("role \"{role}\" is not served by this proxy"),
                Some(
                    "connect as one of the roles in the proxy's [roles] configuration, e.g. \"authenticated\"",
                ),
            ),
            Self::UnknownDatabase(db) => view(
                S::UnknownDatabase,
                format!("database \"{db}\" is not served by this proxy"),
                None,
            ),
            Self::MissingToken(role) => view(
                S::InvalidAuthorization,
                format!("role \"{role}\" requires a token: send your JWT as the password"),
                None,
            ),
            Self::CleartextRefused => view(
                S::InvalidAuthorization,
                "token logins must use TLS from non-loopback addresses".into(),
                Some("connect with sslmode=require"),
            ),
            Self::Token(error) => token_view(error),
            Self::AuthTimeout(_) => view(
                S::ProtocolViolation,
                "authentication timed out: no password was sent".into(),
                None,
            ),
            Self::TooManyConnections => view(
                S::TooManyConnections,
                "sorry, too many clients already".into(),
                None,
            ),
            Self::PoolExhausted { waited, .. } => view(
                S::TooManyConnections,
                format!(
                    "no database connection became free within {}s",
                    waited.as_secs_f64()
                ),
                Some("the pool for this database and role is busy; raise pool_size or retry"),
            ),
            Self::TokenExpired => view(
                S::InvalidPassword,
                "the session's token expired".into(),
                Some("reconnect with a fresh token"),
            ),
            Self::Upstream(error) => Some(error.client_view()),
            Self::ClientIo(_) => None,
        }
    }
}

fn token_view(error: &VerifyError) -> Option<ClientView> {
    use SqlState as S;
    let (code, hint) = match error.class() {
        FailureClass::BadToken => (
            S::InvalidPassword,
            Some("get a fresh token from your identity provider and use it as the password"),
        ),
        FailureClass::RoleNotAllowed => (S::InvalidAuthorization, None),
        FailureClass::KeysUnavailable => (
            S::UnableToConnect,
            Some("the identity provider's keys could not be fetched; try again shortly"),
        ),
    };
    Some(ClientView {
        code,
        message: error.to_string(),
        hint,
    })
}
