//! Logged-in upstream connections kept for reuse, per (database, role).
//!
//! A checkout hands out an idle connection or logs in a new one, bounded by
//! `max_per_key` connections per (database, role); waiting for a slot is
//! bounded by `checkout_timeout`. A [`Pooled`] connection goes back only
//! through [`Pooled::release`], which its user calls once the connection is
//! known to be clean; dropping it closes the connection instead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::upstream::{self, Upstream, UpstreamConfig, UpstreamError};

type Key = (String, String);

/// Pool limits.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// Connections per (database, role), busy and idle together.
    pub max_per_key: usize,
    /// How long a checkout waits for a free slot.
    pub checkout_timeout: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        Self {
            max_per_key: 20,
            checkout_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Default)]
struct Slot {
    idle: Vec<Upstream>,
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
        Arc::new(Self {
            config,
            limits,
            slots: Mutex::new(HashMap::new()),
        })
    }

    /// An idle connection for (`database`, `role`), or a new one.
    pub async fn checkout(
        self: &Arc<Self>,
        database: &str,
        role: &str,
        password: Option<&str>,
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
        let permit = tokio::time::timeout(self.limits.checkout_timeout, permits.acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or_else(|| {
                CheckoutError::Timeout(
                    database.to_owned(),
                    role.to_owned(),
                    self.limits.checkout_timeout,
                )
            })?;
        let idle = self
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&key)
            .and_then(|slot| slot.idle.pop());
        let conn = match idle {
            Some(conn) => conn,
            None => upstream::connect(&self.config, role, database, password, &[]).await?,
        };
        Ok(Pooled {
            conn: Some(conn),
            key,
            pool: Arc::clone(self),
            _permit: permit,
        })
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

    /// Returns the connection to the pool; call only when it is idle and
    /// holds no state of the request that used it.
    pub fn release(mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(self.key.clone())
                .or_default()
                .idle
                .push(conn);
        }
    }
}
