//! `authgres serve` and `authgres check-config`: building the proxy from a
//! config, running its listeners, and the process's life around them
//! (reload on SIGHUP, drain on SIGTERM/SIGINT, exit on a second signal).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::AsFd as _;

use anyhow::Context as _;
use authgres_http::{HttpConfig, HttpState};
use authgres_jwt::Verifier;
use authgres_wire::{Metrics, Proxy, Settings};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;

use crate::admin::{self, Admin};
use crate::config::{Fixed, Loaded, restart_diff};
use authgres_wire::control::ControlRequest;

/// How long a forced drain waits for sessions to send their 57P01 and
/// close before the process exits.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// How long the exit waits for the audit writer to write what is queued.
const AUDIT_FLUSH: Duration = Duration::from_secs(5);

/// What a reload can replace, built and checked from one config.
struct Reloadable {
    settings: Settings,
    /// `[http]` limits and its certificate, if HTTP is configured.
    http: Option<(HttpConfig, Option<tokio_rustls::TlsAcceptor>)>,
}

/// Builds every reloadable setting from `loaded`; `previous` is the running
/// verifier, whose unchanged providers keep their fetched keys.
fn reloadable(loaded: &Loaded, previous: Option<&Verifier>) -> anyhow::Result<Reloadable> {
    let providers = loaded.providers()?;
    let cache = loaded.file.identity.verified_token_cache;
    let verifier = match previous {
        Some(previous) => previous.reconfigured(providers, cache)?,
        None => Verifier::with_token_cache(providers, cache)?,
    };
    let tls = loaded.tls()?;
    let http = match (loaded.http(), &loaded.file.http) {
        (Some(config), Some(file)) => {
            if file.tls && tls.is_none() {
                anyhow::bail!("[http] tls = true needs [listen] tls_cert and tls_key");
            }
            let http_tls = if file.tls { loaded.http_tls()? } else { None };
            Some((config, http_tls))
        }
        _ => None,
    };
    Ok(Reloadable {
        settings: Settings {
            config: loaded.proxy_config()?,
            verifier: Arc::new(verifier),
            claims_key: loaded.claims_key()?,
            tls,
        },
        http,
    })
}

/// Everything `serve` needs, built and checked from a config.
pub struct Prepared {
    config_path: PathBuf,
    proxy: Arc<Proxy>,
    http: Option<Arc<HttpState>>,
    registry: Registry,
    /// What a reload cannot change.
    fixed: Fixed,
    drain: DrainTimes,
    handover: Option<PathBuf>,
}

/// How a drain is timed; a reload changes them.
#[derive(Debug, Clone, Copy)]
struct DrainTimes {
    /// How long readiness is false before the drain starts.
    delay: Duration,
    /// How long the drain waits for clients.
    timeout: Duration,
}

impl DrainTimes {
    fn of(loaded: &Loaded) -> Self {
        Self {
            delay: loaded.file.listen.drain_delay,
            timeout: loaded.file.listen.shutdown_timeout,
        }
    }
}

/// The listening sockets, bound here or handed over by the process this
/// one replaces.
pub struct Listeners {
    /// Postgres clients.
    pub wire: TcpListener,
    http: Option<TcpListener>,
    admin: Option<admin::Listener>,
    /// The process that handed them over, waiting to hear we accept.
    inherited: Option<crate::handover::Inherited>,
    /// The handover socket, bound at start when no process handed
    /// anything over (else once the old process lets go of the path).
    offer: Option<crate::handover::Offer>,
}

