//! What the proxy counts, for Prometheus.
//!
//! Two kinds: [`Metrics`] holds the counters and histograms the code
//! updates as things happen (logins, verification and checkout times,
//! relayed transactions and bytes, HTTP requests); [`Collector`] reads
//! what already exists at scrape time (clients by state, pool
//! connections, each provider's keys, the verified-token cache, the drain)
//! so nothing is counted twice. The relay's counters are resolved once per
//! session ([`Tally`]): a relayed read costs one relaxed atomic add.
//!
//! Label values come from closed sets (transports, outcomes, the failure
//! classification of [`Classify::label`]) or from the configuration
//! (providers, pool databases and roles); never from what a client sends
//! before it is admitted.

use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::admission::Transport;
use crate::clients::ClientState;
use crate::error::{Classify, Severity};
use crate::session::Proxy;

/// Labels: the transport.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabels {
    transport: &'static str,
}

/// Labels of a login's outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoginLabels {
    transport: &'static str,
    /// `ok`, `refused` (the client's mistake), `failed` (the service's)
    /// or `abandoned` (the client left).
    outcome: &'static str,
    /// The failure classification; `none` for a login that succeeded.
    reason: &'static str,
}

/// Labels: an outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Labels: a failure classification.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

/// Labels of one pool key.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolKeyLabels {
    pool: &'static str,
    database: String,
    role: String,
}

/// Labels: a pool.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: &'static str,
}

/// Labels of an HTTP response.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: &'static str,
    status: u16,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 100 µs to about 13 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// The counters and histograms the proxy updates as it works.
#[derive(Debug)]
pub struct Metrics {
    logins: Family<LoginLabels, Counter>,
    verification: HistogramFamily<OutcomeLabels>,
    upstream_login: Histogram,
    upstream_login_errors: Family<ReasonLabels, Counter>,
    checkout_wait: HistogramFamily<PoolLabels>,
    checkout_timeouts: Family<PoolKeyLabels, Counter>,
    transactions: Family<TransportLabels, Counter>,
    queries: Family<TransportLabels, Counter>,
    received: Family<TransportLabels, Counter>,
    sent: Family<TransportLabels, Counter>,
    http_requests: Family<HttpLabels, Counter>,
    cancels: Family<OutcomeLabels, Counter>,
    reloads: Family<OutcomeLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            logins: Family::default(),
            verification: Family::new_with_constructor(latency),
            upstream_login: latency(),
            upstream_login_errors: Family::default(),
            checkout_wait: Family::new_with_constructor(latency),
            checkout_timeouts: Family::default(),
            transactions: Family::default(),
            queries: Family::default(),
            received: Family::default(),
            sent: Family::default(),
            http_requests: Family::default(),
            cancels: Family::default(),
            reloads: Family::default(),
        }
    }
}

/// A session's relay counters, resolved once.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Returns of the backend to idle (a transaction, or a statement
    /// outside one, completed).
    pub transactions: Counter,
    /// Query and Execute messages relayed.
    pub queries: Counter,
    /// Bytes from the client.
    pub received: Counter,
    /// Bytes to the client.
    pub sent: Counter,
}

impl Metrics {
    /// Metrics registered nowhere (tests, benchmarks, tools).
    pub fn unregistered() -> Arc<Self> {
        Arc::default()
    }

    /// Metrics registered in `registry` under the `authgres_` prefix.
    pub fn register(registry: &mut Registry) -> Arc<Self> {
        let metrics = Self::default();
        let r = registry.sub_registry_with_prefix("authgres");
        r.register(
            "logins",
            "Client logins by transport, outcome and failure classification",
            metrics.logins.clone(),
        );
        r.register(
            "token_verification_seconds",
            "Time to verify a token (key fetches included)",
            metrics.verification.clone(),
        );
        r.register(
            "upstream_login_seconds",
            "Time to connect and log in to the upstream Postgres",
            metrics.upstream_login.clone(),
        );
        r.register(
            "upstream_login_errors",
            "Upstream logins that failed, by classification",
            metrics.upstream_login_errors.clone(),
        );
        r.register(
            "pool_checkout_wait_seconds",
            "Time a client waited for a pooled upstream connection",
            metrics.checkout_wait.clone(),
        );
        r.register(
            "pool_checkout_timeouts",
            "Checkouts that gave up: every connection stayed busy",
            metrics.checkout_timeouts.clone(),
        );
        r.register(
            "transactions",
            "Transactions (and statements outside one) relayed",
            metrics.transactions.clone(),
        );
        r.register(
            "queries",
            "Query and Execute messages relayed",
            metrics.queries.clone(),
        );
        r.register(
            "client_received_bytes",
            "Bytes received from clients while relaying",
            metrics.received.clone(),
        );
        r.register(
            "client_sent_bytes",
            "Bytes sent to clients while relaying",
            metrics.sent.clone(),
        );
        r.register(
            "http_requests",
            "HTTP responses by route and status",
            metrics.http_requests.clone(),
        );
        r.register(
            "cancel_requests",
            "CancelRequests received, by what became of them",
            metrics.cancels.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads by outcome",
            metrics.reloads.clone(),
        );
        Arc::new(metrics)
    }

