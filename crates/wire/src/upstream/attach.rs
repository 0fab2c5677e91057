//! Attaching the verified identity to a backend: the one statement that
//! stores the signed claims, used by the wire path (for the session) and by
//! `/sql` (for one transaction), and the client's startup settings applied
//! alongside it.
//!
//! The signature covers the binding that `auth.begin_session()` drew for
//! this backend's current generation (see [`crate::identity`]), so it
//! verifies here and nowhere else.

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::time::Instant;

use super::{Attached, Upstream};
use crate::error::UpstreamError;
use crate::identity::ClaimsKey;
use crate::proto::server_error::ServerError;

/// How long the attached identity lasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachScope {
    /// Until the next reset: a wire client's session.
    Session,
    /// Until the transaction ends: one `/sql` request.
    Transaction,
}

/// Stores claims and signature. Explicit `pg_catalog` and typed
/// parameters: no shadow function or operator applies, and the values are
/// never spliced into SQL.
const ATTACH: &str = "select pg_catalog.set_config('authgres.claims', $1::pg_catalog.text, $3::pg_catalog.bool), \
                      pg_catalog.set_config('authgres.signature', $2::pg_catalog.text, $3::pg_catalog.bool)";
/// Applies one of the client's startup settings.
const SET_CONFIG: &str =
    "select pg_catalog.set_config($1::pg_catalog.text, $2::pg_catalog.text, false)";
/// Starts a new identity generation for this backend and returns the
/// binding to sign. Schema-qualified: no search_path can divert it. In a
/// writable transaction of its own with no timeout: a default the login
/// role was given (read-only, a 1 ms `statement_timeout`) must not stop
/// the check for such defaults inside it (`upstream::repair`).
pub(super) const BEGIN_SESSION: &str = "BEGIN READ WRITE; SET LOCAL statement_timeout = 0; \
                                        SET LOCAL lock_timeout = 0; \
                                        SELECT auth.begin_session(); COMMIT";

/// Appends the statement attaching `claims` for `binding` (Parse, Bind,
/// Execute of the unnamed statement; no Sync). Returns what was attached.
pub fn append_attach(
    out: &mut BytesMut,
    key: &ClaimsKey,
    binding: &str,
    claims: &str,
    scope: AttachScope,
) -> Result<Attached, UpstreamError> {
    let signature = key.sign(binding, claims);
    let local = match scope {
        AttachScope::Session => "false",
        AttachScope::Transaction => "true",
    };
    append_statement(out, ATTACH, &[Some(claims), Some(&signature), Some(local)])?;
    Ok(Attached {
        claims: Some(claims.to_owned()),
        signature: Some(signature),
    })
}

/// Appends Parse, Bind (text parameters, text results) and Execute of the
/// unnamed statement `sql`; no Sync.
pub fn append_statement(
    out: &mut BytesMut,
    sql: &str,
    params: &[Option<&str>],
) -> Result<(), UpstreamError> {
    append(out, sql, params, false)
}

/// Like [`append_statement`], with a Describe of the portal before the
/// Execute, so the reply carries the result's RowDescription.
pub fn append_described(
    out: &mut BytesMut,
    sql: &str,
    params: &[Option<&str>],
) -> Result<(), UpstreamError> {
    append(out, sql, params, true)
}

fn append(
    out: &mut BytesMut,
    sql: &str,
    params: &[Option<&str>],
    describe: bool,
) -> Result<(), UpstreamError> {
    frontend::parse("", sql, std::iter::empty(), out).map_err(UpstreamError::Encode)?;
    frontend::bind(
        "",
        "",
        [0i16],
        params.iter(),
        |value, buf| match value {
            Some(text) => {
                buf.extend_from_slice(text.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            }
            None => Ok(postgres_protocol::IsNull::Yes),
        },
        [0i16],
        out,
    )
    .map_err(|error| match error {
        frontend::BindError::Conversion(_) => {
            UpstreamError::Encode(std::io::ErrorKind::InvalidInput.into())
        }
        frontend::BindError::Serialization(error) => UpstreamError::Encode(error),
    })?;
    if describe {
        frontend::describe(b'P', "", out).map_err(UpstreamError::Encode)?;
    }
    frontend::execute("", 0, out).map_err(UpstreamError::Encode)
}

impl Upstream {
    /// The binding the next identity must be signed for: the one the last
    /// reset drew, or a fresh one.
    pub async fn take_binding(&mut self, deadline: Instant) -> Result<String, UpstreamError> {
        if let Some(binding) = self.next_binding.take() {
            return Ok(binding);
        }
        let mut out = BytesMut::new();
        frontend::query(BEGIN_SESSION, &mut out).map_err(UpstreamError::Encode)?;
        self.send(&out).await?;
        let mut binding = None;
        let reply = self
            .read_reply(deadline, |message| {
                if let Message::DataRow(row) = message {
                    binding = binding.take().or_else(|| super::first_text(&row));
                }
                Ok(())
            })
            .await?;
        match (reply.error, binding) {
            (None, Some(binding)) => Ok(binding),
            (Some(error), _) => Err(self
                .begin_session_failed(error, deadline, UpstreamError::Attach)
                .await),
            (None, None) => {
                self.broken = true;
                Err(UpstreamError::Attach(ServerError::default()))
            }
        }
    }

    /// Readies the connection for a client in one round trip: applies its
    /// startup `settings` (with `set_config`, values as parameters) and
    /// attaches `claims` for the session. Returns the ParameterStatus
    /// values the client should see.
    pub async fn attach(
        &mut self,
        key: &ClaimsKey,
        claims: Option<&str>,
        settings: &[(String, String)],
        deadline: Instant,
    ) -> Result<Vec<(String, String)>, UpstreamError> {
        let binding = self.take_binding(deadline).await?;
        self.attached = Attached::default();
        if claims.is_none() && settings.is_empty() {
            return Ok(self.parameters.to_vec());
        }
        let mut out = BytesMut::new();
        for (name, value) in settings {
            append_statement(&mut out, SET_CONFIG, &[Some(name), Some(value)])?;
        }
        let attached = match claims {
            Some(claims) => append_attach(&mut out, key, &binding, claims, AttachScope::Session)?,
            None => Attached::default(),
        };
        frontend::sync(&mut out);
        self.send(&out).await?;
        let mut parameters = self.parameters.to_vec();
        let reply = self
            .read_reply(deadline, |message| {
                if let Message::ParameterStatus(body) = message {
                    let name = body.name().unwrap_or_default().to_owned();
                    let value = body.value().unwrap_or_default().to_owned();
                    match parameters.iter_mut().find(|(n, _)| *n == name) {
                        Some(entry) => entry.1 = value,
                        None => parameters.push((name, value)),
                    }
                }
                Ok(())
            })
            .await?;
        match reply.error {
            // A bad client setting (an unknown DateStyle) is the client's
            // to see, as Postgres would report it at startup.
            Some(error) if reply.status == super::IDLE => Err(UpstreamError::Setting(error)),
            Some(error) => {
                self.broken = true;
                Err(UpstreamError::Setting(error))
            }
            None => {
                self.attached = attached;
                Ok(parameters)
            }
        }
    }
}
