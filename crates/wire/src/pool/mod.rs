//! Logged-in upstream connections kept for reuse, per (database, role).
//!
//! A checkout hands out an idle connection or logs in a new one, bounded by
//! `max_per_key` connections per (database, role); waiting for a slot is
//! bounded by `checkout_timeout`. Which idle connection it takes is
//! [`pick`]'s decision. An idle connection is never handed out if it is
//! past its idle timeout or lifetime, if the server spoke or hung up while
//! it sat idle (a restart, `pg_terminate_backend`), or if it was idle long
//! enough to need a health check and fails it.
//!
//! A [`Pooled`] connection goes back only through [`Pooled::release`],
//! which its user calls once it is known to be idle and clean; one whose
//! exchange failed (it is marked broken) is closed instead, and so is one
//! that is simply dropped. Idle connections are closed by [`reap`], which
//! whoever owns the pool runs.

mod pick;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::config::PoolLimits;
use crate::error::UpstreamError;
use crate::upstream::{self, Owner, Upstream, UpstreamConfig};
use pick::{Candidate, pick};

type Key = (String, String);

/// An idle connection and its ages.
struct Idle {
    conn: Upstream,
    created: Instant,
    since: Instant,
}

impl Idle {
    fn candidate(&self) -> Candidate {
        Candidate {
            owner: self.conn.owner(),
            created: self.created.into_std(),
            since: self.since.into_std(),
        }
    }
}

/// The connections of one (database, role).
struct Slot {
    idle: Vec<Idle>,
    permits: Arc<Semaphore>,
}

/// Upstream connections by (database, role).
pub struct UpstreamPool {
    config: UpstreamConfig,
    limits: PoolLimits,
    slots: Mutex<HashMap<Key, Slot>>,
}

