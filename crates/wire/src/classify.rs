//! The classification every error of the crate gets: what a client is
//! told (a SQLSTATE and words, [`ClientView`]), how loudly it is logged
//! ([`Severity`]) and the label it is counted under ([`Classify`]). The
//! errors themselves live beside what fails ([`crate::error`],
//! `admission::Refusal`); this is the vocabulary they share.

/// The SQLSTATEs authgres sends itself.
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
    /// `53400` configuration_limit_exceeded: a limit per identity.
    ConfigurationLimitExceeded,
    /// `08P01` protocol_violation.
    ProtocolViolation,
    /// `08006` connection_failure: the upstream went away.
    ConnectionFailure,
    /// `08001` sqlclient_unable_to_establish_sqlconnection: upstream unreachable.
    UnableToConnect,
    /// `0A000` feature_not_supported.
    FeatureNotSupported,
    /// `42501` insufficient_privilege.
    InsufficientPrivilege,
    /// `57P01` admin_shutdown: the proxy is shutting down.
    AdminShutdown,
    /// `25P03` idle_in_transaction_session_timeout.
    IdleInTransactionTimeout,
    /// `42601` syntax_error: a console command not understood.
    SyntaxError,
    /// `22023` invalid_parameter_value: a console command's argument.
    InvalidParameterValue,
    /// `57P03` cannot_connect_now: the database is disabled.
    CannotConnectNow,
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
            Self::ConfigurationLimitExceeded => "53400",
            Self::ProtocolViolation => "08P01",
            Self::ConnectionFailure => "08006",
            Self::UnableToConnect => "08001",
            Self::FeatureNotSupported => "0A000",
            Self::InsufficientPrivilege => "42501",
            Self::AdminShutdown => "57P01",
            Self::IdleInTransactionTimeout => "25P03",
            Self::SyntaxError => "42601",
            Self::InvalidParameterValue => "22023",
            Self::CannotConnectNow => "57P03",
            Self::Internal => "XX000",
            Self::Upstream(code) => std::str::from_utf8(code).unwrap_or("XX000"),
        }
    }

    /// A code the server reported, if it is five ASCII alphanumerics.
    pub fn from_server(code: &str) -> Self {
        match <[u8; 5]>::try_from(code.as_bytes()) {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_alphanumeric) => Self::Upstream(bytes),
            _ => Self::Internal,
        }
    }
}

/// The part of an error a client may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientView {
    /// SQLSTATE sent in the ErrorResponse.
    pub code: SqlState,
    /// What went wrong, in the client's terms.
    pub message: String,
    /// What to do about it, when we can say.
    pub hint: Option<&'static str>,
}

impl ClientView {
    pub(crate) fn new(
        code: SqlState,
        message: impl Into<String>,
        hint: Option<&'static str>,
    ) -> Option<Self> {
        Some(Self {
            code,
            message: message.into(),
            hint,
        })
    }
}

/// How loudly an error is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Part of normal operation (a client hung up, a token expired):
    /// debug.
    Routine,
    /// A client's mistake or an attack, refused: info, rate-limited.
    Client,
    /// A fault the operator should look at (the database unreachable, the
    /// proxy misconfigured, a pool exhausted): warn.
    Service,
}

/// What the classification of an error decides.
pub trait Classify {
    /// What the client is told, if anything (`None`: the connection just
    /// closes, as when the client is gone).
    fn client_view(&self) -> Option<ClientView>;
    /// How loudly it is logged.
    fn severity(&self) -> Severity;
    /// The label it is counted under (a Prometheus label value).
    fn label(&self) -> &'static str;
}
