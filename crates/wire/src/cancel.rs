//! Cancel keys: the proxy hands clients its own random (pid, key) and maps
//! them to the upstream backend's, which never leave the proxy.
//!
//! Several instances behind a load balancer share no state, and a
//! CancelRequest is a new connection that may land on any of them. So the
//! pid a client is given names the instance holding its session:
//!
//! ```text
//! pid (31 bits, positive)              key (32 bits)
//! [ instance id: 10 ][ random: 21 ]    [ random: 32 ]
//! ```
//!
//! An instance that receives a cancel for another forwards it once to that
//! peer ([`route`]), with the pid's sign bit set: a cancel arriving with a
//! negative pid was forwarded already and is only looked up locally, so no
//! cancel travels in a loop. 53 bits stay random: guessing a live
//! session's key takes on the order of 2^53 / sessions attempts, each one
//! a TCP connection counted against the unauthenticated budget. A key from
//! an instance that has restarted names the right instance but no live
//! session: it is ignored, as Postgres ignores a key for a backend that
//! has exited.
//!
//! Anyone who can connect can send CancelRequests, unauthenticated and as
//! fast as they like: each is counted in `authgres_cancel_requests_total`
//! by outcome, and the log lines about them share one rate limit.
//!
//! In transaction pooling a client's backend changes from one transaction to
//! the next, and between transactions it has none: the session retargets
//! its entry as it takes and releases connections. A cancel is forwarded
//! while holding the entry, and a session waits for that before releasing
//! its connection, so a cancel never reaches a backend that has moved on to
//! another client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::{Instant, timeout_at};

use crate::config::{ClusterConfig, ProxyConfig};
use crate::log_limit::LogLimiter;
use crate::metrics::Metrics;
use crate::transport::send_cancel_request;
use crate::upstream::UpstreamKey;

/// How long forwarding a cancel to a peer or the server may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// Bits of the pid below the instance id.
const RANDOM_PID_BITS: u32 = 21;
/// Largest instance id (10 bits).
pub const MAX_INSTANCE_ID: u16 = (1 << 10) - 1;
/// Set in the pid of a cancel forwarded by a peer.
const FORWARDED: i32 = i32::MIN;

/// The instance a client's pid names.
fn instance_of(pid: i32) -> u16 {
    u16::try_from((pid & i32::MAX) >> RANDOM_PID_BITS).unwrap_or(u16::MAX) & MAX_INSTANCE_ID
}

/// Where a CancelRequest goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Route {
    /// To a session of this instance, pid as the client was given it.
    Local(i32),
    /// To the instance at this address, marked as forwarded.
    Peer(String),
    /// To every address the peer name resolves to, marked as forwarded:
    /// the instance cannot tell which one holds the session.
    AllPeers(String),
    /// Nowhere: the pid names an instance nobody knows.
    Unknown(u16),
}

/// Decides where a CancelRequest with `pid` goes, on the instance
/// configured with `cluster`.
pub(crate) fn route(pid: i32, cluster: &ClusterConfig) -> Route {
    let forwarded = pid < 0;
    let pid = pid & i32::MAX;
    let instance = instance_of(pid);
    if forwarded || instance == cluster.instance_id {
        return Route::Local(pid);
    }
    if let Some(address) = cluster.peers.get(&instance) {
        return Route::Peer(address.clone());
    }
    match &cluster.peer_dns {
        Some(name) => Route::AllPeers(name.clone()),
        None => Route::Unknown(instance),
    }
}

/// The pid of a cancel forwarded to a peer.
pub(crate) fn forwarded(pid: i32) -> i32 {
    pid | FORWARDED
}

/// The backend currently serving a client, if any, and whether a cancel
/// to it is being forwarded: a session must not hand that backend to
/// another client until the cancel is delivered.
///
/// A transaction-pooled client points it at a backend and back at nothing
/// in every transaction, so that is one uncontended lock; only a
/// retarget that meets a cancel in flight waits.
#[derive(Debug, Default)]
pub(crate) struct Target {
    state: Mutex<Aim>,
    /// Wakes retargets waiting for a cancel in flight.
    delivered: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Aim {
    backend: Option<UpstreamKey>,
    /// A cancel to `backend` is being forwarded.
    forwarding: bool,
    /// The session waits to retarget: it goes before any further cancel,
    /// so a flood of cancels cannot hold its backend.
    retarget_waiting: bool,
}

impl Target {
    fn new(backend: Option<UpstreamKey>) -> Self {
        Self {
            state: Mutex::new(Aim {
                backend,
                forwarding: false,
                retarget_waiting: false,
            }),
            delivered: tokio::sync::Notify::new(),
        }
    }

