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
//! All times are the injected `now` (unix seconds), so tests are exact.
//!
//! [`FetchSettings::min_ttl`]: crate::provider::FetchSettings::min_ttl

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use moka::ops::compute::Op;

use crate::fetch::{FetchError, Fetcher};
use crate::jwks::KeySet;
use crate::provider::{KeySource, ProviderConfig};

/// One fetch of one provider's keys.
pub(crate) struct Fetched {
    pub keys: KeySet,
    /// When the keys were fetched (unix seconds).
    pub fetched_at: u64,
    /// Until when they are fresh.
    pub fresh_until: u64,
    /// Increases with every successful fetch of any provider; tells a waiter
    /// whether someone else fetched while it waited.
    pub generation: u64,
}

impl Fetched {
    /// When a background refresh should start: the last fifth of the lifetime.
    fn refresh_at(&self) -> u64 {
        self.fresh_until - (self.fresh_until - self.fetched_at) / 5
    }
}

struct ProviderKeys {
    config: Arc<ProviderConfig>,
    fetcher: Fetcher,
    /// The JWKS URL learned through OIDC discovery.
    discovered: Mutex<Option<String>>,
    /// Whether a background refresh is running.
    refreshing: AtomicBool,
    /// Last refetch for an unknown kid (unix seconds + 1; 0 = never).
    last_forced: AtomicU64,
    /// The running background refresh, for [`KeyStore::settle`].
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// All providers' keys.
pub(crate) struct KeyStore {
    providers: Vec<ProviderKeys>,
    cache: moka::future::Cache<usize, Arc<Fetched>>,
    generation: AtomicU64,
}

/// Keys could not be had for a provider.
pub(crate) struct Unavailable;

impl KeyStore {
    pub fn new(configs: &[Arc<ProviderConfig>]) -> Result<Arc<Self>, (String, String)> {
        let mut providers = Vec::with_capacity(configs.len());
        for config in configs {
            let fetcher = Fetcher::new(config.fetch.clone())
                .map_err(|reason| (config.name.clone(), reason))?;
            providers.push(ProviderKeys {
                config: Arc::clone(config),
                fetcher,
                discovered: Mutex::new(None),
                refreshing: AtomicBool::new(false),
                last_forced: AtomicU64::new(0),
                task: Mutex::new(None),
            });
        }
        Ok(Arc::new(Self {
            cache: moka::future::Cache::builder()
                .max_capacity(providers.len().max(1) as u64)
                .build(),
            providers,
            generation: AtomicU64::new(0),
        }))
    }

    /// Keys to verify with at `now`, fetching only when none are usable.
    pub async fn keys(
        self: &Arc<Self>,
        index: usize,
        now: u64,
    ) -> Result<Arc<Fetched>, Unavailable> {
        let provider = &self.providers[index];
        let cached = self.cache.get(&index).await;
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
        self.cache.get(&index).await
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
            let seen = store.cache.get(&index).await.map(|f| f.generation);
            if store.fetch_now(index, now, seen).await.is_err()
                && let Some(stale) = store.cache.get(&index).await
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
        let result = self
            .cache
            .entry(index)
            .and_compute_with(|existing| async move {
                if let Some(entry) = &existing
                    && Some(entry.value().generation) != seen
                {
                    return Op::Nop;
                }
                match self.fetch(index, now).await {
                    Ok(fetched) => Op::Put(Arc::new(fetched)),
                    Err(error) => {
                        *failure_slot = Some(error);
                        Op::Nop
                    }
                }
            })
            .await;
        if let Some(error) = failure {
            let provider = &self.providers[index];
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
            generation: self.generation.fetch_add(1, Ordering::SeqCst) + 1,
        })
    }
}
