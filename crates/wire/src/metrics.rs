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

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::classify::{Classify, Severity};
use crate::transport::Transport;

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
pub(crate) struct PoolKeyLabels {
    pub(crate) pool: &'static str,
    pub(crate) database: String,
    pub(crate) role: String,
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