/// Binds the configured addresses, or takes over the sockets of the
/// process serving `[listen] handover_socket`.
pub async fn listen(prepared: &Prepared) -> anyhow::Result<Listeners> {
    let mut inherited = match &prepared.handover {
        Some(path) => {
            let path = path.clone();
            tokio::task::spawn_blocking(move || crate::handover::inherit(&path)).await??
        }
        None => None,
    };
    let taking_over = inherited.is_some();
    if taking_over {
        tracing::info!("taking over the listeners of the running process");
    }
    let fixed = &prepared.fixed;
    // A handed-over socket is used only where this config still asks for
    // its address.
    let mut socket = |role: &str, address: &str| -> anyhow::Result<Option<TcpListener>> {
        let Some(listener) = inherited.as_mut().and_then(|i| i.take(role)) else {
            return Ok(None);
        };
        if let Ok(wanted) = address.parse::<std::net::SocketAddr>()
            && listener.local_addr()? != wanted
        {
            tracing::warn!(
                role,
                address,
                "the config moved this listener: binding anew"
            );
            return Ok(None);
        }
        listener.set_nonblocking(true)?;
        Ok(Some(TcpListener::from_std(listener)?))
    };
    let wire = match socket("wire", &fixed.wire_address)? {
        Some(wire) => wire,
        None => bind(&fixed.wire_address, "").await?,
    };
    let http = match (&prepared.http, &fixed.http_address) {
        (Some(_), Some(address)) => match socket("http", address)? {
            Some(http) => Some(http),
            None => Some(bind(address, "for HTTP ").await?),
        },
        _ => None,
    };
    let admin = match &fixed.admin_address {
        Some(address) => Some(match admin::unix_path(address) {
            // The old process serves this path until it drains: replace it.
            Some(path) => admin::Listener::Unix(
                crate::handover::PrivateSocket::bind(path, taking_over)
                    .context("[admin] address")?,
            ),
            None => admin::Listener::Tcp(match socket("admin", address)? {
                Some(admin) => admin,
                None => bind(address, "for admin ").await?,
            }),
        }),
        None => None,
    };
    // A handover socket that cannot be bound fails the start, loudly: not
    // a restart that would later find nothing to take over.
    let offer = match &prepared.handover {
        Some(path) if !taking_over => Some(crate::handover::Offer::bind(path)?),
        _ => None,
    };
    Ok(Listeners {
        wire,
        http,
        admin,
        inherited,
        offer,
    })
}

async fn bind(address: &str, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("listening {what}on {address}"))
}

/// Builds the proxy from the config at `config_path`; fails with what to
/// fix.
pub fn prepare(config_path: &Path) -> anyhow::Result<Prepared> {
    let loaded = Loaded::from_path(config_path)?;
    if loaded.file.providers.is_empty() {
        tracing::warn!("no [[providers]] configured: only token-less roles can log in");
    }
    let built = reloadable(&loaded, None)?;
    log_start(config_path, &loaded);
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let proxy = Arc::new(Proxy::new(built.settings, metrics));
    if let Some(audit) = &proxy.settings().config.audit
        && proxy.audit_output().is_none()
    {
        anyhow::bail!("[audit] output {:?} could not be opened", audit.output);
    }
    registry.register_collector(Box::new(authgres_wire::Collector::new(&proxy)));
    let http = built
        .http
        .map(|(config, tls)| HttpState::new(Arc::clone(&proxy), config, tls));
    Ok(Prepared {
        config_path: config_path.to_owned(),
        proxy,
        http,
        registry,
        fixed: loaded.fixed()?,
        drain: DrainTimes::of(&loaded),
        handover: loaded
            .file
            .listen
            .handover_socket
            .as_ref()
            .map(|p| loaded.path(p)),
    })
}

/// The startup line: the version and what the configuration says, in a
/// line an operator can read without the file (no secrets: passwords and
/// keys are named by the variables that hold them, not shown).
fn log_start(config_path: &Path, loaded: &Loaded) {
    let file = &loaded.file;
    let upstream = &file.upstream;
    let providers: Vec<String> = file
        .providers
        .iter()
        .map(|p| format!("{} ({})", p.name, p.issuer))
        .collect();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %config_path.display(),
        listen = %file.listen.address,
        tls = file.listen.tls_cert.is_some(),
        http = file.http.as_ref().map(|h| h.address.as_str()),
        admin = file.admin.as_ref().map(|a| a.address(loaded)),
        upstream = %format_args!("{}:{}", upstream.host, upstream.port),
        upstream_tls = ?upstream.tls,
        databases = ?upstream.databases,
        roles = ?file.roles.keys().collect::<Vec<_>>(),
        providers = ?providers,
        pool_mode = upstream.pool_mode.label(),
        pool_size = upstream.pool_size,
        "authgres starting"
    );
}

