//! The JWKS cache: each provider's keys, fetched once and kept fresh.
//!
//! - Cold start: the first token fetches; concurrent tokens wait on the same
//!   fetch (single-flight through moka's per-key `and_compute_with`).
//! - Warm: keys are refreshed in the background during the last fifth of
//!   their lifetime, so no login waits on the network once keys are warm.
//! - Lifetime: the provider's `Cache-Control: max-age`, clamped to
//!   [`FetchSettings::min_ttl`, `FetchSettings::max_ttl`].
//! - Stale-if-error: past their lifetime, keys keep verifying while a refresh
//!   runs or fails, up to `max_staleness` after they were fetched; failures
//!   are logged.
//! - Unknown `kid`: at most one refetch per provider per
//!   `unknown_kid_interval`, so forged kids cannot cause a fetch storm.
//!
//! - Reload: a new store keeps the cache, counters and background state of
//!   every provider whose key settings did not change
//!   ([`KeyStore::new`] with the store it replaces), so a config reload
//!   fetches nothing for providers it left alone.
//!
//! All times are the injected `now` (unix seconds), so tests are exact.
//!
//! [`FetchSettings::min_ttl`]: crate::provider::FetchSettings::min_ttl

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use moka::ops::compute::Op;

use crate::fetch::{ClientError, FetchError, Fetcher};
use crate::jwks::KeySet;
use crate::provider::{KeySource, ProviderConfig};

/// One fetch of one provider's keys.
pub(crate) struct Fetched {
    pub keys: KeySet,
    /// When the keys were fetched (unix seconds).
    pub fetched_at: u64,
    /// Until when they are fresh.
    pub fresh_until: u64,
    /// Increases with every successful fetch of the provider; tells a
    /// waiter whether someone else fetched while it waited.
    pub generation: u64,
}

impl Fetched {
    /// When a background refresh should start: the last fifth of the lifetime.
    fn refresh_at(&self) -> u64 {
        self.fresh_until - (self.fresh_until - self.fetched_at) / 5
    }
}

/// One provider's keys and the state of fetching them; shared by the
/// stores of successive configs while the provider's key settings stay.
struct ProviderKeys {
    config: Arc<ProviderConfig>,
    fetcher: Fetcher,
    /// The last good fetch (one entry; moka gives single-flight fetches).
    cache: moka::future::Cache<(), Arc<Fetched>>,
    /// Source of [`Fetched::generation`].
    generation: AtomicU64,
    /// Fetches that succeeded, and that failed.
    fetches: AtomicU64,
    failures: AtomicU64,
    /// The cached keys' `fetched_at` and `fresh_until` (0: none yet),
    /// readable without waiting, for [`KeyStore::status`].
    fetched_at: AtomicU64,
    fresh_until: AtomicU64,
    /// The JWKS URL learned through OIDC discovery.
    discovered: Mutex<Option<String>>,
    /// Whether a background refresh is running.
    refreshing: AtomicBool,
    /// Last refetch for an unknown kid (unix seconds + 1; 0 = never).
    last_forced: AtomicU64,
    /// The running background refresh, for [`KeyStore::settle`].
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl ProviderKeys {
    fn new(config: &Arc<ProviderConfig>) -> Result<Self, (String, ClientError)> {
        let fetcher =
            Fetcher::new(config.fetch.clone()).map_err(|reason| (config.name.clone(), reason))?;
        Ok(Self {
            config: Arc::clone(config),
            fetcher,
            cache: moka::future::Cache::builder().max_capacity(1).build(),
            generation: AtomicU64::new(0),
            fetches: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            fetched_at: AtomicU64::new(0),
            fresh_until: AtomicU64::new(0),
            discovered: Mutex::new(None),
            refreshing: AtomicBool::new(false),
            last_forced: AtomicU64::new(0),
            task: Mutex::new(None),
        })
    }

    /// Whether keys fetched for `self` serve `config` as well: same
    /// issuer, key source and fetch settings.
    fn serves(&self, config: &ProviderConfig) -> bool {
        let ours = &self.config;
        ours.issuer == config.issuer && ours.keys == config.keys && ours.fetch == config.fetch
    }
}

/// All providers' keys.
pub(crate) struct KeyStore {
    providers: Vec<Arc<ProviderKeys>>,
}

/// Where one provider's keys stand, for metrics and readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    /// The provider's name.
    pub provider: String,
    /// Whether it has keys to fetch (a shared-secret provider has none).
    pub fetches_keys: bool,
    /// JWKS fetches that succeeded since the provider was configured.
    pub fetches: u64,
    /// JWKS fetches that failed.
    pub failures: u64,
    /// How long ago the keys in use were fetched; `None` before the first
    /// successful fetch.
    pub age: Option<std::time::Duration>,
    /// Whether the keys are past their lifetime (still used, within
    /// `max_staleness`, while refreshes fail).
    pub stale: bool,
    /// Whether tokens can be verified now: keys are loaded and within
    /// their staleness limit (always, for a shared-secret provider).
    pub usable: bool,
}