    /// Records how a login ended: `Ok` or why it did not.
    pub fn login(&self, transport: Transport, result: Result<(), &dyn Classify>) {
        let (outcome, reason) = match result {
            Ok(()) => ("ok", "none"),
            Err(error) => {
                let outcome = match error.severity() {
                    Severity::Client => "refused",
                    Severity::Service => "failed",
                    Severity::Routine => "abandoned",
                };
                (outcome, error.label())
            }
        };
        self.logins
            .get_or_create(&LoginLabels {
                transport: transport.label(),
                outcome,
                reason,
            })
            .inc();
    }

    /// Records one token verification's time.
    pub fn verification(&self, took: Duration, verified: bool) {
        let outcome = if verified { "ok" } else { "refused" };
        self.verification
            .get_or_create(&OutcomeLabels { outcome })
            .observe(took.as_secs_f64());
    }

    /// Records one upstream login: its time, or why it failed.
    pub fn upstream_login(&self, took: Duration, result: Result<(), &dyn Classify>) {
        match result {
            Ok(()) => self.upstream_login.observe(took.as_secs_f64()),
            Err(error) => {
                self.upstream_login_errors
                    .get_or_create(&ReasonLabels {
                        reason: error.label(),
                    })
                    .inc();
            }
        }
    }

    /// Records how long a checkout from `pool` waited for a connection.
    pub fn checkout_wait(&self, pool: &'static str, waited: Duration) {
        self.checkout_wait
            .get_or_create(&PoolLabels { pool })
            .observe(waited.as_secs_f64());
    }

    /// Records a checkout that gave up.
    pub fn checkout_timeout(&self, pool: &'static str, database: &str, role: &str) {
        self.checkout_timeouts
            .get_or_create(&PoolKeyLabels {
                pool,
                database: database.to_owned(),
                role: role.to_owned(),
            })
            .inc();
    }

    /// The relay counters of a session on `transport`.
    pub fn tally(&self, transport: Transport) -> Tally {
        let labels = TransportLabels {
            transport: transport.label(),
        };
        Tally {
            transactions: self.transactions.get_or_create_owned(&labels),
            queries: self.queries.get_or_create_owned(&labels),
            received: self.received.get_or_create_owned(&labels),
            sent: self.sent.get_or_create_owned(&labels),
        }
    }

    /// Records an HTTP response.
    pub fn http_response(&self, route: &'static str, status: u16) {
        self.http_requests
            .get_or_create(&HttpLabels { route, status })
            .inc();
    }

    /// Records what became of a CancelRequest.
    pub fn cancel(&self, outcome: &'static str) {
        self.cancels.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Records a configuration reload.
    pub fn reload(&self, applied: bool) {
        let outcome = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

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
            &mut encoder,
            "authgres_clients",
            "Client connections by transport and state",
            &clients,
        )?;

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
            &mut encoder,
            "authgres_pool_connections",
            "Upstream connections per pool, database and role, idle or in use",
            &connections,
        )?;
        emit(
            &mut encoder,
            "authgres_pool_waiting_clients",
            "Clients waiting for an upstream connection",
            &waiting,
        )?;
        emit(
            &mut encoder,
            "authgres_pool_size",
            "Most upstream connections allowed per database and role",
            &size,
        )?;

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
            &mut encoder,
            "authgres_jwks_fetches",
            "JWKS fetches that succeeded, per provider",
            &fetches,
        )?;
        emit(
            &mut encoder,
            "authgres_jwks_fetch_failures",
            "JWKS fetches that failed, per provider",
            &failures,
        )?;
        emit(
            &mut encoder,
            "authgres_jwks_key_age_seconds",
            "Age of the keys in use, per provider",
            &age,
        )?;
        emit(
            &mut encoder,
            "authgres_jwks_stale",
            "1 while a provider's keys are past their lifetime (refreshes failing)",
            &stale,
        )?;
        emit(
            &mut encoder,
            "authgres_jwks_usable",
            "1 while a provider's tokens can be verified",
            &usable,
        )?;
        let cache = verifier.token_cache_stats();
        emit(
            &mut encoder,
            "authgres_token_cache_hits",
            "Logins whose token was found verified already",
            &ConstCounter::new(cache.hits),
        )?;
        emit(
            &mut encoder,
            "authgres_token_cache_misses",
            "Logins whose token was verified in full",
            &ConstCounter::new(cache.misses),
        )?;
        emit(
            &mut encoder,
            "authgres_draining",
            "1 once a drain for shutdown is announced",
            &ConstGauge::new(i64::from(proxy.drain().is_unready())),
        )?;
        Ok(())
    }
}
