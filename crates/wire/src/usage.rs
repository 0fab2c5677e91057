//! Usage by identity with bounded cardinality (`[metrics]`): the heaviest
//! users and tenants over a rolling window ([`crate::heavy`]), for the
//! console's `SHOW IDENTITIES` and `SHOW TENANTS` and the admin API, and
//! Prometheus series for the tenants the configuration names, never one
//! series per user.
//!
//! A session resolves its [`UsageSubject`] once, at login (the keys hashed, a named
//! tenant's counters found); each transaction then costs one shard lock
//! per tracker and, for a named tenant, two relaxed atomic adds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use authgres_jwt::Identity;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::time::Instant;

use crate::heavy::{Heavy, Labels, Limits, TopK};
use crate::metrics::emit;

/// Every default of `[metrics]`, in one place.
pub mod defaults {
    use std::time::Duration;

    /// Identities (and, apart, tenants) the trackers hold.
    pub const TOP_IDENTITIES: usize = 128;
    /// The trackers' window.
    pub const TOP_WINDOW: Duration = Duration::from_secs(60);
}

/// `[metrics]`: what is counted per identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageConfig {
    /// Identities (and, apart, tenants) the trackers hold.
    pub top_identities: usize,
    /// The window `SHOW IDENTITIES` covers (the last full one and the
    /// current one).
    pub top_window: Duration,
    /// Tenants with Prometheus series of their own.
    pub tenants: Vec<String>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self {
            top_identities: defaults::TOP_IDENTITIES,
            top_window: defaults::TOP_WINDOW,
            tenants: Vec::new(),
        }
    }
}

/// One named tenant's totals.
#[derive(Debug, Default)]
struct TenantCounts {
    transactions: AtomicU64,
    xact_us: AtomicU64,
}

/// The trackers and the named tenants' counters.
#[derive(Debug)]
pub(crate) struct Usage {
    identities: TopK,
    tenants: TopK,
    named: RwLock<Named>,
}

/// The tenants named now, sorted, and the counters of every tenant ever
/// named (kept, so a tenant named again counts on).
#[derive(Debug, Default)]
struct Named {
    now: Vec<String>,
    counts: HashMap<String, Arc<TenantCounts>>,
}

impl Default for Usage {
    fn default() -> Self {
        let limits = limits(&UsageConfig::default());
        let now = Instant::now();
        Self {
            identities: TopK::new(limits, now),
            tenants: TopK::new(limits, now),
            named: RwLock::default(),
        }
    }
}

fn limits(config: &UsageConfig) -> Limits {
    Limits {
        keys: config.top_identities,
        window: config.top_window,
    }
}

/// A session's identity for usage, resolved at login.
#[derive(Debug)]
pub struct UsageSubject {
    usage: Arc<Usage>,
    identity: (u64, Arc<Labels>),
    tenant: Option<(u64, Arc<Labels>)>,
    /// The tenant's own series, when the configuration names it.
    series: Option<Arc<TenantCounts>>,
}

impl UsageSubject {
    /// Counts one transaction that took `us` microseconds, ending `now`.
    pub(crate) fn transaction(&self, us: u64, now: Instant) {
        let (key, labels) = &self.identity;
        self.usage.identities.record(*key, labels, us, now);
        if let Some((key, labels)) = &self.tenant {
            self.usage.tenants.record(*key, labels, us, now);
        }
        if let Some(series) = &self.series {
            series.transactions.fetch_add(1, Ordering::Relaxed);
            series.xact_us.fetch_add(us, Ordering::Relaxed);
        }
    }
}

impl Usage {
    /// Follows a (re)loaded configuration.
    pub(crate) fn configure(&self, config: &UsageConfig) {
        let now = Instant::now();
        self.identities.configure(limits(config), now);
        self.tenants.configure(limits(config), now);
        let mut named = self.named.write().unwrap_or_else(PoisonError::into_inner);
        let mut tenants = config.tenants.clone();
        tenants.sort();
        tenants.dedup();
        for tenant in &tenants {
            named.counts.entry(tenant.clone()).or_default();
        }
        named.now = tenants;
    }

