//! The proxy: the settings in force and what every session shares (the
//! wire pool, the cancel registry, the connection budget, the drain, the
//! client registry, the counters), and the scrape-time collector that
//! reads them for `/metrics`.

mod collector;

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock, Weak};

use authgres_jwt::Verifier;
use tokio::time::Instant;

use crate::budget::Budget;
use crate::cancel::CancelRegistry;
use crate::clients::Clients;
use crate::config::ProxyConfig;
use crate::control::ControlRequest;
use crate::drain::Drain;
use crate::identity::ClaimsKey;
use crate::limits::Limiter;
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::pool::{Gates, Reported, ServerPools, UpstreamPool};
use crate::upstream::UpstreamConfig;

pub use collector::Collector;

/// What a reload can change: the settings a session takes at accept and
/// keeps to its end.
pub struct Settings {
    /// Admission, limits, timeouts, pool modes and sizes, the upstream.
    pub config: ProxyConfig,
    /// Token verification.
    pub verifier: Arc<Verifier>,
    /// The key that signs claims for SQL.
    pub claims_key: ClaimsKey,
    /// TLS for clients, if configured.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// The proxy: its settings and the state all sessions share.
pub struct Proxy {
    pub(crate) settings: RwLock<Arc<Settings>>,
    /// Upstream connections of the wire sessions, by server.
    pub(crate) pools_by_server: ServerPools,
    /// Every pool to report (the wire sessions', HTTP's), for metrics and
    /// `/pools`.
    pub(crate) pools: Reported,
    pub(crate) cancels: CancelRegistry,
    /// Client connections held, by every listener.
    pub(crate) budget: Arc<Budget>,
    /// Log lines about refused clients, limited.
    pub(crate) refusals: LogLimiter,
    pub(crate) drain: Drain,
    pub(crate) clients: Arc<Clients>,
    pub(crate) metrics: Arc<Metrics>,
    /// The console's PAUSE and DISABLE, shared by every pool.
    pub(crate) gates: Arc<Gates>,
    /// Connections and transactions per user and tenant: the counts
    /// outlive reloads, which replace only the limits.
    pub(crate) limiter: Limiter,
    /// Where the console's RELOAD, SHOW CONFIG and SHUTDOWN go.
    control: std::sync::OnceLock<tokio::sync::mpsc::Sender<ControlRequest>>,
    /// When the proxy started: `SHOW STATS` averages over its uptime.
    pub(crate) started: std::time::SystemTime,
    /// The audit log's writer, once `[audit]` is configured.
    audit: crate::audit::Hub,
}

impl Proxy {
    /// A proxy with these settings, counting into `metrics`. Run
    /// [`Proxy::maintenance`] beside it.
    pub fn new(settings: Settings, metrics: Arc<Metrics>) -> Self {
        let config = &settings.config;
        let gates = Arc::new(Gates::default());
        let pool = UpstreamPool::new(
            "wire",
            config.upstream.clone(),
            config.pool_limits,
            Arc::clone(&metrics),
            Arc::clone(&gates),
        );
        let cancels = CancelRegistry::new(config.cluster.instance_id);
        let drain = Drain::default();
        let clients = Arc::clone(drain.registry());
        let pools = Reported::default();
        let audit = crate::audit::Hub::new(crate::audit::Counters::new(
            metrics.audit_lines.clone(),
            metrics.audit_dropped.clone(),
        ));
        audit.configure(config.audit.as_ref());
        metrics.usage.configure(&config.usage);
        let limiter = Limiter::new(config.identity_limits.clone());
        Self {
            budget: Budget::new(config.connections),
            pools_by_server: ServerPools::new(pool, Arc::clone(&pools)),
            pools,
            settings: RwLock::new(Arc::new(settings)),
            cancels,
            refusals: LogLimiter::default(),
            drain,
            clients,
            metrics,
            gates,
            limiter,
            control: std::sync::OnceLock::new(),
            started: std::time::SystemTime::now(),
            audit,
        }
    }

    /// The console's PAUSE and DISABLE: a pool built beside this proxy
    /// (HTTP's) takes them.
    pub fn gates(&self) -> &Arc<Gates> {
        &self.gates
    }

    /// Where the console sends the requests only the process can answer
    /// (set once; later calls are ignored).
    pub fn set_control(&self, control: tokio::sync::mpsc::Sender<ControlRequest>) {
        let _ = self.control.set(control);
    }