/// Keys could not be had for a provider.
pub(crate) struct Unavailable;

impl KeyStore {
    /// A store for `configs`, taking over from `previous` the keys of
    /// every provider whose key settings are unchanged.
    pub fn new(
        configs: &[Arc<ProviderConfig>],
        previous: Option<&KeyStore>,
    ) -> Result<Arc<Self>, (String, ClientError)> {
        let mut providers = Vec::with_capacity(configs.len());
        for config in configs {
            let kept = previous
                .into_iter()
                .flat_map(|store| &store.providers)
                .find(|keys| keys.serves(config));
            providers.push(match kept {
                Some(keys) => Arc::clone(keys),
                None => Arc::new(ProviderKeys::new(config)?),
            });
        }
        Ok(Arc::new(Self { providers }))
    }

    /// Where each provider's keys stand at `now`.
    pub fn status(&self, now: u64) -> Vec<KeyStatus> {
        self.providers
            .iter()
            .map(|provider| {
                let config = &provider.config;
                let fetches_keys = config.keys != KeySource::SharedSecretOnly;
                let fetched_at = provider.fetched_at.load(Ordering::Relaxed);
                let loaded = fetched_at != 0;
                let stale_limit = fetched_at.saturating_add(config.fetch.max_staleness.as_secs());
                KeyStatus {
                    provider: config.name.clone(),
                    fetches_keys,
                    fetches: provider.fetches.load(Ordering::Relaxed),
                    failures: provider.failures.load(Ordering::Relaxed),
                    age: loaded
                        .then(|| std::time::Duration::from_secs(now.saturating_sub(fetched_at))),
                    stale: loaded && now >= provider.fresh_until.load(Ordering::Relaxed),
                    usable: !fetches_keys || (loaded && now < stale_limit),
                }
            })
            .collect()
    }

    /// Keys to verify with at `now`, fetching only when none are usable.
    pub async fn keys(
        self: &Arc<Self>,
        index: usize,
        now: u64,
    ) -> Result<Arc<Fetched>, Unavailable> {
        let provider = &self.providers[index];
        let cached = provider.cache.get(&()).await;
        if let Some(fetched) = &cached {
            if now < fetched.fresh_until {
                if now >= fetched.refresh_at() {
                    self.refresh_in_background(index, now);
                }
                return Ok(Arc::clone(fetched));
            }
            let stale_limit = fetched
                .fetched_at
                .saturating_add(provider.config.fetch.max_staleness.as_secs());
            if now < stale_limit {
                self.refresh_in_background(index, now);
                return Ok(Arc::clone(fetched));
            }
        }
        self.fetch_now(index, now, cached.map(|f| f.generation))
            .await
            .map_err(|_| Unavailable)
    }

    /// The keys in the cache, whatever their age, without fetching.
    pub async fn cached(&self, index: usize) -> Option<Arc<Fetched>> {
        self.providers[index].cache.get(&()).await
    }