    fn aim(&self) -> std::sync::MutexGuard<'_, Aim> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Points it at `backend` now unless a cancel is in flight (or waits
    /// to be), which gets `backend` back: the common case, with no future.
    fn try_set(&self, backend: Option<UpstreamKey>) -> Result<(), Option<UpstreamKey>> {
        let mut aim = self.aim();
        if aim.forwarding || aim.retarget_waiting {
            return Err(backend);
        }
        let old = std::mem::replace(&mut aim.backend, backend);
        drop(aim);
        drop(old);
        Ok(())
    }

    /// Points it at `backend` once no cancel is in flight.
    async fn set(&self, backend: Option<UpstreamKey>) {
        let mut backend = Some(backend);
        let mut waiting = RetargetWaiting {
            target: self,
            armed: false,
        };
        self.when(|aim| {
            if aim.forwarding {
                aim.retarget_waiting = true;
                waiting.armed = true;
                return None;
            }
            aim.backend = backend.take().flatten();
            Some(())
        })
        .await;
    }

    /// The backend to forward a cancel to, held until the returned guard
    /// drops (a second cancel for the same key waits its turn), or `None`
    /// between transactions.
    async fn forwarding(&self) -> Option<Forwarding<'_>> {
        let backend = self
            .when(|aim| {
                if aim.forwarding || aim.retarget_waiting {
                    return None;
                }
                let backend = aim.backend.clone();
                aim.forwarding = backend.is_some();
                Some(backend)
            })
            .await?;
        Some(Forwarding {
            target: self,
            backend,
        })
    }

    /// The first `Some` that `attempt` makes of the aim, tried now and
    /// again after each delivered cancel: most calls find it at once and
    /// register no waiter.
    async fn when<T>(&self, mut attempt: impl FnMut(&mut Aim) -> Option<T>) -> T {
        if let Some(done) = attempt(&mut self.aim()) {
            return done;
        }
        loop {
            let delivered = self.delivered.notified();
            tokio::pin!(delivered);
            // Registered before the check: a delivery after it wakes us.
            delivered.as_mut().enable();
            if let Some(done) = attempt(&mut self.aim()) {
                return done;
            }
            delivered.await;
        }
    }

    /// Where it points now.
    #[cfg(test)]
    fn backend(&self) -> Option<UpstreamKey> {
        self.aim().backend.clone()
    }
}

/// A retarget that had to wait (`armed`): when it is done (or dropped),
/// cancels held back for it go on.
struct RetargetWaiting<'a> {
    target: &'a Target,
    armed: bool,
}

impl Drop for RetargetWaiting<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.target.aim().retarget_waiting = false;
            self.target.delivered.notify_waiters();
        }
    }
}

/// A cancel being forwarded to `backend`; its session's retargets wait
/// until this drops.
struct Forwarding<'a> {
    target: &'a Target,
    backend: UpstreamKey,
}

impl Drop for Forwarding<'_> {
    fn drop(&mut self) {
        self.target.aim().forwarding = false;
        self.target.delivered.notify_waiters();
    }
}

/// Live sessions by the pid their client was given: its key and target.
type Sessions = HashMap<i32, ([u8; 4], Arc<Target>)>;

/// Live sessions by the cancel key their client was given.
#[derive(Default, Clone)]
pub(crate) struct CancelRegistry {
    sessions: Arc<Mutex<Sessions>>,
    /// This instance's id, in every pid it hands out.
    instance_id: u16,
    /// Log lines about cancels, limited: anyone who can connect can send
    /// CancelRequests, without authenticating, as fast as they like.
    lines: Arc<LogLimiter>,
}

impl CancelRegistry {
    /// A registry handing out pids that name instance `instance_id`.
    pub(crate) fn new(instance_id: u16) -> Self {
        Self {
            sessions: Arc::default(),
            instance_id: instance_id & MAX_INSTANCE_ID,
            lines: Arc::default(),
        }
    }

