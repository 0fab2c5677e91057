//! Failures of the proxy's own work on an upstream connection (logging
//! in, readying it, its own queries), classified like every other error.

use std::io;

use super::{Classify, ClientView, Severity, SqlState};
use crate::proto::login::LoginError;
use crate::proto::scram::ScramError;
use crate::proto::server_error::ServerError;

/// Why an upstream login, or an exchange the proxy ran, failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The server could not be reached.
    #[error("cannot connect to upstream {address}: {source}")]
    Connect {
        /// host:port tried.
        address: String,
        /// Cause.
        source: io::Error,
    },
    /// Connecting and logging in took longer than `connect_timeout`.
    #[error("upstream connect and login timed out")]
    ConnectTimeout,
    /// TLS is configured and the server does not offer it.
    #[error("upstream does not accept TLS")]
    TlsRefused,
    /// The configured host is not a name TLS can verify.
    #[error("upstream host {0:?} is not a valid TLS server name")]
    TlsName(String),
    /// The TLS handshake with the server failed (certificate, protocol).
    #[error("upstream TLS: {0}")]
    Tls(io::Error),
    /// The server refused the login.
    #[error("upstream refused login as {role:?}: {error}")]
    LoginRefused {
        /// Role we tried to log in as.
        role: String,
        /// What the server said.
        error: ServerError,
    },
    /// The server asked for an authentication method the proxy does not speak.
    #[error("upstream asked for unsupported authentication {0}")]
    UnsupportedAuth(&'static str),
    /// The server asked for a password and the proxy has none for the role.
    #[error("upstream wants a password for role {0:?}, and none is configured")]
    NoPassword(String),
    /// SCRAM failed: the server did not prove it knows the verifier, or
    /// refused the proxy's proof.
    #[error("upstream SCRAM: {0}")]
    Scram(ScramError),
    /// The connection failed mid-exchange.
    #[error("upstream I/O: {0}")]
    Io(#[from] io::Error),
    /// The server closed the connection.
    #[error("the upstream server closed the connection")]
    Closed,
    /// An exchange the proxy started did not finish before its deadline.
    #[error("the upstream server did not answer within the deadline")]
    Deadline,
    /// The server sent something out of the protocol.
    #[error("upstream protocol error: {0}")]
    Protocol(&'static str),
    /// A message was longer than its reader allows
    /// ([`Upstream::read_reply_within`](crate::Upstream::read_reply_within)):
    /// a result the client asked for, too large to buffer.
    #[error("an upstream message of {0} bytes is over the reader's limit")]
    MessageTooLong(usize),
    /// A message could not be encoded (text with a NUL byte).
    #[error("cannot encode the message for Postgres: {0}")]
    Encode(io::Error),
    /// Drawing or attaching the identity failed (auth schema missing or broken).
    #[error("attaching the identity failed: {0}")]
    Attach(ServerError),
    /// One of the client's startup settings was refused by the server.
    #[error("a startup setting was refused: {0}")]
    Setting(ServerError),
    /// Resetting the connection for its next user failed.
    #[error("resetting the connection failed: {0}")]
    Reset(ServerError),
    /// The login role carried session defaults a client set for it
    /// (`ALTER ROLE CURRENT_USER SET ...`); the proxy cleared them and
    /// closed the backend that started under them.
    #[error("login role {role:?} had session defaults of its own (cleared; the backend is closed)")]
    RoleDefaults {
        /// The login role.
        role: String,
    },
    /// Repairing the login role (its defaults or its password) failed.
    #[error("repairing the login role failed: {0}")]
    Repair(ServerError),
}

impl UpstreamError {
    /// The error of a failed login as `role`.
    pub(crate) fn login(role: &str, error: LoginError) -> Self {
        match error {
            LoginError::Refused(error) => Self::LoginRefused {
                role: role.to_owned(),
                error,
            },
            LoginError::UnsupportedAuth(method) => Self::UnsupportedAuth(method),
            LoginError::NoPassword => Self::NoPassword(role.to_owned()),
            LoginError::Scram(error) => Self::Scram(error),
            LoginError::Protocol(what) => Self::Protocol(what),
        }
    }

    /// Whether the failure is the connection's (it died while idle in a
    /// pool, it missed a deadline, its reset failed), so a request that has
    /// sent nothing of its client's yet can try another connection.
    pub fn worth_another_connection(&self) -> bool {
        matches!(
            self,
            Self::Io(_)
                | Self::Closed
                | Self::Deadline
                | Self::Reset(_)
                | Self::Protocol(_)
                | Self::RoleDefaults { .. }
        )
    }
}

impl Classify for UpstreamError {
    fn client_view(&self) -> Option<ClientView> {
        use SqlState as S;
        let unreachable = || {
            ClientView::new(
                S::UnableToConnect,
                "authgres could not reach the database server",
                None,
            )
        };
        match self {
            Self::Connect { .. } | Self::ConnectTimeout | Self::TlsRefused | Self::Tls(_) => {
                unreachable()
            }
            Self::TlsName(_) | Self::UnsupportedAuth(_) | Self::NoPassword(_) => ClientView::new(
                S::UnableToConnect,
                "authgres is not configured to log in to the database as this role",
                None,
            ),
            Self::Scram(_) => ClientView::new(
                S::UnableToConnect,
                "the database server failed authgres's SCRAM check",
                Some("is [upstream] pointing at the right server?"),
            ),
            Self::LoginRefused { role, error } => match error.code() {
                // Wrong proxy credentials are the operator's problem, not
                // the client's token: never answer 28P01 for them.
                "28P01" | "28000" => ClientView::new(
                    S::UnableToConnect,
                    format!(
                        "authgres could not log in to the database as \"{role}\": {}",
                        error.message()
                    ),
                    Some("the proxy's credentials for this role are wrong; run `authgres init-db`"),
                ),
                code => ClientView::new(S::from_server(code), error.message(), None),
            },
            Self::Io(_) | Self::Closed | Self::Deadline | Self::Protocol(_) | Self::Reset(_) => {
                ClientView::new(
                    S::ConnectionFailure,
                    "the database server connection failed",
                    None,
                )
            }
            Self::Encode(error) => ClientView::new(S::ProtocolViolation, error.to_string(), None),
            Self::RoleDefaults { .. } | Self::Repair(_) => ClientView::new(
                S::ConnectionFailure,
                "the database server connection failed",
                Some(
                    "a client changed the login role's defaults; authgres repairs them, try again",
                ),
            ),
            Self::MessageTooLong(_) => ClientView::new(
                S::from_server("54000"),
                "a result is larger than the proxy's response limit",
                None,
            ),
            Self::Attach(_) => ClientView::new(
                S::Internal,
                "authgres could not attach the identity to the session",
                Some("is the auth schema installed in this database? run `authgres init-db`"),
            ),
            // A bad client setting (an unknown DateStyle) is the client's
            // to see, as Postgres reports it at startup.
            Self::Setting(error) => {
                ClientView::new(S::from_server(error.code()), error.message(), None)
            }
        }
    }

    fn severity(&self) -> Severity {
        match self {
            Self::LoginRefused { error, .. } if error.code() == "3D000" => Severity::Client,
            Self::Encode(_) | Self::Setting(_) | Self::MessageTooLong(_) => Severity::Client,
            Self::Connect { .. }
            | Self::ConnectTimeout
            | Self::TlsRefused
            | Self::TlsName(_)
            | Self::Tls(_)
            | Self::LoginRefused { .. }
            | Self::UnsupportedAuth(_)
            | Self::NoPassword(_)
            | Self::Scram(_)
            | Self::Io(_)
            | Self::Closed
            | Self::Deadline
            | Self::Protocol(_)
            | Self::Attach(_)
            | Self::Reset(_)
            | Self::RoleDefaults { .. }
            | Self::Repair(_) => Severity::Service,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Connect { .. } => "upstream_unreachable",
            Self::ConnectTimeout => "upstream_connect_timeout",
            Self::TlsRefused | Self::TlsName(_) | Self::Tls(_) => "upstream_tls",
            Self::LoginRefused { .. } => "upstream_login_refused",
            Self::UnsupportedAuth(_) | Self::NoPassword(_) => "upstream_auth_config",
            Self::Scram(_) => "upstream_scram",
            Self::Io(_) | Self::Closed => "upstream_connection_lost",
            Self::Deadline => "upstream_deadline",
            Self::Protocol(_) => "upstream_protocol",
            Self::Encode(_) => "encode",
            Self::MessageTooLong(_) => "upstream_message_too_long",
            Self::Attach(_) => "identity_attach",
            Self::Setting(_) => "client_setting",
            Self::Reset(_) => "upstream_reset",
            Self::RoleDefaults { .. } => "upstream_role_defaults",
            Self::Repair(_) => "upstream_role_repair",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_credentials_problems_never_look_like_a_bad_token() {
        let refused = UpstreamError::LoginRefused {
            role: "authenticated".into(),
            error: ServerError::parse(b"C28P01\0Mpassword authentication failed\0\0"),
        };
        let view = refused.client_view().expect("a view");
        assert_eq!(view.code, SqlState::UnableToConnect);
        assert_eq!(refused.severity(), Severity::Service);
        let missing_db = UpstreamError::LoginRefused {
            role: "authenticated".into(),
            error: ServerError::parse(b"C3D000\0Mdatabase \"x\" does not exist\0\0"),
        };
        assert_eq!(
            missing_db.client_view().map(|v| v.code),
            Some(SqlState::from_server("3D000"))
        );
        assert_eq!(missing_db.severity(), Severity::Client);
    }

    #[test]
    fn addresses_stay_in_the_log() {
        let error = UpstreamError::Connect {
            address: "10.1.2.3:5432".into(),
            source: io::ErrorKind::ConnectionRefused.into(),
        };
        let view = error.client_view().expect("a view");
        assert!(!view.message.contains("10.1.2.3"));
        assert!(error.to_string().contains("10.1.2.3"));
    }

    #[test]
    fn server_codes_are_relayed_only_when_well_formed() {
        assert_eq!(SqlState::from_server("53300").code(), "53300");
        assert_eq!(SqlState::from_server("5330").code(), "XX000");
        assert_eq!(SqlState::from_server("53\"00").code(), "XX000");
    }
}
