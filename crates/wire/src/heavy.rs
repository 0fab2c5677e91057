//! The heaviest keys (identities, tenants) over a rolling window, in
//! bounded memory: the space-saving algorithm (Metwally, Agrawal, El
//! Abbadi, "Efficient computation of frequent and top-k elements in data
//! streams", 2005), weighted by transaction time.
//!
//! Each shard keeps at most its share of the configured number of keys. A
//! key not held replaces the lightest one and inherits its weight as an
//! `error`: the key's true weight is at least its own counts and at most
//! counts plus error, and any key heavier than the shard's total weight
//! divided by its slots is guaranteed a place, however many light keys
//! pass. Time is cut into windows; a listing covers the window before the
//! current one and the current one so far.
//!
//! Updated once per transaction: one uncontended lock of one of
//! [`SHARDS`] shards (chosen by the key's hash, computed once per session)
//! and a hash-map lookup by that hash. Keys are hashed with a random
//! per-process key, so clients cannot aim collisions at one another.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher as _;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::time::Instant;

/// Shards: sessions on two cores rarely meet on one lock.
pub(crate) const SHARDS: usize = 8;

/// Who a key stands for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Labels {
    /// The provider that verified the token.
    pub(crate) provider: Arc<str>,
    /// The user (`auth.user_id()`); `None` for a tenant's key.
    pub(crate) user_id: Option<String>,
    /// The tenant, when the provider names one.
    pub(crate) tenant: Option<String>,
}

/// How many keys, over how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Keys held at most, all shards together (rounded up to a multiple
    /// of [`SHARDS`]).
    pub(crate) keys: usize,
    /// The window: a listing covers the last full one and the current one.
    pub(crate) window: Duration,
}

/// One key's counts in one window.
#[derive(Debug, Clone)]
struct Slot {
    labels: Arc<Labels>,
    transactions: u64,
    xact_us: u64,
    /// Weight inherited from the key it replaced: an upper bound of what
    /// this key's counts may lack.
    error_us: u64,
}

impl Slot {
    fn weight(&self) -> u64 {
        self.xact_us.saturating_add(self.error_us)
    }
}

#[derive(Debug)]
struct Shard {
    limits: Limits,
    /// When the current window started.
    started: Instant,
    /// By key: already a keyed hash of the labels, so hashed again only
    /// cheaply.
    current: FxHashMap<u64, Slot>,
    previous: FxHashMap<u64, Slot>,
    /// Whether a window has ended since the shard was made.
    rolled: bool,
}

impl Shard {
    fn new(limits: Limits, now: Instant) -> Self {
        Self {
            limits,
            started: now,
            current: FxHashMap::default(),
            previous: FxHashMap::default(),
            rolled: false,
        }
    }

    fn slots(&self) -> usize {
        self.limits.keys.div_ceil(SHARDS).max(1)
    }

    /// Moves to the window `now` is in.
    fn roll(&mut self, now: Instant) {
        let window = self.limits.window.max(Duration::from_millis(1));
        let age = now.saturating_duration_since(self.started);
        // Most transactions land in the current window: no division.
        if age < window {
            return;
        }
        let periods = age.as_nanos() / window.as_nanos();
        if periods == 1 {
            self.previous = std::mem::take(&mut self.current);
        } else {
            self.previous.clear();
            self.current.clear();
        }
        self.rolled = true;
        let periods = u32::try_from(periods).unwrap_or(u32::MAX);
        self.started += window.saturating_mul(periods);
    }

    fn record(&mut self, key: u64, labels: &Arc<Labels>, us: u64) {
        if let Some(slot) = self.current.get_mut(&key) {
            slot.transactions += 1;
            slot.xact_us = slot.xact_us.saturating_add(us);
            return;
        }
        let mut error_us = 0;
        if self.current.len() >= self.slots()
            && let Some((&lightest, slot)) = self.current.iter().min_by_key(|(_, s)| s.weight())
        {
            error_us = slot.weight();
            self.current.remove(&lightest);
        }
        self.current.insert(
            key,
            Slot {
                labels: Arc::clone(labels),
                transactions: 1,
                xact_us: us,
                error_us,
            },
        );
    }

    /// How long a listing covers at `now`.
    fn span(&self, now: Instant) -> Duration {
        let current = now.saturating_duration_since(self.started);
        if self.rolled {
            current + self.limits.window
        } else {
            current
        }
    }
}

/// A key's counts over the window, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Heavy {
    pub(crate) labels: Arc<Labels>,
    /// Transactions counted.
    pub(crate) transactions: u64,
    /// Their time, in microseconds.
    pub(crate) xact_us: u64,
    /// How much more time the key may have had, uncounted (0: exact).
    pub(crate) error_us: u64,
    /// How long the listing covers.
    pub(crate) window: Duration,
}

/// The tracker.
#[derive(Debug)]
pub(crate) struct TopK {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
}

