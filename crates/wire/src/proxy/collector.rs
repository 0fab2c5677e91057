//! The scrape-time half of `/metrics`: what the proxy holds now (clients,
//! pools, provider keys) and the per-database totals of [`crate::stats`],
//! read when Prometheus asks. The event counters live in
//! [`crate::metrics`].

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};

use super::Proxy;
use crate::clients::ClientState;
use crate::metrics::{DatabaseLabels, PoolKeyLabels, emit};
use crate::stats::{self, Counts, Entry};
use crate::transport::Transport;

/// Reads the proxy's state at scrape time; register it with
/// [`Registry::register_collector`].
#[derive(Debug)]
pub struct Collector {
    proxy: Weak<Proxy>,
}

impl Collector {
    /// A collector for `proxy` (holding it weakly). The series the
    /// configuration names are made at zero now, so the first scrape has
    /// them.
    pub fn new(proxy: &Arc<Proxy>) -> Self {
        configured_zeros(proxy);
        Self {
            proxy: Arc::downgrade(proxy),
        }
    }
}

/// Makes the event counters' series for what the configuration in force
/// names (providers, databases, roles, pools), at zero.
fn configured_zeros(proxy: &Proxy) {
    let settings = proxy.settings();
    let providers = settings.verifier.key_status(SystemTime::now());
    let pools: Vec<&'static str> = proxy.pools().iter().map(|p| p.name()).collect();
    proxy.metrics.configured(
        providers.iter().map(|status| status.provider.as_str()),
        &settings.config.admission,
        &pools,
    );
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabels {
    transport: &'static str,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolConnectionLabels {
    pool: &'static str,
    database: String,
    role: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

fn i64_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(proxy) = self.proxy.upgrade() else {
            return Ok(());
        };
        // For the next scrape, after a reload that named new ones.
        configured_zeros(&proxy);
        encode_clients(&proxy, &mut encoder)?;
        encode_pools(&proxy, &mut encoder)?;
        encode_keys(&proxy, &mut encoder)?;
        encode_stats(&proxy, &mut encoder)?;
        proxy.metrics.usage.encode(&mut encoder)?;
        emit(
            &mut encoder,
            "authgres_draining",
            "1 once a drain for shutdown is announced",
            &ConstGauge::new(i64::from(proxy.drain().is_unready())),
        )
    }
}

/// Client connections by transport and state.
fn encode_clients(proxy: &Proxy, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let clients = Family::<ClientLabels, Gauge>::default();
    let counts = proxy.clients().counts();
    for transport in [Transport::Wire, Transport::WebSocket, Transport::Http] {
        for state in ClientState::ALL {
            let n = counts.get(&(transport, state)).copied().unwrap_or(0);
            clients
                .get_or_create(&ClientLabels {
                    transport: transport.label(),
                    state: state.label(),
                })
                .set(i64_of(n));
        }
    }
    emit(
        encoder,
        "authgres_clients",
        "Client connections by transport and state",
        &clients,
    )?;

    Ok(())
}

/// Upstream connections, waiting clients and sizes per pool and key.
fn encode_pools(proxy: &Proxy, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let connections = Family::<PoolConnectionLabels, Gauge>::default();
    let waiting = Family::<PoolKeyLabels, Gauge>::default();
    let size = Family::<PoolKeyLabels, Gauge>::default();
    for pool in proxy.pools() {
        for slot in pool.snapshot().slots {
            let key = PoolKeyLabels {
                pool: pool.name(),
                database: slot.database,
                role: slot.role,
            };
            for (state, n) in [("idle", slot.idle), ("in_use", slot.in_use)] {
                connections
                    .get_or_create(&PoolConnectionLabels {
                        pool: key.pool,
                        database: key.database.clone(),
                        role: key.role.clone(),
                        state,
                    })
                    .set(i64_of(n));
            }
            waiting.get_or_create(&key).set(i64_of(slot.waiting));
            size.get_or_create(&key).set(i64_of(slot.size));
        }
    }
    emit(
        encoder,
        "authgres_pool_connections",
        "Upstream connections per pool, database and role, idle or in use",
        &connections,
    )?;
    emit(
        encoder,
        "authgres_pool_waiting_clients",
        "Clients waiting for an upstream connection",
        &waiting,
    )?;
    emit(
        encoder,
        "authgres_pool_size",
        "Most upstream connections allowed per database and role",
        &size,
    )?;

    Ok(())
}

