//! The client connections the proxy holds, on every listener: who they
//! are and what they are doing, for `/clients` and the clients gauge (the
//! questions pgbouncer's `SHOW CLIENTS` answers).
//!
//! A connection registers when it is accepted and leaves the registry when
//! its [`ClientHandle`] drops. Its state changes are one atomic store, so
//! the relay can report a transaction's start and end without a lock.
//!
//! The registry is also how a connection's task is told to end: a drain
//! (close at the next transaction boundary), a forced drain or the
//! console's `KILL_CLIENT` (close now) raise a flag in its entry and wake
//! its task. Waiting for that costs a connection one waker slot and its
//! task one atomic operation per poll, no list of waiters and no lock: a
//! transaction-pooled client waits for it at every transaction.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::SystemTime;

use futures_util::task::AtomicWaker;

use crate::transport::Transport;

/// What a client connection is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientState {
    /// Connected, not logged in yet.
    Authenticating,
    /// Logged in, nothing in flight, no transaction open.
    Idle,
    /// Waiting for a pooled upstream connection.
    Waiting,
    /// A query or transaction is in progress.
    Active,
}

impl ClientState {
    /// Every state, for gauges that report zeros too.
    pub const ALL: [Self; 4] = [
        Self::Authenticating,
        Self::Idle,
        Self::Waiting,
        Self::Active,
    ];

    /// The state's name in metrics and JSON.
    pub fn label(self) -> &'static str {
        match self {
            Self::Authenticating => "authenticating",
            Self::Idle => "idle",
            Self::Waiting => "waiting",
            Self::Active => "active",
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            0 => Self::Authenticating,
            1 => Self::Idle,
            2 => Self::Waiting,
            _ => Self::Active,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Authenticating => 0,
            Self::Idle => 1,
            Self::Waiting => 2,
            Self::Active => 3,
        }
    }
}

/// Who a client logged in as.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientLogin {
    /// The database role.
    pub role: String,
    /// The database.
    pub database: String,
    /// The provider of its token; `None` for an anonymous role.
    pub provider: Option<String>,
    /// The token's `sub`; `None` for an anonymous role.
    pub subject: Option<String>,
    /// How it shares upstream connections (`none`, `session`,
    /// `transaction`).
    pub pool_mode: &'static str,
    /// The `application_name` it gave at startup.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,
    /// Whether its connection is encrypted.
    pub tls: bool,
    /// Its id in the upstream pools, which links it to the backend it
    /// holds ([`crate::pool::ServerInfo::client`]).
    #[serde(skip)]
    pub pool_client: u64,
    /// The role it asked for at startup, when its token chose another
    /// (`role_claim`); its log lines name both.
    #[serde(skip)]
    pub requested_role: Option<String>,
}

/// One registered connection.
#[derive(Debug)]
struct Registration {
    peer: SocketAddr,
    transport: AtomicU8,
    connected: SystemTime,
    state: AtomicU8,
    login: OnceLock<ClientLogin>,
    /// What it has been told from outside its task.
    told: Flags,
}

/// What a connection has been told ([`ClientHandle::poll_told`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Told(u8);

impl Told {
    /// Close now: a forced drain or the console's `KILL_CLIENT`.
    pub(crate) fn close(self) -> bool {
        self.0 & CLOSE != 0
    }
}

/// A drain began: close at the next transaction boundary.
const DRAIN: u8 = 1;
/// Close now: a forced drain or the console's `KILL_CLIENT`.
const CLOSE: u8 = 2;

/// Flags raised for a connection's task, and the waker of the one task
/// that waits for them (a connection's own).
#[derive(Debug, Default)]
struct Flags {
    raised: AtomicU8,
    waker: AtomicWaker,
    /// Which waker `waker` was last given (its data and vtable addresses,
    /// as [`std::task::Waker::will_wake`] compares them). Only a raise
    /// takes it back, so while nothing is raised, a wait with the same
    /// waker need not register again: a pooled session waits here twice
    /// a transaction, and registering costs more than its own checks.
    registered: (AtomicUsize, AtomicUsize),
}

impl Flags {
    fn raise(&self, flags: u8) {
        self.raised.fetch_or(flags, Ordering::AcqRel);
        self.waker.wake();
    }

