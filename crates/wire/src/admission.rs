//! Who may log in, decided once for every transport: the Postgres protocol
//! over TCP, TLS and WebSocket, and `/sql`.
//!
//! [`check`] is pure: from the policy and what the client asked for (role,
//! database, where it connects from, whether the transport is encrypted)
//! it decides whether a token is needed, before the client is asked for
//! one, so a token is never requested over a connection it may not travel
//! on. [`admit`] then verifies the token (the one step that may wait, for
//! a provider's keys) against `now` and resolves the login role, which a
//! provider's `role_claim` may choose. Refusals are classified once
//! ([`Refusal`]); each transport words them in its own terms.

use std::net::IpAddr;
use std::time::SystemTime;

use authgres_jwt::{FailureClass, Identity, LastToken, Verifier, VerifyError};

use crate::classify::{Classify, ClientView, Severity, SqlState};
use crate::config::{CleartextTokens, Policy};
use crate::metrics::Metrics;
use crate::routing::{self, Destination, NoRoute};
use crate::transport::Transport;

/// What a client asks for.
#[derive(Debug, Clone, Copy)]
pub struct LoginRequest<'a> {
    /// The role (the startup packet's `user`).
    pub role: &'a str,
    /// The database.
    pub database: &'a str,
    /// Where the client connects from.
    pub peer: IpAddr,
    /// The load balancer that relayed the connection, when a PROXY header
    /// named `peer`: a token travels in cleartext from loopback only if it
    /// never left the host, on the client's leg or the balancer's.
    pub relayed_by: Option<IpAddr>,
    /// Whether the transport is encrypted.
    pub encrypted: bool,
    /// Which transport it came over.
    pub transport: Transport,
}

/// What admission needs from the client to decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: the role is anonymous.
    Nothing,
    /// A token.
    Token,
}

/// A client admitted to log in.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The role to log in upstream as (the requested one, or the one the
    /// token's `role_claim` chose).
    pub role: String,
    /// The database on the server (the requested one, or where its
    /// `[databases]` entry sends this client's tenant).
    pub database: String,
    /// The server and the entry that chose it.
    pub destination: Destination,
    /// The verified identity; `None` for an anonymous role.
    pub identity: Option<Identity>,
}

/// Why a client may not log in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The role is not one the proxy serves.
    #[error("role {0:?} is not served by this proxy")]
    UnknownRole(String),
    /// The database is not one the proxy serves.
    #[error("database {0:?} is not served by this proxy")]
    UnknownDatabase(String),
    /// A token would travel unencrypted from a peer that may not send one so.
    #[error("token login over an unencrypted connection refused")]
    CleartextRefused(Transport),
    /// As [`Refusal::CleartextRefused`], on a Postgres listener that has
    /// no certificate: the client cannot fix it, the operator must.
    #[error("token login over an unencrypted connection refused, and the listener has no TLS")]
    TlsNotConfigured,
    /// The role needs a token and none was given.
    #[error("no token given for role {0:?}")]
    MissingToken(String, Transport),
    /// The token did not verify, or may not log in as the role. Logged
    /// with its [`VerifyError::diagnosis`]; the client sees only the
    /// error's own words.
    #[error("token rejected: {error}{detail}", error = .0, detail = diagnosis(.0))]
    Token(VerifyError),
    /// The token's `role_claim` names a role the proxy does not serve.
    #[error("the token's role {0:?} is not served by this proxy")]
    ClaimedRoleNotServed(String),
    /// The database is chosen by tenant, and this client's has none.
    #[error(transparent)]
    NoRoute(#[from] NoRoute),
}

/// Whether a secret (a token, a console password) may travel from `peer`
/// (relayed by `relayed_by`) over this connection.
pub fn cleartext_allowed(
    policy: &Policy,
    peer: IpAddr,
    relayed_by: Option<IpAddr>,
    encrypted: bool,
) -> bool {
    encrypted
        || match policy.cleartext_tokens {
            CleartextTokens::Allow => true,
            CleartextTokens::LoopbackOnly => {
                peer.is_loopback() && relayed_by.is_none_or(|b| b.is_loopback())
            }
            CleartextTokens::Refuse => false,
        }
}

/// `error`'s diagnosis for the log, after a "; ".
fn diagnosis(error: &VerifyError) -> String {
    error
        .diagnosis()
        .map_or_else(String::new, |diagnosis| format!("; {diagnosis}"))
}

/// Decides whether `request` may go on, and whether it needs a token.
pub fn check(policy: &Policy, request: &LoginRequest<'_>) -> Result<Need, Refusal> {
    let role = policy
        .roles
        .get(request.role)
        .ok_or_else(|| Refusal::UnknownRole(request.role.to_owned()))?;
    if !policy.serves_database(request.database) {
        return Err(Refusal::UnknownDatabase(request.database.to_owned()));
    }
    if !role.requires_token {
        return Ok(Need::Nothing);
    }
    if !cleartext_allowed(policy, request.peer, request.relayed_by, request.encrypted) {
        if request.transport == Transport::Wire && !policy.tls_offered {
            return Err(Refusal::TlsNotConfigured);
        }
        return Err(Refusal::CleartextRefused(request.transport));
    }
    Ok(Need::Token)
}