/// Each provider's keys, and the verified-token cache.
fn encode_keys(proxy: &Proxy, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let settings = proxy.settings();
    let verifier = &settings.verifier;
    let fetches = Family::<ProviderLabels, Counter>::default();
    let failures = Family::<ProviderLabels, Counter>::default();
    let age = Family::<ProviderLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let stale = Family::<ProviderLabels, Gauge>::default();
    let usable = Family::<ProviderLabels, Gauge>::default();
    for status in verifier.key_status(SystemTime::now()) {
        if !status.fetches_keys {
            continue;
        }
        let labels = ProviderLabels {
            provider: status.provider,
        };
        fetches.get_or_create(&labels).inc_by(status.fetches);
        failures.get_or_create(&labels).inc_by(status.failures);
        if let Some(key_age) = status.age {
            age.get_or_create(&labels).set(key_age.as_secs_f64());
        }
        stale.get_or_create(&labels).set(i64::from(status.stale));
        usable.get_or_create(&labels).set(i64::from(status.usable));
    }
    emit(
        encoder,
        "authgres_jwks_fetches",
        "JWKS fetches that succeeded, per provider",
        &fetches,
    )?;
    emit(
        encoder,
        "authgres_jwks_fetch_failures",
        "JWKS fetches that failed, per provider",
        &failures,
    )?;
    emit(
        encoder,
        "authgres_jwks_key_age_seconds",
        "Age of the keys in use, per provider",
        &age,
    )?;
    emit(
        encoder,
        "authgres_jwks_stale",
        "1 while a provider's keys are past their lifetime (refreshes failing)",
        &stale,
    )?;
    emit(
        encoder,
        "authgres_jwks_usable",
        "1 while a provider's tokens can be verified",
        &usable,
    )?;
    let cache = verifier.token_cache_stats();
    emit(
        encoder,
        "authgres_token_cache_hits",
        "Logins whose token was found verified already",
        &ConstCounter::new(cache.hits),
    )?;
    emit(
        encoder,
        "authgres_token_cache_misses",
        "Logins whose token was verified in full",
        &ConstCounter::new(cache.misses),
    )?;
    Ok(())
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatsLabels {
    database: String,
    role: String,
    transport: &'static str,
}

/// One family of the per-database totals: a counter or a histogram read
/// from each entry's [`Counts`] per transport.
enum Read {
    Counter(fn(&Counts) -> u64),
    Histogram(Histogram),
}

/// A latency histogram of [`Counts`]: its sum in microseconds and its
/// buckets (its count is theirs, so the two always agree).
struct Histogram {
    sum_us: fn(&Counts) -> u64,
    buckets: fn(&Counts) -> [u64; stats::BUCKETS + 1],
}

fn load(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

/// Transactions, queries, bytes and their latency histograms per database,
/// role and transport; the wait for pooled connections per database and
/// role. The configured databases and roles are reported at zero before
/// their first session.
fn encode_stats(proxy: &Proxy, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let entries = with_configured(proxy);
    let families: [(&str, &str, Read); 6] = [
        (
            "authgres_transactions",
            "Transactions (and statements outside one) completed, by database, role and transport",
            Read::Counter(Counts::transactions),
        ),
        (
            "authgres_queries",
            "Queries completed (each up to its ReadyForQuery; each statement of a /sql request), \
             by database, role and transport",
            Read::Counter(Counts::queries),
        ),
        (
            "authgres_client_received_bytes",
            "Bytes received from clients, by database, role and transport",
            Read::Counter(|c| load(&c.received)),
        ),
        (
            "authgres_client_sent_bytes",
            "Bytes sent to clients, by database, role and transport",
            Read::Counter(|c| load(&c.sent)),
        ),
        (
            "authgres_transaction_duration_seconds",
            "Time from a transaction's first message to the ReadyForQuery that ends it",
            Read::Histogram(Histogram {
                sum_us: |c| load(&c.transaction_us),
                buckets: |c| c.transaction_buckets.counts(),
            }),
        ),
        (
            "authgres_query_duration_seconds",
            "Time from a query's first message to its ReadyForQuery",
            Read::Histogram(Histogram {
                sum_us: |c| load(&c.query_us),
                buckets: |c| c.query_buckets.counts(),
            }),
        ),
    ];
    for (name, help, read) in &families {
        let metric_type = match read {
            Read::Counter(..) => MetricType::Counter,
            Read::Histogram(_) => MetricType::Histogram,
        };
        let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
        for entry in &entries {
            for transport in stats::TRANSPORTS {
                let labels = StatsLabels {
                    database: entry.database.clone(),
                    role: entry.role.clone(),
                    transport: transport.label(),
                };
                let counts = entry.counts(transport);
                let series = family.encode_family(&labels)?;
                encode_read(series, read, counts)?;
            }
        }
    }
    let mut wait = encoder.encode_descriptor(
        "authgres_client_wait_seconds",
        "Time clients waited for a pooled upstream connection, by database and role",
        None,
        MetricType::Counter,
    )?;
    for entry in &entries {
        let labels = DatabaseLabels {
            database: entry.database.clone(),
            role: entry.role.clone(),
        };
        let seconds = load(&entry.wait_us) as f64 / 1e6;
        wait.encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, f64>(&seconds, None)?;
    }
    Ok(())
}

fn encode_read(
    mut series: MetricEncoder<'_>,
    read: &Read,
    counts: &Counts,
) -> Result<(), std::fmt::Error> {
    match read {
        Read::Counter(value) => series.encode_counter::<NoLabelSet, _, f64>(&value(counts), None),
        Read::Histogram(histogram) => {
            let own = (histogram.buckets)(counts);
            let count = stats::total(&own);
            let buckets: Vec<(f64, u64)> = stats::bucket_bounds()
                .chain(std::iter::once(f64::INFINITY))
                .zip(own)
                .collect();
            let sum = (histogram.sum_us)(counts) as f64 / 1e6;
            series.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
        }
    }
}

/// Every entry counted so far, and an empty one for each configured
/// (database, role) not counted yet.
fn with_configured(proxy: &Proxy) -> Vec<Arc<Entry>> {
    let mut entries = proxy.metrics.stats.entries();
    let settings = proxy.settings();
    let policy = &settings.config.admission;
    for database in &policy.databases {
        for role in policy.roles.keys() {
            if !entries
                .iter()
                .any(|e| &e.database == database && &e.role == role)
            {
                entries.push(Arc::new(Entry::new(database, role)));
            }
        }
    }
    entries.sort_by(|a, b| (&a.database, &a.role).cmp(&(&b.database, &b.role)));
    entries
}