    /// Refetches for a token whose `kid` is unknown, unless this provider did
    /// so within `unknown_kid_interval` of `now`. Returns the new keys, or
    /// `None` when the refetch was not allowed or failed.
    pub async fn refetch_for_unknown_kid(
        self: &Arc<Self>,
        index: usize,
        now: u64,
        seen: &Fetched,
    ) -> Option<Arc<Fetched>> {
        let provider = &self.providers[index];
        let interval = provider.config.fetch.unknown_kid_interval.as_secs();
        let allowed = provider
            .last_forced
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |last| {
                let due = last == 0 || now.saturating_add(1) >= last.saturating_add(interval);
                due.then_some(now.saturating_add(1))
            })
            .is_ok();
        if !allowed {
            return None;
        }
        self.fetch_now(index, now, Some(seen.generation)).await.ok()
    }

    /// Waits for running background refreshes (tests and shutdown).
    pub async fn settle(&self) {
        for provider in &self.providers {
            let task = provider
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(task) = task {
                let _ = task.await;
            }
        }
    }

    fn refresh_in_background(self: &Arc<Self>, index: usize, now: u64) {
        let provider = &self.providers[index];
        if provider.refreshing.swap(true, Ordering::SeqCst) {
            return;
        }
        let store = Arc::clone(self);
        let task = tokio::spawn(async move {
            let seen = store.cached(index).await.map(|f| f.generation);
            if store.fetch_now(index, now, seen).await.is_err()
                && let Some(stale) = store.cached(index).await
                && now >= stale.fresh_until
            {
                let provider = &store.providers[index];
                tracing::warn!(
                    provider = %provider.config.name,
                    age_secs = now.saturating_sub(stale.fetched_at),
                    max_staleness_secs = provider.config.fetch.max_staleness.as_secs(),
                    "identity provider unreachable: still verifying with the last good keys"
                );
            }
            store.providers[index]
                .refreshing
                .store(false, Ordering::SeqCst);
        });
        *provider.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(task);
    }

    /// Fetches unless someone else fetched since generation `seen`;
    /// concurrent callers for one provider share a single fetch.
    async fn fetch_now(
        &self,
        index: usize,
        now: u64,
        seen: Option<u64>,
    ) -> Result<Arc<Fetched>, FetchError> {
        let mut failure = None;
        let failure_slot = &mut failure;
        let provider = &self.providers[index];
        let result = provider
            .cache
            .entry(())
            .and_compute_with(|existing| async move {
                if let Some(entry) = &existing
                    && Some(entry.value().generation) != seen
                {
                    return Op::Nop;
                }
                match self.fetch(index, now).await {
                    Ok(fetched) => {
                        provider.fetches.fetch_add(1, Ordering::Relaxed);
                        provider
                            .fresh_until
                            .store(fetched.fresh_until, Ordering::Relaxed);
                        provider
                            .fetched_at
                            .store(fetched.fetched_at.max(1), Ordering::Relaxed);
                        Op::Put(Arc::new(fetched))
                    }
                    Err(error) => {
                        provider.failures.fetch_add(1, Ordering::Relaxed);
                        *failure_slot = Some(error);
                        Op::Nop
                    }
                }
            })
            .await;
        if let Some(error) = failure {
            tracing::warn!(provider = %provider.config.name, %error, "could not fetch JWKS");
            return Err(error);
        }
        result
            .into_entry()
            .map(|entry| entry.into_value())
            .ok_or_else(|| FetchError::Refused("no keys".into()))
    }

    async fn fetch(&self, index: usize, now: u64) -> Result<Fetched, FetchError> {
        let provider = &self.providers[index];
        let config = &provider.config;
        let url = match &config.keys {
            KeySource::Jwks(url) => url.clone(),
            KeySource::SharedSecretOnly => {
                return Err(FetchError::Refused("provider has no JWKS".into()));
            }
            KeySource::Discovery => {
                let known = provider
                    .discovered
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                match known {
                    Some(url) => url,
                    None => {
                        let url = provider.fetcher.discover(&config.issuer).await?;
                        tracing::info!(provider = %config.name, jwks_uri = %url, "discovered JWKS");
                        *provider
                            .discovered
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner) = Some(url.clone());
                        url
                    }
                }
            }
        };
        let document = provider.fetcher.jwks(&url).await?;
        let fetch = &config.fetch;
        let ttl = document
            .max_age
            .unwrap_or(fetch.min_ttl)
            .clamp(fetch.min_ttl, fetch.max_ttl)
            .as_secs();
        tracing::info!(
            provider = %config.name,
            keys = document.keys.keys.len(),
            skipped = document.keys.skipped,
            ttl_secs = ttl,
            "fetched JWKS"
        );
        Ok(Fetched {
            keys: document.keys,
            fetched_at: now,
            fresh_until: now.saturating_add(ttl.max(1)),
            generation: provider.generation.fetch_add(1, Ordering::SeqCst) + 1,
        })
    }
}