    /// The channel to the process, if it set one.
    pub(crate) fn control(&self) -> Option<&tokio::sync::mpsc::Sender<ControlRequest>> {
        self.control.get()
    }

    /// The settings in force now; a session keeps the ones it started with.
    pub fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts `new` in force for new sessions and new checkouts; running
    /// sessions keep theirs. The upstream server and the instance id keep
    /// their old values: changing them takes a restart.
    pub fn reload(&self, mut new: Settings) {
        let old = self.settings();
        // What cannot change without a restart stays as it was (the
        // caller names each such change to the operator): handed-out
        // cancel keys name the instance id, and pooled connections and
        // cancels go to the server they came from.
        new.config.cluster.instance_id = old.config.cluster.instance_id;
        new.config.upstream = old.config.upstream.clone();
        self.budget.set_limits(new.config.connections);
        // Every reload (SIGHUP) opens the audit file again: logrotate.
        self.audit.configure(new.config.audit.as_ref());
        self.metrics.usage.configure(&new.config.usage);
        self.limiter.configure(new.config.identity_limits.clone());
        // After the limiter: the pools call back the connections clients
        // keep between transactions, whose next transactions are then
        // counted under the new limits.
        self.pools_by_server.set_limits(new.config.pool_limits);
        let replaced = !Arc::ptr_eq(&old.verifier, &new.verifier);
        *self
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
        if replaced {
            // Running sessions keep their settings, verifier included; only
            // logins need its cache, and they use the new one.
            old.verifier.retire();
        }
    }

    /// The audit of a session `facts` describes, when `settings` (the
    /// session's) have `[audit]`.
    pub fn audit_session(
        &self,
        settings: &Settings,
        facts: &crate::audit::Facts<'_>,
    ) -> Option<Arc<crate::audit::SessionAudit>> {
        let config = settings.config.audit.as_ref()?;
        let sink = self.audit.sink()?;
        Some(Arc::new(crate::audit::SessionAudit::new(
            config, sink, facts,
        )))
    }

    /// Where audit lines are written, while the writer runs.
    pub fn audit_output(&self) -> Option<crate::audit::Output> {
        self.audit.output()
    }

    /// Waits, up to `wait`, until the audit lines queued so far are
    /// written and flushed (the last thing the process does); whether
    /// they were.
    pub async fn flush_audit(&self, wait: std::time::Duration) -> bool {
        self.audit.flush(wait).await
    }

    /// The connection budget every listener draws from.
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// The limits per identity every transport counts against.
    pub fn limiter(&self) -> &Limiter {
        &self.limiter
    }

    /// The shutdown state every listener and session follows.
    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    /// The client connections held, on every listener.
    pub fn clients(&self) -> &Arc<Clients> {
        &self.clients
    }

    /// The counters every transport updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Where pools made beside this proxy (HTTP's) are reported, in
    /// metrics and `/pools`.
    pub fn reported_pools(&self) -> &Reported {
        &self.pools
    }

    /// Every pool reported.
    pub fn pools(&self) -> Vec<Arc<UpstreamPool>> {
        self.pools
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Logs that a connection was refused before it became a session (at
    /// info, limited: floods of refusals make a few lines).
    pub fn log_refusal(&self, peer: SocketAddr, why: &dyn std::fmt::Display) {
        if let Some(suppressed) = self.refusals.allow(Instant::now()) {
            tracing::info!(%peer, reason = %why, suppressed, "connection refused");
        }
    }

    /// The wire sessions' pool of the `[upstream]` server.
    pub fn pool(&self) -> &Arc<UpstreamPool> {
        self.pools_by_server.upstream()
    }

    /// The wire sessions' pool of `server` (`None`: `[upstream]`'s).
    pub(crate) fn pool_for(&self, server: Option<&Arc<UpstreamConfig>>) -> Arc<UpstreamPool> {
        self.pools_by_server.get(server)
    }

    /// Background work the proxy needs while it runs: closing idle
    /// upstream connections on time, and waking the clients that keep
    /// connections between transactions to give back those they no
    /// longer use (without it, only a waiting checkout or a recall does).
    /// Completes when the proxy is gone.
    /// (Pools of `[databases]` servers start their own when made.)
    pub fn maintenance(self: &Arc<Self>) -> impl std::future::Future<Output = ()> + Send + 'static {
        crate::pool::reap(Arc::downgrade(self.pool()))
    }
}