    /// Acts on a client's CancelRequest for (`pid`, `key`): forwards it to
    /// the peer instance its pid names, or to the backend serving its
    /// session here now if the key is one this proxy handed out. Every
    /// outcome is counted in `metrics`; its log line is rate-limited.
    pub(crate) async fn forward(
        &self,
        config: &ProxyConfig,
        metrics: &Metrics,
        pid: i32,
        key: &[u8],
    ) {
        let deadline = Instant::now() + FORWARD_TIMEOUT;
        let pid = match route(pid, &config.cluster) {
            Route::Local(pid) => pid,
            Route::Peer(address) => {
                let sent = send_cancel_request(&address, forwarded(pid), key, deadline).await;
                self.peer_sent(metrics, &address, sent);
                return;
            }
            Route::AllPeers(name) => {
                let peers = match timeout_at(deadline, tokio::net::lookup_host(&name)).await {
                    Ok(Ok(peers)) => peers.map(|a| a.to_string()).collect::<Vec<_>>(),
                    Ok(Err(error)) => {
                        self.log(|suppressed| {
                            tracing::warn!(%error, %name, suppressed, "cannot resolve the peers for a cancel");
                        });
                        Vec::new()
                    }
                    Err(_) => Vec::new(),
                };
                let relayed = forwarded(pid);
                let sends = peers.iter().map(|address| async move {
                    let sent = send_cancel_request(address, relayed, key, deadline).await;
                    self.peer_sent(metrics, address, sent);
                });
                futures_util::future::join_all(sends).await;
                return;
            }
            Route::Unknown(instance) => {
                metrics.cancel("unknown_instance");
                self.log(|suppressed| {
                    tracing::info!(
                        instance,
                        suppressed,
                        "cancel request for an instance not among the peers ignored"
                    );
                });
                return;
            }
        };
        let Some(target) = self.lookup(pid, key) else {
            metrics.cancel("unknown_key");
            self.log(|suppressed| {
                tracing::info!(suppressed, "cancel request with an unknown key ignored");
            });
            return;
        };
        // Held while forwarding: the session cannot hand its backend to
        // another client until this cancel is delivered.
        let Some(forwarding) = target.forwarding().await else {
            metrics.cancel("between_transactions");
            self.log(|suppressed| {
                tracing::info!(
                    suppressed,
                    "cancel request for a client between transactions ignored"
                );
            });
            return;
        };
        match forwarding.backend.cancel().await {
            Ok(()) => {
                metrics.cancel("forwarded");
                self.log(|suppressed| tracing::info!(suppressed, "cancel request forwarded"));
            }
            Err(error) => {
                metrics.cancel("failed");
                self.log(|suppressed| {
                    tracing::warn!(%error, suppressed, "cancel request could not be forwarded");
                });
            }
        }
    }

    /// Counts and logs a cancel sent on to a peer.
    fn peer_sent(&self, metrics: &Metrics, peer: &str, sent: std::io::Result<()>) {
        match sent {
            Ok(()) => {
                metrics.cancel("sent_to_peer");
                self.log(|suppressed| {
                    tracing::info!(%peer, suppressed, "cancel request sent to the peer holding the session");
                });
            }
            Err(error) => {
                metrics.cancel("peer_failed");
                self.log(|suppressed| {
                    tracing::warn!(%peer, %error, suppressed, "cancel request could not be sent to a peer");
                });
            }
        }
    }

    /// Writes a line about a cancel with `line`, given the number of lines
    /// suppressed since the last one, unless the limit drops it.
    fn log(&self, line: impl FnOnce(u64)) {
        if let Some(suppressed) = self.lines.allow(Instant::now()) {
            line(suppressed);
        }
    }

    /// Registers a session under a fresh random (pid, key), serving from
    /// `upstream`; the entry is removed when the returned guard drops.
    pub(crate) fn register(
        &self,
        upstream: Option<UpstreamKey>,
        random: &mut impl FnMut() -> u64,
    ) -> CancelGuard {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let target = Arc::new(Target::new(upstream));
        let instance = i32::from(self.instance_id) << RANDOM_PID_BITS;
        loop {
            let [a, b, c, d, e, f, g, h] = random().to_be_bytes();
            // Positive pids, as Postgres hands out, so clients print them
            // sanely; the instance id in the high bits.
            let pid = instance | (i32::from_be_bytes([a, b, c, d]) & ((1 << RANDOM_PID_BITS) - 1));
            let key = [e, f, g, h];
            if pid != 0 && !sessions.contains_key(&pid) {
                sessions.insert(pid, (key, Arc::clone(&target)));
                return CancelGuard {
                    registry: self.clone(),
                    target,
                    pid,
                    key,
                };
            }
        }
    }

    /// The target of the session with this exact (pid, key); forward the
    /// cancel while holding its [`Target::forwarding`] guard. A cancel
    /// waiting behind another when the session retargets is sent to where
    /// the session points then (nowhere, between transactions): the
    /// retarget goes first.
    pub(crate) fn lookup(&self, pid: i32, key: &[u8]) -> Option<Arc<Target>> {
        let sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        match sessions.get(&pid) {
            Some((expected, target))
                if aws_lc_rs::constant_time::verify_slices_are_equal(expected, key).is_ok() =>
            {
                Some(Arc::clone(target))
            }
            _ => None,
        }
    }
}

/// Keeps a session's cancel entry alive.
pub(crate) struct CancelGuard {
    registry: CancelRegistry,
    target: Arc<Target>,
    /// The pid the client sees.
    pub(crate) pid: i32,
    /// The key the client sees.
    pub(crate) key: [u8; 4],
}

