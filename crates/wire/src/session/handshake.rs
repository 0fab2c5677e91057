//! From the StartupMessage to ReadyForQuery: the protocol version, the
//! startup parameters, admission (asking for the token only where it may
//! travel), and, once an upstream connection is leased, the greeting with
//! the proxy's own cancel key.

use std::sync::Arc;
use std::time::SystemTime;

use authgres_jwt::VerifyError;
use bytes::BytesMut;
use tokio::io::AsyncReadExt as _;

use super::{ClientIo, Session, write_flush};
use crate::admission::{self, Admitted, Need, Refusal};
use crate::config::TokenLogin;
use crate::error::{ProtocolViolation, SessionError};
use crate::params;
use crate::proto::backend;
use crate::proto::negotiate::Startup;
use crate::proto::oauthbearer;
use crate::proto::startup::{parse_sasl_initial_response, password_text, take_password_message};
use crate::upstream;

/// A client admitted to log in, with what it asked for at startup.
pub(super) struct SessionLogin {
    /// Who logs in, to which database, with which identity.
    pub(super) admitted: Admitted,
    /// Startup parameters forwarded to an upstream login of its own.
    pub(super) forwarded: Vec<(String, String)>,
    /// The same as settings to apply with `set_config` on a pooled
    /// connection (`options` broken into its `-c name=value` parts).
    pub(super) settings: Vec<(String, String)>,
    /// The process-unique id of this client for the pool.
    pub(super) client_id: u64,
    /// Whose turn its checkouts take in a busy pool: its user id, or for
    /// an anonymous client its address.
    pub(super) fair_key: Box<str>,
    /// What it holds against its identity's limits, once counted.
    pub(super) hold: Option<super::limited::IdentityHold>,
    /// The role it asked for, when its token chose another.
    pub(super) requested_role: Option<String>,
}

impl SessionLogin {
    /// The verified claims, for anonymous roles `None`.
    pub(super) fn claims(&self) -> Option<&str> {
        self.admitted.identity.as_ref().map(|i| &*i.claims_json)
    }
}