/// Admits `request` with `token` (ignored for anonymous roles), verified
/// at `now` (first against `last`, when given, the token the same
/// connection presented before: see [`LastToken`]); the verification's time
/// goes to `metrics`.
pub async fn admit(
    policy: &Policy,
    verifier: &Verifier,
    metrics: &Metrics,
    request: &LoginRequest<'_>,
    token: Option<&str>,
    last: Option<&mut LastToken>,
    now: SystemTime,
) -> Result<Admitted, Refusal> {
    let admitted = |role: &str, identity: Option<Identity>| {
        let tenant = identity.as_ref().and_then(|i| i.tenant.as_deref());
        let (database, destination) = routing::route(&policy.routes, request.database, tenant)?;
        Ok(Admitted {
            role: role.to_owned(),
            database,
            destination,
            identity,
        })
    };
    if check(policy, request)? == Need::Nothing {
        return admitted(request.role, None);
    }
    let token = token
        .filter(|token| !token.is_empty())
        .ok_or_else(|| Refusal::MissingToken(request.role.to_owned(), request.transport))?;
    let started = std::time::Instant::now();
    let verified = (verifier.verify_remembering(token, request.role, now, last)).await;
    metrics.verification(started.elapsed(), verified.is_ok());
    match &verified {
        Ok(identity) => metrics.token(Some(&identity.provider), Ok(())),
        Err(error) => metrics.token(verifier.provider_of(token).as_deref(), Err(error)),
    }
    let identity = verified.map_err(Refusal::Token)?;
    if identity.role != request.role && !policy.roles.contains_key(&identity.role) {
        return Err(Refusal::ClaimedRoleNotServed(identity.role));
    }
    let role = identity.role.clone();
    admitted(&role, Some(identity))
}

impl Classify for Refusal {
    fn client_view(&self) -> Option<ClientView> {
        use SqlState as S;
        let view = |code, message: String, hint| {
            Some(ClientView {
                code,
                message,
                hint,
            })
        };
        match self {
            Self::UnknownRole(role) | Self::ClaimedRoleNotServed(role) => view(
                S::InvalidAuthorization,
                format!("role \"{role}\" is not served by this proxy"),
                Some(
                    "connect as one of the roles in the proxy's [roles] configuration, e.g. \"authenticated\"",
                ),
            ),
            Self::NoRoute(NoRoute::NotServed { database }) => view(
                S::UnknownDatabase,
                format!("database \"{database}\" is not served by this proxy"),
                None,
            ),
            Self::NoRoute(no_route) => view(
                S::InvalidAuthorization,
                no_route.to_string(),
                Some(
                    "the database is chosen by the token's tenant claim: sign in to an organization this proxy routes",
                ),
            ),
            Self::UnknownDatabase(db) => view(
                S::UnknownDatabase,
                format!("database \"{db}\" is not served by this proxy"),
                None,
            ),
            Self::CleartextRefused(Transport::Http) => view(
                S::InvalidAuthorization,
                "token logins must use HTTPS from non-loopback addresses".into(),
                None,
            ),
            Self::CleartextRefused(_) => view(
                S::InvalidAuthorization,
                "token logins must use TLS from non-loopback addresses".into(),
                Some("connect with sslmode=require"),
            ),
            Self::TlsNotConfigured => view(
                S::InvalidAuthorization,
                "token logins must use TLS from non-loopback addresses, and this proxy has no \
                 TLS certificate"
                    .into(),
                Some(
                    "the proxy's operator must set [listen] tls_cert and tls_key (sslmode=require \
                     cannot work until then)",
                ),
            ),
            Self::MissingToken(role, Transport::Http) => view(
                S::InvalidAuthorization,
                format!("role \"{role}\" requires a token: send Authorization: Bearer <jwt>"),
                None,
            ),
            Self::MissingToken(role, _) => view(
                S::InvalidAuthorization,
                format!("role \"{role}\" requires a token: send your JWT as the password"),
                None,
            ),
            Self::Token(error) => {
                let (code, hint) = match error.class() {
                    FailureClass::BadToken => (
                        S::InvalidPassword,
                        // Worded for every login: a password, OAUTHBEARER
                        // or an Authorization header.
                        Some("get a fresh token from your identity provider"),
                    ),
                    FailureClass::RoleNotAllowed => (S::InvalidAuthorization, None),
                    FailureClass::KeysUnavailable => (
                        S::UnableToConnect,
                        Some(
                            "the identity provider's keys could not be fetched; try again shortly",
                        ),
                    ),
                };
                view(code, error.to_string(), hint)
            }
        }
    }

    fn severity(&self) -> Severity {
        match self {
            Self::Token(error) if error.class() == FailureClass::KeysUnavailable => {
                Severity::Service
            }
            Self::UnknownRole(_)
            | Self::UnknownDatabase(_)
            | Self::CleartextRefused(_)
            | Self::TlsNotConfigured
            | Self::MissingToken(..)
            | Self::Token(_)
            | Self::ClaimedRoleNotServed(_)
            | Self::NoRoute(_) => Severity::Client,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::UnknownRole(_) => "unknown_role",
            Self::UnknownDatabase(_) => "unknown_database",
            Self::CleartextRefused(_) | Self::TlsNotConfigured => "cleartext_refused",
            Self::MissingToken(..) => "missing_token",
            Self::ClaimedRoleNotServed(_) => "claimed_role_not_served",
            Self::NoRoute(NoRoute::NotServed { .. }) => "unknown_database",
            Self::NoRoute(NoRoute::NoTenant { .. }) => "no_tenant",
            Self::NoRoute(NoRoute::UnknownTenant { .. }) => "unknown_tenant",
            // Each way a token fails apart: expired, bad_signature,
            // unknown_issuer, wrong_audience, ... (issue 24).
            Self::Token(error) => error.reason(),
        }
    }
}

#[cfg(test)]
mod tests;
