//! Transaction pooling: a client holds an upstream connection while a
//! transaction is open, from its first message after an idle
//! ReadyForQuery to the next idle ReadyForQuery (and keeps it past that
//! while nobody waits for one: `pool/keep.rs`).
//!
//! What a client's session holds follows it from one connection to the
//! next, and never reaches anyone else:
//!
//! * A connection goes back to the pool still holding its client's
//!   session (identity, settings, prepared statements), and that client's
//!   next transaction takes it again if it is free; so may a client of the
//!   same token whose session would be exactly the same
//!   ([`crate::upstream::SessionShape`]). Anyone else gets it only after a
//!   reset ([`Upstream::claim_as`]), which draws a new identity generation,
//!   so the old identity no longer verifies.
//! * On another connection, the client's identity is attached, its
//!   settings are applied, and its named prepared statements are prepared
//!   again from the Parse messages the [`Tracker`] kept.
//! * After a transaction that ran a command that can leave session state
//!   (SET, PREPARE, LISTEN, ...), the proxy reads the session's settings,
//!   statements, channels, cursors and temporary objects in one query
//!   ([`state`]). The settings and statements are carried from then on;
//!   state that cannot be carried (LISTEN, cursors WITH HOLD, temporary
//!   objects, SQL `PREPARE`, SET ROLE) pins the client to its connection
//!   until it leaves, as in session pooling. A setting that would act on
//!   the connection while it sits in the pool (`idle_session_timeout`) is
//!   not carried, and is reset before the connection goes back.

mod state;
mod tracker;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::time::Instant;

pub use tracker::Tracker;

use crate::error::UpstreamError;
use crate::identity::{CLAIMS_SETTING, ClaimsKey, SIGNATURE_SETTING};
use crate::upstream::{Owner, SessionShape, Upstream};

/// A client of a transaction-pooled database, between its transactions.
pub(crate) struct PooledClient {
    /// Process-unique id, the owner tag of connections holding its session.
    pub(crate) id: u64,
    /// Settings to apply on a connection that does not hold its session:
    /// from the startup packet, then as read after SET and friends.
    pub(crate) settings: Vec<(String, String)>,
    /// Named statements to prepare again on another connection (and what
    /// the session's statements touched); lent to each transaction's relay
    /// ([`PooledClient::lend_tracker`]), `None` only while lent.
    tracker: Option<Tracker>,
    /// When its token expires, if expiry is enforced.
    pub(crate) expires: Option<SystemTime>,
    /// What its session on a connection consists of, for another client
    /// of the same identity to take as it is (`None`: anonymous).
    shape: Option<Arc<SessionShape>>,
}

impl PooledClient {
    /// A client `id` with `claims` (`None`: anonymous) and startup
    /// `settings`, whose token expires at `expires` if enforced.
    pub(crate) fn new(
        (id, key): (u64, &ClaimsKey),
        claims: Option<String>,
        settings: Vec<(String, String)>,
        expires: Option<SystemTime>,
    ) -> Self {
        let shape = SessionShape::new(claims.as_deref(), key, &settings);
        Self {
            id,
            settings,
            tracker: Some(Tracker::default()),
            expires,
            shape,
        }
    }

    /// What its session would be on a connection (see
    /// [`crate::upstream::SessionShape`]).
    pub(crate) fn shape(&self) -> Option<&SessionShape> {
        self.shape.as_deref()
    }

    /// The verified claims (JSON), `None` for anonymous roles: kept once,
    /// in its shape.
    pub(crate) fn claims(&self) -> Option<&str> {
        self.shape.as_deref().map(SessionShape::claims)
    }

    /// Whether its token has expired and expiry is enforced.
    pub(crate) fn expired(&self, now: SystemTime) -> bool {
        self.expires.is_some_and(|at| now >= at)
    }

    /// Gives a connection from the pool this client's session: nothing to
    /// do if it holds it already, or a session exactly like it; otherwise
    /// (after the reset [`Upstream::claim_as`] does for a connection held
    /// by anyone else) the identity is attached, the settings applied and
    /// the named statements prepared again. Returns whether it ran
    /// queries to do so.
    pub(crate) async fn take(
        &self,
        conn: &mut Upstream,
        key: &ClaimsKey,
        deadline: Instant,
    ) -> Result<bool, UpstreamError> {
        // Most transactions find the session in place. Boxed: the rest
        // runs queries, a future larger than the whole transaction's.
        let took_over = !conn.claim_held(self.id, self.shape());
        if took_over {
            Box::pin(self.take_over(conn, key, deadline)).await?;
        }
        // Its own shape from now on: what it does next (a statement it
        // prepares) decides whether the connection is shared again.
        conn.share_as(self.shape.clone());
        Ok(took_over)
    }