impl TopK {
    pub(crate) fn new(limits: Limits, now: Instant) -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::new(limits, now)))
                .collect(),
            hasher: RandomState::new(),
        }
    }

    /// The key of `labels` (computed once per session).
    pub(crate) fn key(&self, labels: &Labels) -> u64 {
        self.hasher.hash_one(labels)
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Shard> {
        let index = usize::try_from(key % SHARDS as u64).unwrap_or(0);
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one transaction of `us` microseconds for `key`.
    pub(crate) fn record(&self, key: u64, labels: &Arc<Labels>, us: u64, now: Instant) {
        let mut shard = self.shard(key);
        shard.roll(now);
        shard.record(key, labels, us);
    }

    /// Changes the limits; the counts start over when they change.
    pub(crate) fn configure(&self, limits: Limits, now: Instant) {
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            if shard.limits != limits {
                *shard = Shard::new(limits, now);
            }
        }
    }

    /// The `n` heaviest keys, heaviest (by time, error included) first.
    pub(crate) fn top(&self, n: usize, now: Instant) -> Vec<Heavy> {
        let mut all: Vec<Heavy> = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            shard.roll(now);
            let window = shard.span(now);
            let mut merged: HashMap<u64, Heavy> = HashMap::new();
            for (key, slot) in shard.previous.iter().chain(shard.current.iter()) {
                let entry = merged.entry(*key).or_insert_with(|| Heavy {
                    labels: Arc::clone(&slot.labels),
                    transactions: 0,
                    xact_us: 0,
                    error_us: 0,
                    window,
                });
                entry.transactions += slot.transactions;
                entry.xact_us = entry.xact_us.saturating_add(slot.xact_us);
                entry.error_us = entry.error_us.saturating_add(slot.error_us);
            }
            all.extend(merged.into_values());
        }
        all.sort_by(|a, b| {
            let weight = |h: &Heavy| h.xact_us.saturating_add(h.error_us);
            weight(b)
                .cmp(&weight(a))
                .then_with(|| b.transactions.cmp(&a.transactions))
        });
        all.truncate(n);
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(user: &str) -> Arc<Labels> {
        Arc::new(Labels {
            provider: "p".into(),
            user_id: Some(user.to_owned()),
            tenant: None,
        })
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn the_heavy_key_wins_among_many_light_ones_in_bounded_memory() {
        let now = Instant::now();
        let top = TopK::new(
            Limits {
                keys: 64,
                window: MINUTE,
            },
            now,
        );
        let heavy = labels("heavy");
        let heavy_key = top.key(&heavy);
        for i in 0..5000 {
            let light = labels(&format!("light-{i}"));
            top.record(top.key(&light), &light, 100, now);
            if i % 20 == 0 {
                top.record(heavy_key, &heavy, 1000, now);
            }
        }
        let listed = top.top(usize::MAX, now);
        assert!(listed.len() <= 64, "{} keys held", listed.len());
        let first = &listed[0];
        assert_eq!(first.labels, heavy);
        assert!(first.xact_us + first.error_us >= 250 * 1000);
        for shard in top.shards.iter() {
            let shard = shard.lock().expect("lock");
            assert!(shard.current.len() <= 8);
        }
    }

    #[test]
    fn an_exact_count_has_no_error_and_the_window_rolls_over() {
        let start = Instant::now();
        let top = TopK::new(
            Limits {
                keys: 16,
                window: MINUTE,
            },
            start,
        );
        let a = labels("a");
        let key = top.key(&a);
        for _ in 0..3 {
            top.record(key, &a, 200, start);
        }
        let [only] = &top.top(10, start + Duration::from_secs(1))[..] else {
            panic!("one key");
        };
        assert_eq!(
            (only.transactions, only.xact_us, only.error_us),
            (3, 600, 0)
        );
        assert_eq!(only.window, Duration::from_secs(1));
        // The next window still lists the last one.
        top.record(key, &a, 100, start + MINUTE + Duration::from_secs(5));
        let [only] = &top.top(10, start + MINUTE + Duration::from_secs(5))[..] else {
            panic!("one key");
        };
        assert_eq!((only.transactions, only.xact_us), (4, 700));
        assert_eq!(only.window, MINUTE + Duration::from_secs(5));
        // One window later the first one is gone; two later, everything.
        let later = top.top(10, start + 2 * MINUTE + Duration::from_secs(1));
        assert_eq!(later[0].transactions, 1);
        assert!(top.top(10, start + 4 * MINUTE).is_empty());
    }

    #[test]
    fn new_limits_start_the_counts_over() {
        let now = Instant::now();
        let limits = Limits {
            keys: 16,
            window: MINUTE,
        };
        let top = TopK::new(limits, now);
        let a = labels("a");
        top.record(top.key(&a), &a, 1, now);
        top.configure(limits, now);
        assert_eq!(top.top(10, now).len(), 1);
        top.configure(Limits { keys: 32, ..limits }, now);
        assert!(top.top(10, now).is_empty());
    }
}
