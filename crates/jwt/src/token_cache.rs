//! Tokens already verified, so a reconnect with the same token (Clerk's
//! session token across reconnects and HTTP requests) skips the signature.
//!
//! Keyed by a cryptographic hash (BLAKE3) of the whole token: a key
//! derived from any part (the signature alone, say) would let a changed
//! payload hit a valid entry, and a weaker hash would let a crafted token
//! collide with a valid one. Every `/sql` request computes one, so the
//! hash is BLAKE3 rather than SHA-256: on a CPU without SHA instructions,
//! SHA-256 of a typical 800-byte token was a fifth of a request's work.
//! Entries are bounded in number and leave at the token's `exp`; only tokens
//! that passed every check enter. Time-dependent checks (`exp`, `nbf`,
//! token age) and the role check still run on every hit.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::verify::Identity;

/// Default number of tokens remembered.
pub const DEFAULT_CAPACITY: u64 = 100_000;

/// A token that verified.
pub(crate) struct Verified {
    /// Index of the provider that issued it.
    pub provider: usize,
    /// The key it was verified with (`None` for a shared secret or a JWK
    /// without kid); a hit whose kid left the JWKS is dropped.
    pub kid: Option<String>,
    /// Whether it was verified with the provider's shared secret.
    pub shared_secret: bool,
    /// Its claims, for the time-dependent checks.
    pub claims: Map<String, Value>,
    /// The identity, role still unset.
    pub identity: Identity,
}

pub(crate) type Key = [u8; 32];

/// Bounded cache of verified tokens; `None` when disabled (capacity 0).
pub(crate) struct TokenCache {
    cache: Option<moka::sync::Cache<Key, Arc<Verified>>>,
    /// Emptied for good: its verifier was replaced by a reload
    /// ([`TokenCache::retire`]).
    retired: std::sync::atomic::AtomicBool,
}

struct UntilExp;

impl moka::Expiry<Key, Arc<Verified>> for UntilExp {
    fn expire_after_create(
        &self,
        _key: &Key,
        value: &Arc<Verified>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        // Memory hygiene only: correctness comes from checking `exp` against
        // the injected clock on every hit.
        Some(Duration::from_secs(
            value
                .identity
                .expires_at
                .saturating_sub(wall)
                .saturating_add(60),
        ))
    }
}

impl TokenCache {
    pub fn new(capacity: u64) -> Self {
        Self {
            cache: (capacity > 0).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(capacity)
                    .expire_after(UntilExp)
                    .build()
            }),
            retired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn enabled(&self) -> bool {
        self.cache.is_some() && !self.retired.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Empties the cache and keeps it empty: the sessions of a replaced
    /// configuration live on, and must not keep its tokens resident.
    pub fn retire(&self) {
        self.retired
            .store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(cache) = &self.cache {
            cache.invalidate_all();
            cache.run_pending_tasks();
        }
    }

    pub fn key(token: &str) -> Key {
        *blake3::hash(token.as_bytes()).as_bytes()
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Verified>> {
        self.cache.as_ref()?.get(key)
    }

    pub fn insert(&self, key: Key, verified: Verified) {
        if let Some(cache) = self.cache.as_ref().filter(|_| self.enabled()) {
            cache.insert(key, Arc::new(verified));
        }
    }

    pub fn len(&self) -> u64 {
        self.cache.as_ref().map_or(0, |cache| {
            cache.run_pending_tasks();
            cache.entry_count()
        })
    }

    pub fn remove(&self, key: &Key) {
        if let Some(cache) = &self.cache {
            cache.invalidate(key);
        }
    }
}
