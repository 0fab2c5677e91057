//! Tokens already verified, so a reconnect with the same token (Clerk's
//! session token across reconnects and HTTP requests) skips the signature.
//!
//! Keyed by a cryptographic hash (BLAKE3) of the whole token: a key
//! derived from any part (the signature alone, say) would let a changed
//! payload hit a valid entry, and a weaker hash would let a crafted token
//! collide with a valid one. A login computes one, so the hash is BLAKE3
//! rather than SHA-256: on a CPU without SHA instructions, SHA-256 of a
//! typical 800-byte token was a fifth of a `/sql` request's work. A `/sql`
//! request whose connection presented the same token before skips even
//! that: it is compared with the connection's [`LastToken`].
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

    pub fn insert(&self, key: Key, verified: Arc<Verified>) {
        if let Some(cache) = self.cache.as_ref().filter(|_| self.enabled()) {
            cache.insert(key, verified);
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

/// The last token one connection presented and what it verified to, for
/// [`crate::Verifier::verify_remembering`]: an HTTP client sends its token
/// with every request, and comparing it byte for byte with the one before
/// costs less than hashing it for the shared cache (a tenth of a `/sql`
/// request's work). It answers only for the verifier that filled it, and
/// only while that verifier's cache is in use; a hit passes the same
/// checks as a hit in the shared cache.
#[derive(Default)]
pub struct LastToken(Option<Remembered>);

struct Remembered {
    /// The verifier that verified it ([`crate::Verifier`]'s id).
    verifier: u64,
    token: Box<str>,
    verified: Arc<Verified>,
}

impl LastToken {
    /// What `token` verified to, if it is the token remembered and
    /// `verifier` remembered it.
    pub(crate) fn get(&self, verifier: u64, token: &str) -> Option<&Arc<Verified>> {
        self.0
            .as_ref()
            .filter(|last| last.verifier == verifier && same_bytes(&last.token, token))
            .map(|last| &last.verified)
    }

    /// Remembers `token` as verified by `verifier`, in place of the last.
    pub(crate) fn remember(&mut self, verifier: u64, token: &str, verified: Arc<Verified>) {
        match &mut self.0 {
            // The same token seen again through the shared cache (after a
            // reload): its text is already here.
            Some(last) if same_bytes(&last.token, token) => {
                last.verifier = verifier;
                last.verified = verified;
            }
            last => {
                *last = Some(Remembered {
                    verifier,
                    token: token.into(),
                    verified,
                });
            }
        }
    }

    /// Forgets the token remembered.
    pub(crate) fn forget(&mut self) {
        self.0 = None;
    }
}

/// Whether `a` and `b` are the same bytes, compared in a time that
/// depends on their length only: the token a connection remembers may be
/// another user's, and how far a guess matched must not show.
fn same_bytes(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && (a.iter().zip(b)).fold(0, |differ, (x, y)| differ | (x ^ y)) == 0
}