    fn is_raised(&self, flag: u8) -> bool {
        self.raised.load(Ordering::Acquire) & flag != 0
    }

    /// `Ready` with the flags of `flags` raised, if any; otherwise the
    /// task's waker is registered for the next raise.
    fn poll_raised(&self, flags: u8, cx: &mut Context<'_>) -> Poll<u8> {
        let raised = self.raised.load(Ordering::Acquire);
        if raised & flags != 0 {
            return Poll::Ready(raised & flags);
        }
        let waker = cx.waker();
        let id = crate::waker_id::waker_id(waker);
        // Nothing raised yet, so nothing took the waker this task
        // registered: a raise from now on wakes it.
        if raised == 0
            && self.registered.0.load(Ordering::Relaxed) == id.0
            && self.registered.1.load(Ordering::Relaxed) == id.1
        {
            return Poll::Pending;
        }
        self.waker.register(waker);
        self.registered.0.store(id.0, Ordering::Relaxed);
        self.registered.1.store(id.1, Ordering::Relaxed);
        // Raised between the check and the registration: its wake may
        // have gone to the waker before this one.
        match self.raised.load(Ordering::Acquire) & flags {
            0 => Poll::Pending,
            raised => Poll::Ready(raised),
        }
    }
}

/// The registry.
#[derive(Debug, Default)]
pub struct Clients {
    entries: Mutex<HashMap<u64, Arc<Registration>>>,
    next_id: AtomicU64,
    /// What every connection has been told ([`Clients::tell_all`]),
    /// including those registered after.
    told_all: AtomicU8,
}

/// A connection's place in the registry; it leaves when this drops.
#[derive(Debug)]
pub struct ClientHandle {
    clients: Arc<Clients>,
    id: u64,
    activity: Activity,
}

/// Where a connection's state is recorded: cheap to clone, for the relay.
#[derive(Debug, Clone)]
pub struct Activity(Arc<Registration>);

impl Activity {
    /// Records what the connection is doing now.
    pub fn set(&self, state: ClientState) {
        self.0.state.store(state.as_u8(), Ordering::Relaxed);
    }
}

/// A connection as `/clients` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientInfo {
    /// Registry id (process-unique, for correlating log lines).
    pub id: u64,
    /// Where it connects from.
    pub peer: SocketAddr,
    /// `tcp`, `websocket` or `http`.
    pub transport: &'static str,
    /// What it is doing.
    pub state: ClientState,
    /// Seconds since it connected.
    pub connected_secs: u64,
    /// When it connected.
    #[serde(skip)]
    pub connected: SystemTime,
    /// Who it logged in as, once it has.
    #[serde(flatten)]
    pub login: Option<ClientLogin>,
}

fn transport_code(transport: Transport) -> u8 {
    match transport {
        Transport::Wire => 0,
        Transport::WebSocket => 1,
        Transport::Http => 2,
    }
}

fn transport_of(code: u8) -> Transport {
    match code {
        0 => Transport::Wire,
        1 => Transport::WebSocket,
        _ => Transport::Http,
    }
}

impl Clients {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Registration>>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connection just accepted.
    pub fn register(self: &Arc<Self>, peer: SocketAddr, transport: Transport) -> ClientHandle {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Arc::new(Registration {
            peer,
            transport: AtomicU8::new(transport_code(transport)),
            connected: SystemTime::now(),
            state: AtomicU8::new(ClientState::Authenticating.as_u8()),
            login: OnceLock::new(),
            told: Flags::default(),
        });
        let mut entries = self.entries();
        // Read under the lock `tell_all` raises under: a connection
        // registered during a drain is told as the others were.
        let told = self.told_all.load(Ordering::Acquire);
        entry.told.raised.store(told, Ordering::Release);
        entries.insert(id, Arc::clone(&entry));
        drop(entries);
        ClientHandle {
            clients: Arc::clone(self),
            id,
            activity: Activity(entry),
        }
    }

