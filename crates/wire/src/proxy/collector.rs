//! The scrape-time half of `/metrics`: what the proxy holds now (clients,
//! pools, provider keys), read when Prometheus asks. The event counters
//! live in [`crate::metrics`].

use std::sync::{Arc, Weak};
use std::time::SystemTime;

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};

use super::Proxy;
use crate::clients::ClientState;
use crate::metrics::PoolKeyLabels;
use crate::transport::Transport;

/// Reads the proxy's state at scrape time; register it with
/// [`Registry::register_collector`].
#[derive(Debug)]
pub struct Collector {
    proxy: Weak<Proxy>,
}

impl Collector {
    /// A collector for `proxy` (holding it weakly).
    pub fn new(proxy: &Arc<Proxy>) -> Self {
        Self {
            proxy: Arc::downgrade(proxy),
        }
    }
}

/// Encodes one metric under `name`.
fn emit(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
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
        encode_clients(&proxy, &mut encoder)?;
        encode_pools(&proxy, &mut encoder)?;
        encode_keys(&proxy, &mut encoder)?;
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
