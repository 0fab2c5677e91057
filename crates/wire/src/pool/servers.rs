//! One pool per upstream server for a family of clients (the wire
//! sessions, or `/sql`): `[upstream]`'s, made at start, and one for each
//! `[databases]` server, made when a client is first routed to it, reaped
//! like the first and reported beside it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, Weak};

use super::{UpstreamPool, reap};
use crate::config::PoolLimits;
use crate::upstream::UpstreamConfig;

/// Pools reported in metrics and the console, shared with the proxy.
pub type Reported = Arc<Mutex<Vec<Weak<UpstreamPool>>>>;

/// The pools of one family, by server.
pub struct ServerPools {
    upstream: Arc<UpstreamPool>,
    /// By `host:port` and TLS mode.
    others: Mutex<HashMap<String, Arc<UpstreamPool>>>,
    reported: Reported,
}

impl ServerPools {
    /// The family whose `[upstream]` pool is `upstream`; pools made later
    /// are added to `reported`.
    pub fn new(upstream: Arc<UpstreamPool>, reported: Reported) -> Self {
        lock(&reported).push(Arc::downgrade(&upstream));
        Self {
            upstream,
            others: Mutex::new(HashMap::new()),
            reported,
        }
    }

    /// The `[upstream]` server's pool.
    pub fn upstream(&self) -> &Arc<UpstreamPool> {
        &self.upstream
    }

    /// The pool for `server` (`None`: `[upstream]`'s), made on first use
    /// with the family's limits in force, its reaper started beside it.
    pub fn get(&self, server: Option<&Arc<UpstreamConfig>>) -> Arc<UpstreamPool> {
        let Some(server) = server else {
            return Arc::clone(&self.upstream);
        };
        let key = format!("{}|{:?}", server.address(), server.tls);
        let mut others = lock(&self.others);
        if let Some(pool) = others.get(&key) {
            return Arc::clone(pool);
        }
        let first = &self.upstream;
        let pool = UpstreamPool::new(
            first.name,
            UpstreamConfig::clone(server),
            first.limits(),
            Arc::clone(&first.metrics),
            Arc::clone(&first.gates),
        );
        lock(&self.reported).push(Arc::downgrade(&pool));
        tokio::spawn(reap(Arc::downgrade(&pool)));
        others.insert(key, Arc::clone(&pool));
        pool
    }

    /// Every pool of the family.
    pub fn all(&self) -> Vec<Arc<UpstreamPool>> {
        let mut all = vec![Arc::clone(&self.upstream)];
        all.extend(lock(&self.others).values().cloned());
        all
    }

    /// New limits for every pool of the family.
    pub fn set_limits(&self, limits: PoolLimits) {
        for pool in self.all() {
            pool.set_limits(limits);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