    /// Every connection now, oldest first.
    pub fn snapshot(&self) -> Vec<ClientInfo> {
        let now = SystemTime::now();
        let mut infos: Vec<ClientInfo> = self
            .entries()
            .iter()
            .map(|(&id, entry)| ClientInfo {
                id,
                peer: entry.peer,
                transport: transport_of(entry.transport.load(Ordering::Relaxed)).label(),
                state: ClientState::from_u8(entry.state.load(Ordering::Relaxed)),
                connected_secs: now
                    .duration_since(entry.connected)
                    .map_or(0, |age| age.as_secs()),
                connected: entry.connected,
                login: entry.login.get().cloned(),
            })
            .collect();
        infos.sort_by_key(|info| info.id);
        infos
    }

    /// Closes connection `id` now, as a forced drain would; false when
    /// there is no such connection.
    pub fn kill(&self, id: u64) -> bool {
        match self.entries().get(&id) {
            Some(entry) => {
                entry.told.raise(CLOSE);
                true
            }
            None => false,
        }
    }

    /// Tells every connection, and each registered from now on, that a
    /// drain has begun ([`ClientHandle::draining`]).
    pub(crate) fn drain_all(&self) {
        self.tell_all(DRAIN);
    }

    /// Tells every connection, and each registered from now on, to close
    /// now ([`ClientHandle::closing`]): a forced drain.
    pub(crate) fn close_all(&self) {
        self.tell_all(DRAIN | CLOSE);
    }

    fn tell_all(&self, flags: u8) {
        let entries = self.entries();
        self.told_all.fetch_or(flags, Ordering::AcqRel);
        for entry in entries.values() {
            entry.told.raise(flags);
        }
    }

    /// How many connections are in each (transport, state).
    pub fn counts(&self) -> HashMap<(Transport, ClientState), usize> {
        let mut counts = HashMap::new();
        for entry in self.entries().values() {
            let key = (
                transport_of(entry.transport.load(Ordering::Relaxed)),
                ClientState::from_u8(entry.state.load(Ordering::Relaxed)),
            );
            *counts.entry(key).or_default() += 1;
        }
        counts
    }
}

impl ClientHandle {
    /// Records what it is doing now.
    pub fn set_state(&self, state: ClientState) {
        self.activity.set(state);
    }

    /// Where the relay records what it is doing.
    pub fn activity(&self) -> Activity {
        self.activity.clone()
    }

    /// Records that it logged in (once; later calls are ignored), idle.
    pub fn logged_in(&self, login: ClientLogin) {
        let _ = self.activity.0.login.set(login);
        self.set_state(ClientState::Idle);
    }

    /// Records a change of transport (an HTTP connection upgraded to a
    /// WebSocket).
    pub fn set_transport(&self, transport: Transport) {
        self.activity
            .0
            .transport
            .store(transport_code(transport), Ordering::Relaxed);
    }

    /// Who it logged in as, once it has.
    pub fn login(&self) -> Option<&ClientLogin> {
        self.activity.0.login.get()
    }

    /// Its registry id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Completes when the connection must close now (a forced drain, or
    /// the console's `KILL_CLIENT`). Only the connection's own task may
    /// wait for it (or for [`ClientHandle::draining`]): the entry keeps one
    /// waker, the last one to wait.
    pub(crate) fn closing(&self) -> impl Future<Output = ()> + Send + '_ {
        let told = &self.activity.0.told;
        std::future::poll_fn(move |cx| told.poll_raised(CLOSE, cx).map(drop))
    }

    /// Completes when a drain has begun (at once if it has): the
    /// connection should close at its next transaction boundary.
    pub(crate) fn draining(&self) -> impl Future<Output = ()> + Send + '_ {
        let told = &self.activity.0.told;
        std::future::poll_fn(move |cx| told.poll_raised(DRAIN, cx).map(drop))
    }

    /// What the connection has been told, polled by its own task without
    /// a future per order: `Ready` once it must close now, or (with
    /// `drain`) once a drain has begun; otherwise the task is woken by the
    /// next order it listens for. A relay's stops look here on every wake
    /// (`session/stops.rs`).
    pub(crate) fn poll_told(&self, drain: bool, cx: &mut Context<'_>) -> Poll<Told> {
        let flags = if drain { CLOSE | DRAIN } else { CLOSE };
        self.activity.0.told.poll_raised(flags, cx).map(Told)
    }

    /// Whether a drain has begun.
    pub(crate) fn is_draining(&self) -> bool {
        self.activity.0.told.is_raised(DRAIN)
    }

    /// Whether the connection must close now.
    pub(crate) fn is_closing(&self) -> bool {
        self.activity.0.told.is_raised(CLOSE)
    }
}