/// Runs the proxy until it has drained after SIGTERM or Ctrl-C.
pub async fn serve(config: &Path) -> anyhow::Result<()> {
    let prepared = prepare(config)?;
    let listeners = listen(&prepared).await?;
    run(prepared, listeners).await
}

/// Serves the wire listener and, when configured, HTTP and the admin
/// listener; reloads on SIGHUP; drains on SIGTERM or SIGINT, or once a
/// successor has taken the listeners over. The process's phases, in
/// order: start (listeners and background tasks), serve (until a stop
/// signal or a successor), unready (`drain_delay`), drain
/// (`shutdown_timeout`), close.
pub async fn run(prepared: Prepared, listeners: Listeners) -> anyhow::Result<()> {
    let Prepared {
        config_path,
        proxy,
        http,
        registry,
        fixed,
        drain,
        handover,
    } = prepared;
    let mut signals = Signals::new()?;
    let offered = announce(&listeners, &http, handover.is_some())?;
    let Listeners {
        wire: listener,
        http: http_listener,
        admin: admin_listener,
        inherited,
        mut offer,
    } = listeners;
    // Reloads, SHOW CONFIG and SHUTDOWN from the console and the admin
    // API, answered by the serving phase.
    let (control, control_requests) = mpsc::channel::<ControlRequest>(4);
    proxy.set_control(control.clone());
    // Warm the key caches without delaying the listeners.
    let verifier = Arc::clone(&proxy.settings().verifier);
    tokio::spawn(async move { verifier.prefetch(std::time::SystemTime::now()).await });
    tokio::spawn(proxy.maintenance());
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(authgres_wire::server::serve(Arc::clone(&proxy), listener));
    if let (Some(state), Some(bound)) = (&http, http_listener) {
        tokio::spawn(state.maintenance());
        tasks.spawn(authgres_http::serve(Arc::clone(state), bound));
    }
    // The admin listener outlives the drain, so probes and scrapes see
    // it, unless a successor took its socket over (`handed_over` lives to
    // the end: the listener also stops when it is dropped).
    let (handed_over, admin_stop) = tokio::sync::watch::channel(false);
    if let (Some(bound), Some(limits)) = (admin_listener, fixed.admin_limits.clone()) {
        let admin = Admin::new(Arc::clone(&proxy), registry, control);
        tokio::spawn(admin::serve(admin, bound, limits, admin_stop));
    }
    if let Some(inherited) = inherited {
        take_over(inherited, handover.as_deref(), &mut offer).await?;
    }
    // Accepting on the handover socket is async, so a drain that drops
    // this future leaves nothing behind to keep the process alive.
    let successor = Box::pin(async {
        match offer {
            Some(offer) => offer.serve(offered).await,
            None => std::future::pending().await,
        }
    });
    let running = Running {
        config_path,
        proxy: Arc::clone(&proxy),
        http,
        fixed,
        drain: std::sync::Mutex::new(drain),
    };
    let delay = serve_until_stop(
        &running,
        &mut signals,
        control_requests,
        successor,
        &handed_over,
    )
    .await;
    let timeout = running.drain().timeout;
    close(&proxy, &mut signals, tasks, delay, timeout).await;
    // Every audit line of the sessions that ended is written before exit.
    if !proxy.flush_audit(AUDIT_FLUSH).await {
        tracing::warn!(wait = ?AUDIT_FLUSH, "the audit log was not flushed in time");
    }
    Ok(())
}

