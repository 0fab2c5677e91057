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
//!   `PREPARE`, SET ROLE) pins the client to its connection until it
//!   leaves, as in session pooling.

use std::time::{Duration, SystemTime};

use crate::identity::{CLAIMS_SETTING, SIGNATURE_SETTING};
use crate::track::Tracker;
use crate::upstream::{Owner, Upstream, UpstreamError};

/// One query that lists what a session holds beyond a transaction: its
/// settings, prepared statements, channels, open cursors and temporary
/// relations (not counting this query's own unnamed portal). Custom settings (`app.tenant`) are not in `pg_settings`, so
/// those named in `$1` (comma-separated: the identity's, the client's
/// carried ones, and dotted names its statements mentioned) are read one by
/// one. Schema-qualified, with explicit operators: the client's search_path
/// cannot divert it.
const SESSION_STATE: &str = "\
select 's', name, pg_catalog.current_setting(name) from pg_catalog.pg_settings \
 where source operator(pg_catalog.=) 'session' \
union all select 'x', n, pg_catalog.current_setting(n, true) \
 from pg_catalog.unnest(pg_catalog.string_to_array($1::pg_catalog.text, ',')) n \
 where not exists (select from pg_catalog.pg_settings g where g.name operator(pg_catalog.=) n) \
union all select 'p', name, from_sql::pg_catalog.text from pg_catalog.pg_prepared_statements \
union all select 'l', c, null from pg_catalog.pg_listening_channels() c \
union all select 'c', name, null from pg_catalog.pg_cursors \
 where name operator(pg_catalog.<>) '' \
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

    /// Whether the transaction that just ended needs [`PooledClient::settle`]
    /// (most do not); if not, forgets the names it mentioned.
    pub fn unsettled(&mut self) -> bool {
        let unsettled = self.tracker.untrackable().is_some() || self.tracker.touched();
        if !unsettled {
            self.tracker.take_mentioned();
        }
        unsettled
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
        // The names this transaction's statements mentioned.
        let mentioned = self.tracker.take_mentioned();
        if !self.tracker.take_touched() {
            return Ok(None);
        }
        // `role` is not in pg_settings either.
        let mut names = vec![
            CLAIMS_SETTING.to_owned(),
            SIGNATURE_SETTING.to_owned(),
            "role".to_owned(),
        ];
        names.extend(
            (self.settings.iter())
                .map(|(name, _)| name)
                .filter(|name| name.contains('.'))
                .cloned(),
        );
        names.extend(mentioned);
        names.sort();
        names.dedup();
        let state = session_state(conn, &names).await?;
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

/// Runs [`SESSION_STATE`] on `conn`, reading the custom settings `names`
/// too.
async fn session_state(
    conn: &mut Upstream,
    names: &[String],
) -> Result<SessionState, UpstreamError> {
    let names = names.join(",");
    let rows = conn.query_text(SESSION_STATE, &[&names]).await?;
    let mut state = SessionState::default();
    for row in rows {
        let Ok([Some(kind), Some(name), value]) = <[Option<String>; 3]>::try_from(row) else {
            return Err(UpstreamError::Protocol("session state row".into()));
        };
        // A custom setting that was reset reads as empty.
        let value = match kind.as_str() {
            "x" => value.filter(|v| !v.is_empty()),
            _ => value,
        };
        match (kind.as_str(), value) {
            ("x", value) if name == CLAIMS_SETTING => state.identity.0 = value,
            ("x", value) if name == SIGNATURE_SETTING => state.identity.1 = value,
            ("x", Some(role)) if name == "role" && role != "none" => {
                state.pinned_by = Some("SET ROLE");
            }
            ("s" | "x", Some(value)) if carried(&name) => state.settings.push((name, value)),
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
    Ok(state)
}

/// When a token expiring at `exp` (seconds since the epoch) expires.
pub fn expiry_time(exp: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(exp)
}
