//! What the proxy counts, for Prometheus.
//!
//! Two kinds: [`Metrics`] holds the counters and histograms the code
//! updates as things happen (logins, verification and checkout times,
//! relayed transactions and bytes, HTTP requests); [`Collector`] reads
//! what already exists at scrape time (clients by state, pool
//! connections, each provider's keys, the verified-token cache, the drain)
//! so nothing is counted twice. The relay's counters are resolved once per
//! session ([`Tally`], kept in [`crate::stats`]): a relayed read costs a
//! relaxed atomic add, a transaction or query two, and each a load and
//! store on the session's own counts.
//!
//! Label values come from closed sets (transports, outcomes, the failure
//! classification of [`Classify::label`]) or from the configuration
//! (providers, pool databases and roles); never from what a client sends
//! before it is admitted.
//!
//! Every family is registered at start; those whose labels are known then
//! have their zero series too ([`Metrics::register`], and the collector
//! for the configured databases and roles).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;

use crate::classify::{Classify, Severity};
use crate::stats::{DatabaseStats, Table};
use crate::transport::Transport;

pub use crate::stats::{SessionCounts, Tally};

/// Encodes one metric under `name` (for the scrape-time collectors).
pub(crate) fn emit(
    encoder: &mut prometheus_client::encoding::DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl prometheus_client::encoding::EncodeMetric,
) -> Result<(), std::fmt::Error> {
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
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

/// Labels of a token verification: the provider the token names
/// (`unknown` when none does), its outcome and, when refused, why.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    provider: String,
    /// `ok`, `refused` or `failed` (the provider's keys out of reach).
    outcome: &'static str,
    /// [`authgres_jwt::VerifyError::reason`]; `none` when verified.
    reason: &'static str,
}

/// Labels: a database and a role (configured, or a database the server
/// has: see [`crate::stats`]).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DatabaseLabels {
    pub(crate) database: String,
    pub(crate) role: String,
}

/// Labels of `authgres_build_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    /// `release` or `debug`.
    profile: &'static str,
    os: &'static str,
    arch: &'static str,
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

/// Labels of a refusal by a limit per identity: which limit, over which
/// transport (never who: one series per user would be unbounded).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLimitLabels {
    limit: &'static str,
    transport: &'static str,
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

/// Latency buckets from 100 µs to about 13 s (the same as
/// [`crate::stats`]'s).
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// The counters and histograms the proxy updates as it works.
#[derive(Debug)]
pub struct Metrics {
    logins: Family<LoginLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    verification: HistogramFamily<OutcomeLabels>,
    upstream_login: HistogramFamily<DatabaseLabels>,
    upstream_login_errors: Family<ReasonLabels, Counter>,
    checkout_wait: HistogramFamily<PoolLabels>,
    checkout_timeouts: Family<PoolKeyLabels, Counter>,
    /// Transactions, queries, bytes and waits per database and role,
    /// encoded by the collector.
    pub(crate) stats: Table,
    http_requests: Family<HttpLabels, Counter>,
    cancels: Family<OutcomeLabels, Counter>,
    reloads: Family<OutcomeLabels, Counter>,
    degraded: Gauge,
    /// The heaviest identities and tenants, and the named tenants' series.
    pub(crate) usage: Arc<crate::usage::Usage>,
    /// Audit lines written.
    pub(crate) audit_lines: Counter,
    /// Audit lines lost (a full queue, a failing output).
    pub(crate) audit_dropped: Counter,
    identity_limits: Family<IdentityLimitLabels, Counter>,
    /// The series counted most often, looked up once.
    hot: HotSeries,
}

/// Series counted so often (every login that succeeds, on every
/// transport; each `/sql` request logs in and gets a response) that a
/// lookup in their family, a lock and a hash of the labels, was a
/// measurable part of a `/sql` request: resolved on first use and kept. They are the family's own series, so `/metrics` shows them as
/// before.
#[derive(Debug, Default)]
struct HotSeries {
    /// Successful logins, by transport.
    logins_ok: [std::sync::OnceLock<Counter>; crate::stats::TRANSPORTS.len()],
    /// `/sql` answered 200.
    sql_ok: std::sync::OnceLock<Counter>,
    /// Tokens verified, by provider: few, so found by a walk.
    tokens_ok: std::sync::RwLock<Vec<(Box<str>, Counter)>>,
    /// Times of verifications that passed.
    verification_ok: std::sync::OnceLock<Histogram>,
}