    /// Brings a connection that does not hold this client's session to
    /// it: reset if anyone else used it, then the identity, settings and
    /// named statements.
    async fn take_over(
        &self,
        conn: &mut Upstream,
        key: &ClaimsKey,
        deadline: Instant,
    ) -> Result<(), UpstreamError> {
        if !conn.claim_as(self.id, self.shape(), deadline).await? {
            conn.attach(key, self.claims(), &self.settings, deadline)
                .await?;
            let statements = self.tracker.iter().flat_map(Tracker::statements);
            replay_statements(conn, statements, deadline).await?;
        }
        Ok(())
    }

    /// Whether the transaction that just ended needs
    /// [`PooledClient::settle`] (most do not); if not, forgets the names it
    /// mentioned.
    pub(crate) fn unsettled(&mut self) -> bool {
        let tracker = self.tracker();
        let prepared = tracker.statements().next().is_some();
        let unsettled = tracker.untrackable().is_some() || tracker.touched();
        if !unsettled {
            tracker.forget_mentioned();
        }
        if let Some(shape) = &self.shape
            && prepared
        {
            shape.prepared_statements();
        }
        unsettled
    }

    /// The tracker, for a transaction's relay to follow the session with;
    /// given back with [`PooledClient::return_tracker`]. Moved, not
    /// swapped with a fresh one: making and dropping an empty tracker
    /// each transaction was a measurable part of its cost.
    pub(crate) fn lend_tracker(&mut self) -> Tracker {
        self.tracker.take().unwrap_or_default()
    }

    /// Takes back the tracker a transaction's relay followed the session
    /// with.
    pub(crate) fn return_tracker(&mut self, tracker: Tracker) {
        self.tracker = Some(tracker);
    }

    fn tracker(&mut self) -> &mut Tracker {
        self.tracker.get_or_insert_default()
    }

    /// After a transaction ended idle: if it ran a command that can leave
    /// session state, reads that state and carries what can be carried.
    /// Returns why the client must keep this connection, if it must.
    pub(crate) async fn settle(
        &mut self,
        conn: &mut Upstream,
        deadline: Instant,
    ) -> Result<Option<&'static str>, UpstreamError> {
        if let Some(reason) = self.tracker().untrackable() {
            return Ok(Some(reason));
        }
        // The names this transaction's statements mentioned.
        let mentioned = self.tracker().take_mentioned();
        if !self.tracker().take_touched() {
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
        let state = state::read(conn, &names, deadline).await?;
        if state.pinned_by.is_some() {
            return Ok(state.pinned_by);
        }
        if state.pool_only_setting {
            reset_pool_only_settings(conn, deadline).await?;
        }
        self.tracker().retain_statements(&state.protocol_statements);
        if state.settings != self.settings {
            self.shape = (self.shape.as_deref()).map(|shape| shape.with_settings(&state.settings));
            conn.share_as(self.shape.clone());
        }
        self.settings = state.settings;
        if state.identity != *conn.attached() {
            // The client cleared or changed its identity settings: the
            // next transaction gets a reset and a fresh attach.
            conn.set_owner(Owner::Unknown);
        }
        Ok(None)
    }
}

/// Resets the settings of [`state::POOL_ONLY_SETTINGS`] on `conn`.
async fn reset_pool_only_settings(
    conn: &mut Upstream,
    deadline: Instant,
) -> Result<(), UpstreamError> {
    let sql: String = state::POOL_ONLY_SETTINGS
        .iter()
        .map(|name| format!("RESET {name};"))
        .collect();
    let mut out = BytesMut::new();
    frontend::query(&sql, &mut out).map_err(UpstreamError::Encode)?;
    let reply = conn.exchange(&out, deadline).await?;
    match reply.error {
        None => Ok(()),
        Some(error) => {
            conn.mark_broken();
            Err(UpstreamError::Reset(error))
        }
    }
}

/// Prepares statements again from the Parse messages that created them on
/// another connection, each followed by its own Sync so one failure does
/// not skip the rest. A statement that no longer parses is left out, as
/// its client would find on any new connection.
async fn replay_statements<'a>(
    conn: &mut Upstream,
    parses: impl Iterator<Item = &'a [u8]>,
    deadline: Instant,
) -> Result<(), UpstreamError> {
    let mut out = BytesMut::new();
    let mut count = 0;
    for parse in parses {
        out.extend_from_slice(parse);
        frontend::sync(&mut out);
        count += 1;
    }
    if count == 0 {
        return Ok(());
    }
    conn.send(&out).await?;
    for _ in 0..count {
        let reply = conn.read_reply(deadline, |_| Ok(())).await?;
        if let Some(error) = reply.error {
            tracing::debug!(%error, "a tracked statement did not prepare again");
        }
    }
    Ok(())
}

/// When a token expiring at `exp` (seconds since the epoch) expires.
pub(crate) fn expiry_time(exp: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(exp)
}