/// Logs each listener's address, and returns the sockets a successor will
/// be handed when a handover socket is configured (the admin listener's
/// only over TCP: a Unix socket is bound anew by the successor).
fn announce(
    listeners: &Listeners,
    http: &Option<Arc<HttpState>>,
    handover: bool,
) -> anyhow::Result<Vec<(String, std::os::fd::OwnedFd)>> {
    let mut offered = Vec::new();
    let mut offer = |role: &str, socket: &TcpListener| -> anyhow::Result<()> {
        if handover {
            offered.push((role.to_owned(), socket.as_fd().try_clone_to_owned()?));
        }
        Ok(())
    };
    offer("wire", &listeners.wire)?;
    tracing::info!(address = %listeners.wire.local_addr()?, "authgres listening");
    if let (Some(state), Some(bound)) = (http, &listeners.http) {
        offer("http", bound)?;
        tracing::info!(address = %bound.local_addr()?, tls = state.tls, "authgres HTTP listening");
    }
    if let Some(bound) = &listeners.admin {
        if let admin::Listener::Tcp(tcp) = bound {
            offer("admin", tcp)?;
        }
        tracing::info!(address = %bound.describe(), "authgres admin listening");
    }
    Ok(offered)
}

/// Tells the process this one replaces that it may drain (we accept now),
/// then takes the handover path for our own successor once it is free.
async fn take_over(
    inherited: crate::handover::Inherited,
    handover: Option<&Path>,
    offer: &mut Option<crate::handover::Offer>,
) -> anyhow::Result<()> {
    let path = handover.map(Path::to_path_buf);
    tokio::task::spawn_blocking(move || {
        inherited.ready();
        if let Some(path) = path {
            crate::handover::wait_free(&path);
        }
    })
    .await?;
    if let Some(path) = handover {
        // Serving already: a path we cannot take is no reason to stop.
        match crate::handover::Offer::bind(path) {
            Ok(bound) => *offer = Some(bound),
            Err(error) => tracing::error!(
                error = format!("{error:#}"),
                "no handover socket: a later restart will not take these listeners over"
            ),
        }
    }
    Ok(())
}

/// Serves reloads and the console's control requests until a stop signal,
/// `SHUTDOWN` or a successor ends the serving phase; returns how long to
/// stay unready before the drain.
async fn serve_until_stop(
    running: &Running,
    signals: &mut Signals,
    mut control_requests: mpsc::Receiver<ControlRequest>,
    mut successor: std::pin::Pin<Box<impl std::future::Future<Output = ()>>>,
    handed_over: &tokio::sync::watch::Sender<bool>,
) -> Duration {
    let proxy = &running.proxy;
    loop {
        tokio::select! {
            _ = signals.hangup.recv() => running.reload_logged(),
            Some(request) = control_requests.recv() => match request {
                ControlRequest::Reload(reply) => {
                    let _ = reply.send(running.reload());
                }
                ControlRequest::ShowConfig(reply) => {
                    let _ = reply.send(running.entries());
                }
                ControlRequest::Shutdown => {
                    tracing::info!(clients = proxy.drain().clients(), "SHUTDOWN from the console: draining");
                    return running.drain().delay;
                }
            },
            signal = signals.stop.next() => {
                tracing::info!(signal, clients = proxy.drain().clients(), "draining");
                return running.drain().delay;
            }
            () = successor.as_mut() => {
                tracing::info!(
                    clients = proxy.drain().clients(),
                    "a new process took over the listeners: draining"
                );
                // The sockets are served by the successor: no delay.
                let _ = handed_over.send(true);
                return Duration::ZERO;
            }
        }
    }
    // Leaving drops the reload channel (a draining process reloads
    // nothing: later reloads are answered that it drains) and the
    // successor's socket (the listeners close once their accept loops
    // stop, and the handover path is removed).
}