impl<S: ClientIo> Session<'_, S> {
    /// Runs the startup phase to an admitted login.
    pub(super) async fn handshake(
        &mut self,
        startup: Startup,
    ) -> Result<SessionLogin, SessionError> {
        self.negotiate_version(&startup).await?;
        let parameters = startup.parameters;
        let role = parameters
            .get("user")
            .filter(|user| !user.is_empty())
            .ok_or(SessionError::MissingUser)?;
        let database = parameters
            .get("database")
            .filter(|db| !db.is_empty())
            .unwrap_or(role);
        let span = tracing::Span::current();
        span.record("user", role.as_str());
        span.record("db", database.as_str());
        let forwarded = params::forwarded_parameters(&parameters)?;
        let request = admission::LoginRequest {
            role,
            database,
            peer: self.peer.ip(),
            relayed_by: self.relayed_by,
            encrypted: self.encrypted,
            transport: self.transport,
        };
        let settings = Arc::clone(&self.settings);
        let policy = &settings.config.admission;
        // Where an OAUTHBEARER client without a usable token is sent.
        let oauth = match policy.roles.get(role).map(|r| &r.login) {
            Some(TokenLogin::OAuthBearer {
                discovery_url,
                scope,
            }) => Some((discovery_url.as_str(), scope.as_str())),
            _ => None,
        };
        let token = match (admission::check(policy, &request)?, oauth) {
            (Need::Nothing, _) => None,
            (Need::Token, Some((discovery_url, scope))) => {
                Some(self.ask_bearer_token(role, discovery_url, scope).await?)
            }
            (Need::Token, None) => Some(self.ask_token().await?),
        };
        let admitted = admission::admit(
            policy,
            &settings.verifier,
            &self.proxy.metrics,
            &request,
            token.as_deref(),
            // One login a connection: nothing to remember for the next.
            None,
            SystemTime::now(),
        )
        .await;
        let admitted = match (admitted, oauth) {
            // RFC 7628: a token that did not verify is answered with the
            // challenge too, so the client can fetch a fresh one.
            (Err(refusal), Some((discovery_url, scope))) => {
                return Err(self.fail_oauth(refusal.into(), discovery_url, scope).await);
            }
            (admitted, _) => admitted?,
        };
        self.ticket.authenticated();
        if let Some(identity) = &admitted.identity {
            span.record("sub", identity.subject.as_str());
            // A field recorded twice is printed twice: the role a token's
            // role_claim chose gets a field of its own.
            if admitted.role != *role {
                span.record("role", admitted.role.as_str());
            }
        }
        let settings = params::settings(&forwarded);
        let fair_key = match &admitted.identity {
            Some(identity) => identity.user_id.as_str().into(),
            None => self.peer.ip().to_string().into(),
        };
        let requested_role =
            (admitted.identity.is_some() && admitted.role != *role).then(|| role.clone());
        Ok(SessionLogin {
            admitted,
            forwarded,
            settings,
            client_id: upstream::next_client_id(),
            fair_key,
            hold: None,
            requested_role,
        })
    }

    /// Answers a startup asking for a newer minor version or protocol
    /// options: we speak 3.0 and none of the options, as Postgres says.
    pub(super) async fn negotiate_version(
        &mut self,
        startup: &Startup,
    ) -> Result<(), SessionError> {
        let unsupported: Vec<String> = startup
            .parameters
            .keys()
            .filter(|name| name.starts_with("_pq_."))
            .cloned()
            .collect();
        if startup.minor_version == 0 && unsupported.is_empty() {
            return Ok(());
        }
        let mut out = BytesMut::new();
        backend::negotiate_protocol_version(unsupported, &mut out);
        write_flush(&mut self.client, &out)
            .await
            .map_err(SessionError::ClientIo)
    }

    /// Asks for a cleartext password and reads it: the token.
    pub(super) async fn ask_token(&mut self) -> Result<String, SessionError> {
        let mut out = BytesMut::new();
        backend::ask_cleartext_password(&mut out);
        write_flush(&mut self.client, &out)
            .await
            .map_err(SessionError::ClientIo)?;
        let message = self.read_password_message().await?;
        Ok(password_text(&message).map_err(ProtocolViolation::from)?)
    }

    /// Offers SASL OAUTHBEARER and reads the bearer token from the
    /// client's first message. A client without a token (or with one that
    /// cannot be a token) is sent to the issuer, and the login fails so it
    /// connects again with one.
    async fn ask_bearer_token(
        &mut self,
        role: &str,
        discovery_url: &str,
        scope: &str,
    ) -> Result<String, SessionError> {
        let mut out = BytesMut::new();
        backend::ask_sasl(oauthbearer::MECHANISM, &mut out);
        write_flush(&mut self.client, &out)
            .await
            .map_err(SessionError::ClientIo)?;
        let message = self.read_password_message().await?;
        let initial = parse_sasl_initial_response(&message).map_err(ProtocolViolation::from)?;
        if initial.mechanism != oauthbearer::MECHANISM {
            // Named in the error, so bounded: the client chose it.
            let named = initial.mechanism.chars().take(64).collect();
            return Err(ProtocolViolation::SaslMechanism(named).into());
        }
        let first = match initial.data {
            Some(data) => BytesMut::from(data),
            None => {
                // The first message may follow an empty challenge (RFC
                // 4422), as Postgres allows.
                let mut out = BytesMut::new();
                backend::sasl_continue(Vec::new(), &mut out);
                write_flush(&mut self.client, &out)
                    .await
                    .map_err(SessionError::ClientIo)?;
                self.read_password_message().await?
            }
        };
        let refusal = match oauthbearer::parse_client_first(&first)
            .map_err(ProtocolViolation::from)?
        {
            oauthbearer::ClientFirst::Bearer(token) => return Ok(token.to_owned()),
            oauthbearer::ClientFirst::Discovery => SessionError::OAuthDiscovery(role.to_owned()),
            oauthbearer::ClientFirst::Unusable => {
                Refusal::Token(VerifyError::Malformed("not a bearer token")).into()
            }
        };
        Err(self.fail_oauth(refusal, discovery_url, scope).await)
    }

    /// Ends an OAUTHBEARER login that has no verified token: the error
    /// challenge, then `refusal`. A client that breaks the protocol in
    /// answering is refused for that; one that hangs up instead of
    /// acknowledging is still refused (and logged) for `refusal`.
    async fn fail_oauth(
        &mut self,
        refusal: SessionError,
        discovery_url: &str,
        scope: &str,
    ) -> SessionError {
        match self.oauth_challenge(discovery_url, scope).await {
            Err(violation @ SessionError::Protocol(_)) => violation,
            Ok(()) | Err(_) => refusal,
        }
    }

    /// Sends the OAUTHBEARER error challenge and waits for the client's
    /// acknowledgement; the caller then fails the login.
    async fn oauth_challenge(
        &mut self,
        discovery_url: &str,
        scope: &str,
    ) -> Result<(), SessionError> {
        let mut out = BytesMut::new();
        backend::sasl_continue(oauthbearer::challenge(discovery_url, scope), &mut out);
        write_flush(&mut self.client, &out)
            .await
            .map_err(SessionError::ClientIo)?;
        let message = self.read_password_message().await?;
        if !oauthbearer::is_acknowledgement(&message) {
            return Err(ProtocolViolation::from(oauthbearer::Malformed(
                "the client did not acknowledge the error challenge",
            ))
            .into());
        }
        Ok(())
    }

    /// Reads one `p` message (password or SASL) and returns its body.
    async fn read_password_message(&mut self) -> Result<BytesMut, SessionError> {
        loop {
            if let Some(message) =
                take_password_message(&mut self.inbox).map_err(ProtocolViolation::from)?
            {
                return Ok(message);
            }
            if self
                .client
                .read_buf(&mut self.inbox)
                .await
                .map_err(SessionError::ClientIo)?
                == 0
            {
                return Err(SessionError::ClientIo(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
        }
    }
}
