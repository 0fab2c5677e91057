//! Logged-in upstream connections kept for reuse, per (database, role).
//!
//! A checkout hands out an idle connection or logs in a new one, bounded by
//! `max_per_key` connections per (database, role); waiting for a slot is
//! bounded by `checkout_timeout`. A [`Pooled`] connection goes back only
//! through [`Pooled::release`], which its user calls once the connection is
//! known to be clean; dropping it closes the connection instead.
//!
//! A checkout names the client asking: a connection that still holds that
//! client's session (transaction pooling) is preferred, then a clean one,
//! then one whose client has left ([`UpstreamPool::disown`]), then a new one
//! while the pool may grow; only then is another client's taken over. The
//! caller resets a connection held for anyone else ([`Upstream::claim`]).
//!
//! Idle connections are closed after `idle_timeout`, every connection after
//! `server_lifetime`, and one idle longer than `health_check_after` is
//! checked with an empty query before it is handed out.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::upstream::{self, Owner, Upstream, UpstreamConfig, UpstreamError};

type Key = (String, String);

/// Pool limits.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Connections per (database, role), busy and idle together.
    pub max_per_key: usize,
    /// How long a checkout waits for a free slot.
    pub checkout_timeout: Duration,
    /// Idle connections older than this are closed.
    pub idle_timeout: Duration,
    /// Connections older than this are closed instead of reused.
    pub server_lifetime: Duration,
    /// A connection idle longer than this is checked before reuse.
    pub health_check_after: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_per_key: 20,
            checkout_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            health_check_after: Duration::from_secs(30),
        }
    }
}

/// An idle connection and its ages.
struct Idle {
    conn: Upstream,
    created: Instant,
    since: Instant,
}

#[derive(Default)]
struct Slot {
    idle: Vec<Idle>,
    permits: Option<Arc<Semaphore>>,
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
#[non_exhaustive]
pub enum CheckoutError {
    /// Every connection for this (database, role) stayed busy.
    #[error("no upstream connection for database {0:?} role {1:?} became free within {2:?}")]
    Timeout(String, String, Duration),
    /// Logging in a new connection failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl UpstreamPool {
    /// An empty pool for the server in `config`.
    pub fn new(config: UpstreamConfig, limits: PoolLimits) -> Arc<Self> {
        let pool = Arc::new(Self {
            config,
            limits,
            slots: Mutex::new(HashMap::new()),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(reap(Arc::downgrade(&pool)));
        }
        pool
    }

    /// Closes idle connections past their idle timeout or lifetime.
    fn prune(&self, now: Instant) -> usize {
        let limits = self.limits;
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let mut closed = 0;
        for slot in slots.values_mut() {
            let before = slot.idle.len();
            slot.idle.retain(|idle| {
                now.duration_since(idle.since) < limits.idle_timeout
                    && now.duration_since(idle.created) < limits.server_lifetime
            });
            closed += before - slot.idle.len();
        }
        closed
    }

    /// An idle connection for (`database`, `role`), or a new one: the one
    /// holding `client`'s session if there is one, else a clean one, else
    /// one whose client is gone, else a new one while the pool may grow,
    /// else the one idle longest.
    pub async fn checkout(
        self: &Arc<Self>,
        database: &str,
        role: &str,
        password: Option<&str>,
        client: u64,
    ) -> Result<Pooled, CheckoutError> {
        let key = (database.to_owned(), role.to_owned());
        let permits = {
            let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
            let slot = slots.entry(key.clone()).or_default();
            Arc::clone(
                slot.permits
                    .get_or_insert_with(|| Arc::new(Semaphore::new(self.limits.max_per_key))),
            )
        };
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
            .ok_or_else(|| {
                CheckoutError::Timeout(
                    database.to_owned(),
                    role.to_owned(),
                    self.limits.checkout_timeout,
                )
            })?,
        };
        loop {
            let idle = self
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get_mut(&key)
                .and_then(|slot| {
                    let held = |idle: &Idle| idle.conn.owner == Owner::Client(client);
                    let clean = |idle: &Idle| idle.conn.owner == Owner::Nobody;
                    // Left by a client that is gone: a reset away from clean.
                    let orphaned = |idle: &Idle| idle.conn.owner == Owner::Unknown;
                    // Another client's session is taken over (and reset)
                    // only when the pool may not grow: the one idle longest,
                    // whose client is the least likely to be back soon.
                    let busy = self.limits.max_per_key - permits.available_permits();
                    let full = busy + slot.idle.len() >= self.limits.max_per_key;
                    let at = (slot.idle.iter().rposition(held))
                        .or_else(|| slot.idle.iter().rposition(clean))
                        .or_else(|| slot.idle.iter().rposition(orphaned))
                        .or_else(|| (full && !slot.idle.is_empty()).then_some(0))?;
                    Some(slot.idle.remove(at))
                });
            let Some(mut idle) = idle else {
                break;
            };
            let now = Instant::now();
            if now.duration_since(idle.created) >= self.limits.server_lifetime
                || now.duration_since(idle.since) >= self.limits.idle_timeout
            {
                continue;
            }
            if now.duration_since(idle.since) >= self.limits.health_check_after
                && let Err(error) = idle.conn.ping().await
            {
                tracing::debug!(%error, "idle upstream connection failed its health check");
                continue;
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

    /// Marks the idle connections holding `client`'s session as nobody's
    /// to come back to (the client left); they are reset before reuse.
    pub fn disown(&self, database: &str, role: &str, client: u64) {
        let key = (database.to_owned(), role.to_owned());
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        for idle in slots.get_mut(&key).into_iter().flat_map(|s| &mut s.idle) {
            if idle.conn.owner == Owner::Client(client) {
                idle.conn.owner = Owner::Unknown;
            }
        }
    }

    /// Idle connections for (`database`, `role`).
    pub fn idle(&self, database: &str, role: &str) -> usize {
        let key = (database.to_owned(), role.to_owned());
        self.slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .map_or(0, |slot| slot.idle.len())
    }
}

impl Pooled {
    /// The connection.
    pub fn conn(&mut self) -> &mut Upstream {
        self.conn
            .as_mut()
            .expect("a Pooled holds its connection until release or drop")
    }

    /// Whether the connection served someone before (and so may have died
    /// while idle).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// Returns the connection to the pool; call only when it is idle and
    /// holds no state of the request that used it. A connection past its
    /// lifetime is closed instead.
    pub fn release(mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        let now = Instant::now();
        if now.duration_since(self.created) >= self.pool.limits.server_lifetime {
            return;
        }
        self.pool
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(self.key.clone())
            .or_default()
            .idle
            .push(Idle {
                conn,
                created: self.created,
                since: now,
            });
    }
}

/// Closes expired idle connections now and then, until the pool is gone.
async fn reap(pool: Weak<UpstreamPool>) {
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