impl Drop for ClientHandle {
    fn drop(&mut self) {
        self.clients.entries().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_appear_change_state_and_leave() {
        let clients = Arc::new(Clients::default());
        let peer: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let a = clients.register(peer, Transport::Wire);
        let b = clients.register(peer, Transport::Http);
        a.logged_in(ClientLogin {
            role: "authenticated".into(),
            database: "app".into(),
            provider: Some("clerk".into()),
            subject: Some("user_1".into()),
            pool_mode: "transaction",
            application_name: None,
            tls: false,
            pool_client: 7,
            requested_role: None,
        });
        b.set_state(ClientState::Active);
        let counts = clients.counts();
        assert_eq!(counts.get(&(Transport::Wire, ClientState::Idle)), Some(&1));
        assert_eq!(
            counts.get(&(Transport::Http, ClientState::Active)),
            Some(&1)
        );
        let json = serde_json::to_value(clients.snapshot()).expect("json");
        assert_eq!(json[0]["subject"], "user_1");
        assert_eq!(json[0]["state"], "idle");
        assert_eq!(json[1]["transport"], "http");
        drop(a);
        assert_eq!(clients.snapshot().len(), 1);
    }

    /// A waker counting its wakes.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Counting>, std::task::Waker) {
        let count = Arc::new(Counting(std::sync::atomic::AtomicUsize::new(0)));
        (
            Arc::clone(&count),
            std::task::Waker::from(Arc::clone(&count)),
        )
    }

    #[test]
    fn a_wait_polled_again_by_its_waker_is_woken_and_a_new_waker_replaces_it() {
        let told = Flags::default();
        let (first, first_waker) = counting();
        let mut cx = Context::from_waker(&first_waker);
        assert!(told.poll_raised(CLOSE, &mut cx).is_pending());
        // Polled again with the same waker: not registered again, and
        // still the one a raise wakes.
        assert!(told.poll_raised(CLOSE, &mut cx).is_pending());
        assert!(told.poll_raised(DRAIN, &mut cx).is_pending());
        let (second, second_waker) = counting();
        let mut other = Context::from_waker(&second_waker);
        assert!(told.poll_raised(CLOSE, &mut other).is_pending());
        told.raise(DRAIN);
        assert_eq!(first.0.load(Ordering::SeqCst), 0, "replaced");
        assert_eq!(second.0.load(Ordering::SeqCst), 1, "the last waker");
        assert!(told.poll_raised(DRAIN, &mut other).is_ready());
        // The raise took the waker: the same waker registers again.
        assert!(told.poll_raised(CLOSE, &mut other).is_pending());
        told.raise(CLOSE);
        assert_eq!(second.0.load(Ordering::SeqCst), 2, "registered again");
        assert!(told.poll_raised(CLOSE, &mut other).is_ready());
    }

    #[tokio::test]
    async fn a_drain_and_a_kill_reach_the_waiting_task_and_later_connections() {
        let clients = Arc::new(Clients::default());
        let peer: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        let waiting = clients.register(peer, Transport::Wire);
        let killed = clients.register(peer, Transport::Wire);
        let waited = tokio::spawn(async move {
            waiting.draining().await;
            waiting.closing().await;
        });
        let killed_id = killed.id();
        let kill_waited = tokio::spawn(async move { killed.closing().await });
        tokio::task::yield_now().await;
        assert!(clients.kill(killed_id));
        tokio::time::timeout(std::time::Duration::from_secs(5), kill_waited)
            .await
            .expect("a kill wakes its task")
            .expect("task");
        clients.drain_all();
        let later = clients.register(peer, Transport::Wire);
        assert!(later.is_draining(), "registered during a drain: told");
        assert!(!waited.is_finished(), "a drain alone does not close");
        clients.close_all();
        tokio::time::timeout(std::time::Duration::from_secs(5), waited)
            .await
            .expect("a forced drain wakes its task")
            .expect("task");
        tokio::time::timeout(std::time::Duration::from_secs(5), later.closing())
            .await
            .expect("and reaches one registered before it");
    }
}