    /// The [`UsageSubject`] of a session with `identity`.
    pub(crate) fn who(self: &Arc<Self>, identity: &Identity) -> UsageSubject {
        let labels = Arc::new(Labels {
            provider: Arc::clone(&identity.provider),
            user_id: Some(identity.user_id.clone()),
            tenant: identity.tenant.clone(),
        });
        let tenant = identity.tenant.as_ref().map(|tenant| {
            let labels = Arc::new(Labels {
                provider: Arc::clone(&identity.provider),
                user_id: None,
                tenant: Some(tenant.clone()),
            });
            (self.tenants.key(&labels), labels)
        });
        let series = identity.tenant.as_ref().and_then(|tenant| {
            let named = self.named.read().unwrap_or_else(PoisonError::into_inner);
            named
                .now
                .binary_search(tenant)
                .ok()
                .and_then(|_| named.counts.get(tenant).cloned())
        });
        UsageSubject {
            usage: Arc::clone(self),
            identity: (self.identities.key(&labels), labels),
            tenant,
            series,
        }
    }

    /// The `n` heaviest identities now.
    pub(crate) fn top_identities(&self, n: usize) -> Vec<IdentityUsage> {
        let now = Instant::now();
        self.identities
            .top(n, now)
            .into_iter()
            .map(Into::into)
            .collect()
    }

    /// The `n` heaviest tenants now.
    pub(crate) fn top_tenants(&self, n: usize) -> Vec<IdentityUsage> {
        let now = Instant::now();
        self.tenants
            .top(n, now)
            .into_iter()
            .map(Into::into)
            .collect()
    }

    /// The named tenants' series, for `/metrics`.
    pub(crate) fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let transactions = Family::<TenantLabels, Counter>::default();
        let seconds = Family::<TenantLabels, Counter<f64>>::default();
        {
            let named = self.named.read().unwrap_or_else(PoisonError::into_inner);
            for tenant in &named.now {
                let Some(counts) = named.counts.get(tenant) else {
                    continue;
                };
                let labels = TenantLabels {
                    tenant: tenant.clone(),
                };
                transactions
                    .get_or_create(&labels)
                    .inc_by(counts.transactions.load(Ordering::Relaxed));
                let us = counts.xact_us.load(Ordering::Relaxed);
                seconds.get_or_create(&labels).inc_by(us as f64 / 1e6);
            }
        }
        emit(
            encoder,
            "authgres_tenant_transactions",
            "Transactions of the tenants named in [metrics] tenants, every transport together",
            &transactions,
        )?;
        emit(
            encoder,
            "authgres_tenant_transaction_seconds",
            "Time in transactions of the tenants named in [metrics] tenants",
            &seconds,
        )
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

/// One identity's (or tenant's) usage over the window, as the console and
/// the admin API list it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IdentityUsage {
    /// The provider that verified its tokens.
    pub provider: String,
    /// The user (`auth.user_id()`); `None` in the tenants' list.
    pub user_id: Option<String>,
    /// The tenant, when its provider names one.
    pub tenant: Option<String>,
    /// Transactions counted in the window.
    pub transactions: u64,
    /// Their time, in microseconds.
    pub xact_time_us: u64,
    /// The time of an average one.
    pub avg_xact_us: u64,
    /// How much more time it may have had, uncounted: non-zero when it
    /// took the place of a lighter identity in the bounded tracker (its
    /// counts are exact from then on).
    pub error_bound_us: u64,
    /// The seconds the counts cover.
    pub window_seconds: u64,
}

impl From<Heavy> for IdentityUsage {
    fn from(heavy: Heavy) -> Self {
        Self {
            provider: heavy.labels.provider.to_string(),
            user_id: heavy.labels.user_id.clone(),
            tenant: heavy.labels.tenant.clone(),
            transactions: heavy.transactions,
            xact_time_us: heavy.xact_us,
            avg_xact_us: heavy.xact_us.checked_div(heavy.transactions).unwrap_or(0),
            error_bound_us: heavy.error_us,
            window_seconds: heavy.window.as_secs(),
        }
    }
}
