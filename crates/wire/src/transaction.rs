//! Transaction pooling: a client holds an upstream connection only while a
//! transaction is open, from its first message after an idle
//! ReadyForQuery to the next idle ReadyForQuery.
//!
//! What a client's session holds follows it from one connection to the
//! next, and never reaches anyone else:
//!
//! * A connection goes back to the pool still holding its client's
//!   session (identity, settings, prepared statements), and that client's
//!   next transaction takes it again if it is free. Anyone else gets it only
//!   after a reset ([`Upstream::claim`]), which draws a new identity
//!   generation, so the old identity no longer verifies.
//! * On another connection, the client's identity is attached, its
//!   settings are applied, and its named prepared statements are prepared
//!   again from the Parse messages the [`Tracker`] kept.
//! * After a transaction that ran a command that can leave session state
//!   (SET, PREPARE, LISTEN, ...), the proxy reads the session's settings,
//!   statements, channels, cursors and temporary objects in one query. The
//!   settings and statements are carried from then on; state that cannot
//!   be carried (LISTEN, cursors WITH HOLD, temporary objects, SQL
//!   `PREPARE`) pins the client to its connection until it leaves, as in
//!   session pooling.

use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator as _;
use postgres_protocol::message::{backend::Message, frontend};

use crate::identity::{CLAIMS_SETTING, SIGNATURE_SETTING};
use crate::track::Tracker;
use crate::upstream::{Owner, Upstream, UpstreamError};

/// One query that lists what a session holds beyond a transaction: its
/// settings, prepared statements, channels, open cursors and temporary
/// relations. Schema-qualified, with explicit operators: the client's
/// search_path cannot divert it.
const SESSION_STATE: &str = "\
select 's', name, pg_catalog.current_setting(name) from pg_catalog.pg_settings \
 where source operator(pg_catalog.=) 'session' \
union all select 'p', name, from_sql::pg_catalog.text from pg_catalog.pg_prepared_statements \
union all select 'l', c, null from pg_catalog.pg_listening_channels() c \
union all select 'c', name, null from pg_catalog.pg_cursors \
union all select 't', relname::pg_catalog.text, null from pg_catalog.pg_class \
 where relnamespace operator(pg_catalog.=) pg_catalog.pg_my_temp_schema()";

/// Settings that are the proxy's or that a client could not have set.
fn carried(name: &str) -> bool {
    !(name.starts_with("authgres.") || name == "role" || name == "session_authorization")
}

/// A client of a transaction-pooled database, between its transactions.
pub struct PooledClient {
    /// Process-unique id, the owner tag of connections holding its session.
    pub id: u64,
    /// The verified claims (JSON), `None` for anonymous roles.
    pub claims: Option<String>,
    /// Settings to apply on a connection that does not hold its session:
    /// from the startup packet, then as read after SET and friends.
    pub settings: Vec<(String, String)>,
    /// Named statements to prepare again on another connection.
    pub tracker: Tracker,
    /// When its token expires, if expiry is enforced.
    pub expires: Option<SystemTime>,
}

/// What a session holds beyond its transactions, as the server lists it.
#[derive(Debug, Default)]
struct SessionState {
    settings: Vec<(String, String)>,
    /// (claims, signature) the session holds.
    identity: (Option<String>, Option<String>),
    protocol_statements: Vec<String>,
    /// Why the session cannot move to another connection, if it cannot.
    pinned_by: Option<&'static str>,
}

impl PooledClient {
    /// Whether its token has expired and expiry is enforced.
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|at| now >= at)
    }

    /// Gives a connection from the pool this client's session: nothing to
    /// do if it holds it already; otherwise (after the reset
    /// [`Upstream::claim`] does for a connection held by anyone else) the
    /// identity is attached, the settings applied and the named statements
    /// prepared again.
    pub async fn take(
        &self,
        conn: &mut Upstream,
        key: &crate::ClaimsKey,
    ) -> Result<(), UpstreamError> {
        if conn.claim(self.id).await? {
            return Ok(());
        }
        conn.attach_for_client(key, self.claims.as_deref(), &self.settings)
            .await?;
        conn.replay_statements(self.tracker.statements()).await
    }

    /// After a transaction ended idle: if it ran a command that can leave
    /// session state, reads that state and carries what can be carried.
    /// Returns why the client must keep this connection, if it must.
    pub async fn settle(
        &mut self,
        conn: &mut Upstream,
    ) -> Result<Option<&'static str>, UpstreamError> {
        if let Some(reason) = self.tracker.untrackable() {
            return Ok(Some(reason));
        }
        if !self.tracker.take_touched() {
            return Ok(None);
        }
        let state = session_state(conn).await?;
        if state.pinned_by.is_some() {
            return Ok(state.pinned_by);
        }
        self.tracker.retain_statements(&state.protocol_statements);
        self.settings = state.settings;
        if state.identity != conn.attached_identity() {
            // The client cleared or changed its identity settings: the
            // next transaction gets a reset and a fresh attach.
            conn.owner = Owner::Unknown;
        }
        Ok(None)
    }
}

/// Runs [`SESSION_STATE`] on `conn`.
async fn session_state(conn: &mut Upstream) -> Result<SessionState, UpstreamError> {
    let mut out = BytesMut::new();
    frontend::query(SESSION_STATE, &mut out)?;
    conn.send(&mut out).await?;
    let mut state = SessionState::default();
    let mut failure = None;
    loop {
        match conn.next_message().await? {
            Message::DataRow(row) => {
                let buffer = row.buffer();
                let fields: Vec<Option<String>> = row
                    .ranges()
                    .map(
                        |range| Ok(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned())),
                    )
                    .collect()?;
                let [Some(kind), Some(name), value] = <[Option<String>; 3]>::try_from(fields)
                    .map_err(|_| UpstreamError::Protocol("session state row".into()))?
                else {
                    continue;
                };
                match (kind.as_str(), value) {
                    ("s", Some(value)) if name == CLAIMS_SETTING => {
                        state.identity.0 = Some(value).filter(|v| !v.is_empty());
                    }
                    ("s", Some(value)) if name == SIGNATURE_SETTING => {
                        state.identity.1 = Some(value).filter(|v| !v.is_empty());
                    }
                    ("s", Some(value)) if carried(&name) => state.settings.push((name, value)),
                    ("p", Some(from_sql)) if from_sql == "true" => {
                        state.pinned_by = Some("a statement prepared with SQL PREPARE");
                    }
                    ("p", _) => state.protocol_statements.push(name),
                    ("l", _) => state.pinned_by = Some("LISTEN"),
                    ("c", _) => state.pinned_by = Some("a cursor open across transactions"),
                    ("t", _) => state.pinned_by = Some("temporary objects"),
                    _ => {}
                }
            }
            Message::ErrorResponse(body) => {
                failure.get_or_insert(crate::upstream::error_fields(&body)?);
            }
            Message::ReadyForQuery(_) => break,
            _ => {}
        }
    }
    match failure {
        Some((code, message)) => Err(UpstreamError::Protocol(format!(
            "reading the session's state failed: {code} {message}"
        ))),
        None => Ok(state),
    }
}

/// When a token expiring at `exp` (seconds since the epoch) expires.
pub fn expiry_time(exp: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(exp)
}