/// A checked-out connection.
pub struct Pooled {
    conn: Option<Upstream>,
    created: Instant,
    reused: bool,
    key: Key,
    pool: Arc<UpstreamPool>,
    _permit: OwnedSemaphorePermit,
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// Every connection for this (database, role) stayed busy.
    #[error("no upstream connection became free within {0:?}")]
    Timeout(Duration),
    /// Logging in a new connection failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl UpstreamPool {
    /// An empty pool for the server in `config`. Run [`reap`] beside it to
    /// close idle connections on time.
    pub fn new(config: UpstreamConfig, limits: PoolLimits) -> Arc<Self> {
        Arc::new(Self {
            config,
            limits,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// The pool's limits.
    pub fn limits(&self) -> &PoolLimits {
        &self.limits
    }

    /// The server it connects to.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A connection for (`database`, `role`) for `client`: an idle one as
    /// [`pick`] chooses, or a new login as `role` with `password`.
    pub async fn checkout(
        self: &Arc<Self>,
        database: &str,
        role: &str,
        password: Option<&str>,
        client: u64,
    ) -> Result<Pooled, CheckoutError> {
        let key = (database.to_owned(), role.to_owned());
        let permits = Arc::clone(
            &self
                .slots()
                .entry(key.clone())
                .or_insert_with(|| Slot {
                    idle: Vec::new(),
                    permits: Arc::new(Semaphore::new(self.limits.max_per_key)),
                })
                .permits,
        );
        // A free slot needs no timer: most checkouts take this path.
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => tokio::time::timeout(
                self.limits.checkout_timeout,
                Arc::clone(&permits).acquire_owned(),
            )
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(CheckoutError::Timeout(self.limits.checkout_timeout))?,
        };
        while let Some(mut idle) = self.take_idle(&key, client, &permits) {
            let now = Instant::now();
            if idle.candidate().expired(&self.limits, now.into_std()) {
                continue;
            }
            if idle.conn.spoke_while_idle() {
                tracing::debug!("an idle upstream connection was closed by the server");
                continue;
            }
            if idle.candidate().needs_check(&self.limits, now.into_std()) {
                let deadline = now + self.limits.internal_query_timeout;
                if let Err(error) = idle.conn.ping(deadline).await {
                    tracing::debug!(%error, "an idle upstream connection failed its health check");
                    continue;
                }
            }
            return Ok(Pooled {
                conn: Some(idle.conn),
                created: idle.created,
                reused: true,
                key,
                pool: Arc::clone(self),
                _permit: permit,
            });
        }
        let conn = upstream::connect(&self.config, role, database, password, &[]).await?;
        Ok(Pooled {
            conn: Some(conn),
            created: Instant::now(),
            reused: false,
            key,
            pool: Arc::clone(self),
            _permit: permit,
        })
    }

    /// Removes the idle connection [`pick`] chooses for `client`.
    fn take_idle(&self, key: &Key, client: u64, permits: &Semaphore) -> Option<Idle> {
        let mut slots = self.slots();
        let slot = slots.get_mut(key)?;
        let candidates: Vec<Candidate> = slot.idle.iter().map(Idle::candidate).collect();
        let busy = self
            .limits
            .max_per_key
            .saturating_sub(permits.available_permits());
        let may_grow = busy + slot.idle.len() < self.limits.max_per_key;
        let at = pick(&candidates, client, may_grow)?;
        (at < slot.idle.len()).then(|| slot.idle.remove(at))
    }

    /// Marks the idle connections holding `client`'s session as nobody's
    /// to come back to (the client left); they are reset before reuse.
    pub fn disown(&self, database: &str, role: &str, client: u64) {
        let key = (database.to_owned(), role.to_owned());
        let mut slots = self.slots();
        for idle in slots.get_mut(&key).into_iter().flat_map(|s| &mut s.idle) {
            if idle.conn.owner() == Owner::Client(client) {
                idle.conn.set_owner(Owner::Unknown);
            }
        }
    }

    /// Idle connections for (`database`, `role`).
    pub fn idle(&self, database: &str, role: &str) -> usize {
        let key = (database.to_owned(), role.to_owned());
        self.slots().get(&key).map_or(0, |slot| slot.idle.len())
    }

    /// Closes idle connections past their idle timeout or lifetime at
    /// `now`; returns how many.
    pub fn prune(&self, now: Instant) -> usize {
        let mut slots = self.slots();
        let mut closed = 0;
        for slot in slots.values_mut() {
            let before = slot.idle.len();
            slot.idle
                .retain(|idle| !idle.candidate().expired(&self.limits, now.into_std()));
            closed += before - slot.idle.len();
        }
        closed
    }
}

impl Pooled {
    /// The connection.
    pub fn conn(&mut self) -> &mut Upstream {
        #[allow(
            clippy::expect_used,
            reason = "a Pooled holds its connection until release or drop"
        )]
        self.conn.as_mut().expect("a Pooled holds its connection")
    }

    /// Whether the connection served someone before (and so may have died
    /// while idle).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Returns the connection to the pool; call only when it is idle and
    /// holds no state of the request that used it. A connection that is
    /// broken or past its lifetime is closed instead.
    pub fn release(mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        let now = Instant::now();
        if conn.is_broken() || now.duration_since(self.created) >= self.pool.limits.server_lifetime
        {
            return;
        }
        conn.shrink();
        if let Some(slot) = self.pool.slots().get_mut(&self.key) {
            slot.idle.push(Idle {
                conn,
                created: self.created,
                since: now,
            });
        }
    }
}

/// Closes expired idle connections now and then, until the pool is gone.
pub async fn reap(pool: Weak<UpstreamPool>) {
    let period = match pool.upgrade() {
        Some(pool) => (pool.limits.idle_timeout.min(pool.limits.server_lifetime) / 2)
            .clamp(Duration::from_millis(100), Duration::from_secs(30)),
        None => return,
    };
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let closed = pool.prune(Instant::now());
        if closed > 0 {
            tracing::debug!(closed, "closed expired idle upstream connections");
        }
    }
}