/// At most this many providers' series are held in [`HotSeries`]
/// (renamed providers accumulate across reloads); the rest are found in
/// their family.
const HOT_PROVIDERS: usize = 16;

impl Default for Metrics {
    fn default() -> Self {
        Self {
            logins: Family::default(),
            tokens: Family::default(),
            verification: Family::new_with_constructor(latency),
            upstream_login: Family::new_with_constructor(latency),
            upstream_login_errors: Family::default(),
            checkout_wait: Family::new_with_constructor(latency),
            checkout_timeouts: Family::default(),
            stats: Table::default(),
            http_requests: Family::default(),
            cancels: Family::default(),
            reloads: Family::default(),
            degraded: Gauge::default(),
            usage: Arc::default(),
            audit_lines: Counter::default(),
            audit_dropped: Counter::default(),
            identity_limits: Family::default(),
            hot: HotSeries::default(),
        }
    }
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
            "token_verifications",
            "Tokens verified or refused, by the provider the token names, outcome and reason",
            metrics.tokens.clone(),
        );
        r.register(
            "token_verification_seconds",
            "Time to verify a token (key fetches included)",
            metrics.verification.clone(),
        );
        r.register(
            "upstream_login_seconds",
            "Time to connect and log in to the upstream Postgres, by database and role",
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
        r.register(
            "audit_lines",
            "Audit lines written ([audit])",
            metrics.audit_lines.clone(),
        );
        r.register(
            "audit_dropped",
            "Audit lines lost: the writer's queue was full or its output failed",
            metrics.audit_dropped.clone(),
        );
        r.register(
            "identity_limit_refusals",
            "Connections and transactions refused by a limit per user or tenant, by limit and \
             transport",
            metrics.identity_limits.clone(),
        );
        r.register(
            "degraded",
            "1 while the last readiness check found a shared dependency failing (the upstream \
             unreachable, a provider's keys unusable); the instance stays ready",
            metrics.degraded.clone(),
        );
        r.register(
            "build",
            "The running build: version, profile, OS and architecture",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                profile: if cfg!(debug_assertions) {
                    "debug"
                } else {
                    "release"
                },
                os: std::env::consts::OS,
                arch: std::env::consts::ARCH,
            }),
        );
        registry.register_collector(Box::new(crate::process::Process::started_now()));
        metrics.zeros();
        Arc::new(metrics)
    }

    /// The series whose labels are known at start, at zero, so dashboards
    /// and alerts see them before the first event.
    fn zeros(&self) {
        for transport in crate::stats::TRANSPORTS {
            let _ = self.logins.get_or_create(&LoginLabels {
                transport: transport.label(),
                outcome: "ok",
                reason: "none",
            });
        }
        for outcome in ["ok", "refused"] {
            let _ = self.verification.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["applied", "refused"] {
            let _ = self.reloads.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["forwarded", "unknown_key"] {
            let _ = self.cancels.get_or_create(&OutcomeLabels { outcome });
        }
        for reason in [
            "upstream_unreachable",
            "upstream_connect_timeout",
            "upstream_login_refused",
        ] {
            let _ = self
                .upstream_login_errors
                .get_or_create(&ReasonLabels { reason });
        }
        for pool in ["wire", "http"] {
            let _ = self.checkout_wait.get_or_create(&PoolLabels { pool });
        }
        let _ = self.http_requests.get_or_create(&HttpLabels {
            route: "sql",
            status: 200,
        });
        for limit in crate::limits::Limit::ALL {
            let _ = self.identity_limits.get_or_create(&IdentityLimitLabels {
                limit: limit.label(),
                transport: Transport::Wire.label(),
            });
        }
    }

    /// The zero series of what the configuration names: each provider's
    /// verified tokens, each configured database and role's upstream
    /// logins and checkout timeouts in each pool. Idempotent: called at
    /// start and at each scrape (a reload may add names).
    pub(crate) fn configured<'a>(
        &self,
        providers: impl Iterator<Item = &'a str>,
        policy: &crate::config::Policy,
        pools: &[&'static str],
    ) {
        for provider in providers {
            let _ = self.tokens.get_or_create(&TokenLabels {
                provider: provider.to_owned(),
                outcome: "ok",
                reason: "none",
            });
        }
        for database in &policy.databases {
            for role in policy.roles.keys() {
                let _ = self.upstream_login.get_or_create(&DatabaseLabels {
                    database: database.clone(),
                    role: role.clone(),
                });
                for &pool in pools {
                    let _ = self.checkout_timeouts.get_or_create(&PoolKeyLabels {
                        pool,
                        database: database.clone(),
                        role: role.clone(),
                    });
                }
            }
        }
    }

    /// Records how a login ended: `Ok` or why it did not.
    pub fn login(&self, transport: Transport, result: Result<(), &dyn Classify>) {
        let labels = |outcome, reason| LoginLabels {
            transport: transport.label(),
            outcome,
            reason,
        };
        let Err(error) = result else {
            let hot = &self.hot.logins_ok[crate::stats::transport_index(transport)];
            hot.get_or_init(|| self.logins.get_or_create(&labels("ok", "none")).clone())
                .inc();
            return;
        };
        let outcome = match error.severity() {
            Severity::Client => "refused",
            Severity::Service => "failed",
            Severity::Routine => "abandoned",
        };
        let reason = error.label();
        self.logins.get_or_create(&labels(outcome, reason)).inc();
    }

    /// Records a token's verification by the provider it names (`None`:
    /// it names none configured): `Ok`, or why it was refused.
    pub fn token(&self, provider: Option<&str>, result: Result<(), &authgres_jwt::VerifyError>) {
        let (outcome, reason) = match result {
            Ok(()) => ("ok", "none"),
            Err(error) => {
                let outcome = match error.class() {
                    authgres_jwt::FailureClass::KeysUnavailable => "failed",
                    _ => "refused",
                };
                (outcome, error.reason())
            }
        };
        let provider = provider.unwrap_or("unknown");
        let series = || {
            self.tokens.get_or_create(&TokenLabels {
                provider: provider.to_owned(),
                outcome,
                reason,
            })
        };
        if result.is_err() {
            series().inc();
            return;
        }
        let hot = &self.hot.tokens_ok;
        let held = |held: &[(Box<str>, Counter)]| {
            (held.iter())
                .find(|(name, _)| **name == *provider)
                .map(|(_, counter)| counter.inc())
                .is_some()
        };
        if held(
            &hot.read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ) {
            return;
        }
        let counter = series().clone();
        counter.inc();
        let mut hot = hot
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if hot.len() < HOT_PROVIDERS && !hot.iter().any(|(name, _)| **name == *provider) {
            hot.push((provider.into(), counter));
        }
    }

    /// Records one token verification's time.
    pub fn verification(&self, took: Duration, verified: bool) {
        let outcome = if verified { "ok" } else { "refused" };
        let series = || self.verification.get_or_create(&OutcomeLabels { outcome });
        let took = took.as_secs_f64();
        match verified {
            true => (self.hot.verification_ok)
                .get_or_init(|| series().clone())
                .observe(took),
            false => series().observe(took),
        }
    }

    /// Records one upstream login to `database` as `role`: its time, or
    /// why it failed.
    pub fn upstream_login(
        &self,
        database: &str,
        role: &str,
        took: Duration,
        result: Result<(), &dyn Classify>,
    ) {
        match result {
            Ok(()) => self
                .upstream_login
                .get_or_create(&DatabaseLabels {
                    database: database.to_owned(),
                    role: role.to_owned(),
                })
                .observe(took.as_secs_f64()),
            Err(error) => {
                self.upstream_login_errors
                    .get_or_create(&ReasonLabels {
                        reason: error.label(),
                    })
                    .inc();
            }
        }
    }

    /// Where checkouts from `pool` record how long they waited for a
    /// connection (zero when one was free): a pool keeps it, so a
    /// checkout does not look its series up.
    pub fn checkout_wait(&self, pool: &'static str) -> CheckoutWait {
        CheckoutWait(
            self.checkout_wait
                .get_or_create(&PoolLabels { pool })
                .clone(),
        )
    }

    /// Adds a checkout's wait to the totals of (`database`, `role`) (only
    /// checkouts that waited: a free connection adds nothing).
    pub fn waited(&self, database: &str, role: &str, waited: Duration) {
        self.stats.entry(database, role).waited(waited);
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

    /// The counters of a session logged in to `database` as `role` over
    /// `transport`: resolved once, then each count is an atomic add.
    pub fn tally(&self, transport: Transport, database: &str, role: &str) -> Tally {
        Tally::new(self.stats.entry(database, role), transport)
    }

    /// The same for a session with `identity`: its transactions count
    /// toward the heaviest identities and its tenant too.
    pub fn tally_of(
        &self,
        transport: Transport,
        database: &str,
        role: &str,
        identity: Option<&authgres_jwt::Identity>,
    ) -> Tally {
        let tally = self.tally(transport, database, role);
        match identity {
            Some(identity) => tally.identified(Arc::new(self.usage.who(identity))),
            None => tally,
        }
    }

    /// The `n` heaviest identities over the `[metrics] top_window`.
    pub fn top_identities(&self, n: usize) -> Vec<crate::usage::IdentityUsage> {
        self.usage.top_identities(n)
    }

    /// The `n` heaviest tenants over the `[metrics] top_window`.
    pub fn top_tenants(&self, n: usize) -> Vec<crate::usage::IdentityUsage> {
        self.usage.top_tenants(n)
    }

    /// Totals per database and role since the proxy started, every
    /// transport together, sorted by database and role: what the
    /// console's `SHOW STATS` shows.
    pub fn stats(&self) -> Vec<DatabaseStats> {
        self.stats.entries().iter().map(|e| e.totals()).collect()
    }

    /// Records whether the last readiness check found a shared dependency
    /// (the upstream, a provider's keys) failing.
    pub fn set_degraded(&self, degraded: bool) {
        self.degraded.set(i64::from(degraded));
    }

    /// Records an HTTP response.
    pub fn http_response(&self, route: &'static str, status: u16) {
        let series = || {
            self.http_requests
                .get_or_create(&HttpLabels { route, status })
        };
        if (route, status) == ("sql", 200) {
            self.hot.sql_ok.get_or_init(|| series().clone()).inc();
        } else {
            series().inc();
        }
    }

    /// Records what became of a CancelRequest.
    pub fn cancel(&self, outcome: &'static str) {
        self.cancels.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Records work refused by a limit per identity.
    pub fn identity_limit(&self, transport: Transport, limit: crate::limits::Limit) {
        self.identity_limits
            .get_or_create(&IdentityLimitLabels {
                limit: limit.label(),
                transport: transport.label(),
            })
            .inc();
    }

    /// Records a configuration reload.
    pub fn reload(&self, applied: bool) {
        let outcome = if applied { "applied" } else { "refused" };
        self.reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}

/// One pool's checkout-wait histogram ([`Metrics::checkout_wait`]).
#[derive(Clone)]
pub struct CheckoutWait(Histogram);

impl CheckoutWait {
    /// Records one checkout's wait.
    pub fn observe(&self, waited: Duration) {
        self.0.observe(waited.as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exposition(registry: &Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("encode");
        text
    }

    #[test]
    fn hot_series_count_in_their_familys_series() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        for _ in 0..3 {
            metrics.http_response("sql", 200);
            metrics.login(Transport::Http, Ok(()));
        }
        metrics.http_response("sql", 400);
        metrics.login(Transport::Wire, Ok(()));
        for provider in ["clerk", "auth0", "clerk"] {
            metrics.token(Some(provider), Ok(()));
            metrics.verification(Duration::from_millis(1), true);
        }
        metrics.verification(Duration::from_millis(1), false);
        let text = exposition(&registry);
        let line = |prefix: &str| {
            text.lines()
                .filter(|line| line.starts_with(prefix))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        // `family` has exactly `series` series, and the one naming `label`
        // reads `count`.
        let counts = |family: &str, series: usize, label: &str, count: &str| {
            let lines = line(family);
            assert_eq!(lines.len(), series, "{family}: {text}");
            assert!(
                lines
                    .iter()
                    .any(|l| l.contains(label) && l.ends_with(count)),
                "{family} {label} {count}: {text}"
            );
        };
        let sql = "authgres_http_requests_total{route=\"sql\"";
        counts(sql, 2, "status=\"200\"", " 3");
        counts(sql, 2, "status=\"400\"", " 1");
        // One series per transport (made at registration), each once.
        counts("authgres_logins_total{", 3, "\"http\"", " 3");
        counts("authgres_logins_total{", 3, "\"tcp\"", " 1");
        counts("authgres_token_verifications_total{", 2, "\"clerk\"", " 2");
        counts(
            "authgres_token_verification_seconds_count{",
            2,
            "\"ok\"",
            " 3",
        );
    }
}