impl CancelGuard {
    /// Points the client's cancel key at `upstream` (or at nothing); waits
    /// for a cancel being forwarded to the old target to finish first.
    ///
    /// Tried at once, when called: a retarget nothing stands in the way of
    /// (nearly all) makes no future of its own, and the wait is boxed, so
    /// that the transaction futures this is awaited in stay small.
    pub(crate) fn retarget(
        &self,
        upstream: Option<UpstreamKey>,
    ) -> impl std::future::Future<Output = ()> + Send + '_ {
        let waiting = (self.target.try_set(upstream).err())
            .map(|upstream| Box::pin(self.target.set(upstream)));
        async move {
            if let Some(waiting) = waiting {
                waiting.await;
            }
        }
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.registry
            .sessions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn resolve(registry: &CancelRegistry, pid: i32, key: u32) -> Option<UpstreamKey> {
        match registry.lookup(pid, &key.to_be_bytes()) {
            Some(target) => target.backend(),
            None => None,
        }
    }

    fn upstream() -> UpstreamKey {
        UpstreamKey {
            pid: 100,
            secret: Arc::from(&5i32.to_be_bytes()[..]),
            address: Arc::from("127.0.0.1:5432"),
            connect_timeout: std::time::Duration::from_secs(1),
        }
    }

    fn cluster(instance_id: u16, dns: Option<&str>) -> ClusterConfig {
        ClusterConfig {
            instance_id,
            peers: [
                (1, "10.0.0.1:6432".to_owned()),
                (2, "10.0.0.2:6432".to_owned()),
            ]
            .into_iter()
            .collect(),
            peer_dns: dns.map(str::to_owned),
        }
    }

    #[test]
    fn pids_name_their_instance_and_cancels_travel_at_most_once() {
        let registry = CancelRegistry::new(2);
        let mut values = [u64::MAX].into_iter();
        let guard = registry.register(None, &mut || values.next().unwrap_or(1));
        assert!(guard.pid > 0);
        assert_eq!(instance_of(guard.pid), 2);
        let on_one = cluster(1, None);
        let on_two = cluster(2, None);
        assert_eq!(
            route(guard.pid, &on_one),
            Route::Peer("10.0.0.2:6432".into())
        );
        assert_eq!(route(guard.pid, &on_two), Route::Local(guard.pid));
        // Forwarded cancels are never forwarded again, even to the wrong
        // instance.
        let relayed = forwarded(guard.pid);
        assert!(relayed < 0);
        assert_eq!(route(relayed, &on_one), Route::Local(guard.pid));
        // An instance nobody knows: every peer the name resolves to, or
        // nowhere.
        let pid_of_7 = 7 << RANDOM_PID_BITS | 5;
        assert_eq!(route(pid_of_7, &on_one), Route::Unknown(7));
        assert_eq!(
            route(pid_of_7, &cluster(1, Some("peers:6432"))),
            Route::AllPeers("peers:6432".into())
        );
    }

    #[tokio::test]
    async fn maps_only_the_exact_key_follows_retargets_and_forgets_on_drop() {
        let registry = CancelRegistry::default();
        let mut values = [0x0000_0007_0000_0009u64].into_iter();
        let guard = registry.register(Some(upstream()), &mut || values.next().unwrap_or(1));
        assert_eq!((guard.pid, guard.key), (7, 9u32.to_be_bytes()));
        assert_eq!(resolve(&registry, 7, 9).await, Some(upstream()));
        assert_eq!(resolve(&registry, 7, 10).await, None);
        assert_eq!(resolve(&registry, 100, 5).await, None);
        guard.retarget(None).await;
        assert_eq!(resolve(&registry, 7, 9).await, None);
        drop(guard);
        assert!(registry.lookup(7, &9u32.to_be_bytes()).is_none());
    }

    #[tokio::test]
    async fn retargeting_waits_for_a_cancel_in_flight() {
        let registry = CancelRegistry::default();
        let guard = registry.register(Some(upstream()), &mut || 0x0000_0007_0000_0009);
        let target = registry.lookup(7, &9u32.to_be_bytes()).expect("registered");
        let forwarding = target.forwarding().await.expect("aimed");
        assert_eq!(forwarding.backend, upstream());
        let mut retarget = Box::pin(guard.retarget(None));
        assert!(futures_now(&mut retarget).is_none(), "did not wait");
        let mut second = Box::pin(target.forwarding());
        assert!(futures_now(&mut second).is_none(), "a second cancel waits");
        drop(forwarding);
        retarget.await;
        assert_eq!(target.backend(), None);
        assert!(second.await.is_none(), "then finds nothing to cancel");
    }

    /// Polls a future once.
    fn futures_now<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        match std::pin::Pin::new(future).poll(&mut cx) {
            std::task::Poll::Ready(output) => Some(output),
            std::task::Poll::Pending => None,
        }
    }
}