/// The unready, draining and closing phases: readiness turns false for
/// `delay` (load balancers stop sending new clients while they are still
/// served), then the listeners stop and clients get until `timeout` to
/// leave, then the rest are closed. A second stop signal exits at once.
async fn close(
    proxy: &Proxy,
    signals: &mut Signals,
    mut tasks: tokio::task::JoinSet<()>,
    delay: Duration,
    timeout: Duration,
) {
    if !delay.is_zero() {
        proxy.drain().unready();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            signal = signals.stop.next() => {
                tracing::warn!(signal, "second signal: exiting now");
                proxy.drain().force();
                return;
            }
        }
    }
    proxy.drain().start();
    let drained = async {
        while tasks.join_next().await.is_some() {}
        proxy.drain().wait_clients().await;
    };
    tokio::select! {
        finished = tokio::time::timeout(timeout, drained) => {
            if finished.is_ok() {
                tracing::info!("drained: every client has left");
                return;
            }
            tracing::warn!(
                clients = proxy.drain().clients(),
                ?timeout,
                "shutdown_timeout reached: closing the remaining clients"
            );
        }
        signal = signals.stop.next() => {
            tracing::warn!(signal, clients = proxy.drain().clients(), "second signal: exiting now");
            proxy.drain().force();
            return;
        }
    }
    proxy.drain().force();
    let _ = tokio::time::timeout(CLOSE_GRACE, proxy.drain().wait_clients()).await;
}

/// What a reload replaces.
struct Running {
    config_path: PathBuf,
    proxy: Arc<Proxy>,
    http: Option<Arc<HttpState>>,
    /// What a reload cannot change: a reload names each change.
    fixed: Fixed,
    drain: std::sync::Mutex<DrainTimes>,
}

impl Running {
    /// The drain's timing in force.
    fn drain(&self) -> DrainTimes {
        *self
            .drain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The configuration in force, key by key (`SHOW CONFIG`): the file as
    /// last loaded, fixed keys as they started.
    fn entries(&self) -> Vec<authgres_wire::control::ConfigEntry> {
        match Loaded::from_path(&self.config_path) {
            Ok(loaded) => loaded.entries(),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "SHOW CONFIG could not read the file");
                Vec::new()
            }
        }
    }

    /// Reloads, logging the outcome.
    fn reload_logged(&self) {
        if let Err(error) = self.reload() {
            tracing::error!(error, "reload refused; the running configuration stays");
        }
    }

    /// Reads the config and secrets again and puts them in force for new
    /// work. A config that does not load or validate changes nothing.
    /// Returns the changed settings that need a restart.
    fn reload(&self) -> Result<Vec<&'static str>, String> {
        let result = self.try_reload().map_err(|error| format!("{error:#}"));
        self.proxy.metrics().reload(result.is_ok());
        result
    }

    fn try_reload(&self) -> anyhow::Result<Vec<&'static str>> {
        let loaded = Loaded::from_path(&self.config_path)?;
        let old_verifier = Arc::clone(&self.proxy.settings().verifier);
        let built = reloadable(&loaded, Some(&old_verifier))?;
        let restart = restart_diff(&self.fixed, &loaded.fixed()?);
        let verifier = Arc::clone(&built.settings.verifier);
        self.proxy.reload(built.settings);
        *self
            .drain
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = DrainTimes::of(&loaded);
        if let (Some(state), Some((config, tls))) = (&self.http, built.http) {
            state.reload(config, tls);
        }
        // Providers that are new or changed fetch their keys now.
        tokio::spawn(async move { verifier.prefetch(std::time::SystemTime::now()).await });
        if restart.is_empty() {
            tracing::info!(config = %self.config_path.display(), "configuration reloaded");
        } else {
            tracing::warn!(
                config = %self.config_path.display(),
                needs_restart = ?restart,
                "configuration reloaded; these changes take effect only after a restart"
            );
        }
        Ok(restart)
    }
}

/// The signals the process acts on.
struct Signals {
    /// SIGHUP: reload.
    hangup: Signal,
    /// SIGTERM and SIGINT: drain, and at the second, exit.
    stop: Stop,
}

struct Stop {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        let listen = |kind, name| signal(kind).with_context(|| format!("listening for {name}"));
        Ok(Self {
            hangup: listen(SignalKind::hangup(), "SIGHUP")?,
            stop: Stop {
                terminate: listen(SignalKind::terminate(), "SIGTERM")?,
                interrupt: listen(SignalKind::interrupt(), "SIGINT")?,
            },
        })
    }
}

impl Stop {
    /// Completes on the next SIGTERM or SIGINT, naming it.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
