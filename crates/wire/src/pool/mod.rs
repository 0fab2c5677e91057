//! Logged-in upstream connections kept for reuse, per (database, role).
//!
//! A checkout hands out an idle connection or logs in a new one, bounded by
//! `max_per_key` connections per (database, role); waiting for a slot is
//! bounded by `checkout_timeout`. Which idle connection it takes is
//! [`pick`]'s decision. An idle connection is never handed out if it is
//! past its idle timeout or lifetime, if the server spoke or hung up while
//! it sat idle (a restart, `pg_terminate_backend`), or if it was idle long
//! enough to need a health check and fails it. When a slot is full its
//! waiters take turns by identity ([`fair`]).
//!
//! A [`Pooled`] connection goes back only through [`Pooled::release`],
//! which its user calls once it is known to be idle and clean; one whose
//! exchange failed (it is marked broken) is closed instead, and so is one
//! that is simply dropped. Idle connections are closed by [`reap`], which
//! whoever owns the pool runs.

mod fair;
mod gates;
mod keep;
mod keeper;
mod operate;
mod pick;
mod servers;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use rustc_hash::FxHashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::capacity::{self, Count, Held};
use crate::config::PoolLimits;
use crate::error::UpstreamError;
use crate::metrics::Metrics;
use crate::upstream::{self, Owner, SessionShape, Upstream, UpstreamConfig};
use keeper::Keeper;
use pick::{Candidate, Verdict, pick};

pub use fair::Fairness;
pub use gates::Gates;
pub use operate::ServerInfo;
pub use servers::{Reported, ServerPools};

/// An idle connection and its ages.
struct Idle {
    /// Boxed, here and in [`Pooled`]: a connection moves between the two
    /// on every transaction, and a pointer moves cheaper than its state.
    conn: Box<Upstream>,
    created: Instant,
    since: Instant,
}

impl Idle {
    fn candidate(&self) -> Candidate {
        Candidate {
            owner: self.conn.owner(),
            created: self.created.into_std(),
            since: self.since.into_std(),
        }
    }
}

impl pick::Owned for Idle {
    fn owner(&self) -> Owner {
        self.conn.owner()
    }
}

/// The connections of one (database, role). Shared by the pool's map and
/// by every checkout of it under way or held, so a checkout touches the
/// map once and the slot's own lock after that; a slot leaves the map
/// only when nothing else holds it ([`UpstreamPool::prune`]).
/// A (database, role) of a pool, for [`UpstreamPool::checkout_keyed`]:
/// its slot stays while a key to it is held.
#[derive(Clone)]
pub struct PoolKey(Arc<Slot>);

impl PoolKey {
    /// The database.
    pub fn database(&self) -> &str {
        &self.0.database
    }

    /// The role.
    pub fn role(&self) -> &str {
        &self.0.role
    }

    /// The pool's limits now, from the slot (the pool-wide lock is not
    /// taken).
    pub fn limits(&self) -> PoolLimits {
        self.0.connections().limits
    }
}

impl std::fmt::Debug for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PoolKey({}, {})", self.database(), self.role())
    }
}

struct Slot {
    database: String,
    role: String,
    permits: Arc<Semaphore>,
    /// Connections checked out (permits held), and clients waiting for one.
    busy: Count,
    waiting: Count,
    /// Where its waiters take turns by identity.
    turnstiles: fair::Turnstiles,
    connections: Mutex<Connections>,
    /// Wakes the clients keeping a connection of this slot between their
    /// transactions ([`keep`]) to look again at whether they may: when a
    /// checkout waits, on a recall, and on the reaper's rounds.
    call_keepers: keep::Calls,
    /// Connections kept by their clients now.
    kept: Count,
    /// How many times its kept connections were called back (`RECONNECT`,
    /// `PAUSE`, new limits): a keep made before the last recall ends.
    recalls: AtomicU64,
}

/// A slot's connections, under its lock.
struct Connections {
    idle: Vec<Idle>,
    /// Checked out, by place: what `SHOW SERVERS` lists.
    active: operate::ActiveList,
    /// Its size, as its semaphore was last sized.
    size: usize,
    /// The pool's limits, as last set.
    limits: PoolLimits,
    /// Connections created before this are closed instead of reused (the
    /// console's `RECONNECT`).
    retire_before: Option<Instant>,
}

impl Slot {
    fn connections(&self) -> std::sync::MutexGuard<'_, Connections> {
        self.connections
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn retired(connections: &Connections, created: Instant) -> bool {
        connections.retire_before.is_some_and(|at| created < at)
    }
}

/// The pool's mutable state, under one lock.
struct State {
    limits: PoolLimits,
    /// By database, then role: looked up with borrowed names, on every
    /// checkout. The names are the configuration's (or a template's
    /// filled from verified claims), not a client's choice.
    slots: FxHashMap<String, FxHashMap<String, Arc<Slot>>>,
}

impl State {
    fn slots(&self) -> impl Iterator<Item = &Arc<Slot>> {
        self.slots.values().flat_map(FxHashMap::values)
    }
}

/// Upstream connections by (database, role).
pub struct UpstreamPool {
    name: &'static str,
    config: UpstreamConfig,
    state: Mutex<State>,
    /// One connection per login role kept out of circulation, logged in
    /// after the role's first login: it sets the role's password back if a
    /// client changed it, when every connection of the role is busy
    /// (`upstream::repair`). Never handed to a client.
    keepers: Mutex<HashMap<String, Keeper>>,
    metrics: Arc<Metrics>,
    /// This pool's series of checkout waits.
    checkout_wait: crate::metrics::CheckoutWait,
    /// The console's PAUSE, shared with every pool of the proxy.
    gates: Arc<Gates>,
}

/// A place in a slot: a permit, counted in `busy` while held.
struct SlotPermit {
    _permit: OwnedSemaphorePermit,
    _busy: Held,
}

/// A checked-out connection.
pub struct Pooled {
    conn: Option<Box<Upstream>>,
    created: Instant,
    /// When it was handed out.
    taken: Instant,
    /// The pool's internal query timeout then.
    query_timeout: Duration,
    reused: bool,
    slot: Arc<Slot>,
    /// Its place among the slot's active connections; `None` once released.
    place: Option<usize>,
    /// The slot's recalls of kept connections when it was checked out
    /// (`keep.rs`).
    recalls: u64,
    _place: SlotPermit,
}

/// One (database, role) of a pool, as `/pools` and `/metrics` show it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotSnapshot {
    /// The database.
    pub database: String,
    /// The role.
    pub role: String,
    /// Connections idle in the pool.
    pub idle: usize,
    /// Connections checked out.
    pub in_use: usize,
    /// Clients waiting for a connection.
    pub waiting: usize,
    /// Most connections allowed.
    pub size: usize,
}

/// A pool, as `/pools` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PoolSnapshot {
    /// Which pool (`wire` for Postgres clients, `http` for `/sql`).
    pub pool: &'static str,
    /// Its (database, role) entries.
    pub slots: Vec<SlotSnapshot>,
}

/// A failure to ready a checked-out connection that another connection
/// may not have: see [`Attempts`].
pub trait ReadyFailure: std::fmt::Display {
    /// Whether the failure is the connection's (it died while idle, its
    /// reset failed), so the caller, having sent nothing of its client's
    /// on it, may try another.
    fn worth_another_connection(&self) -> bool;
}

impl ReadyFailure for UpstreamError {
    fn worth_another_connection(&self) -> bool {
        UpstreamError::worth_another_connection(self)
    }
}

/// The one retry policy of a checkout whose connection is readied before
/// the caller sends anything of its client's on it (wire sessions' and
/// `/sql`'s alike): a connection that fails for a reason of its own (it
/// died while idle, its reset failed) is dropped and another tried, until
/// `checkout_timeout` from the first attempt.
#[derive(Debug, Clone, Copy)]
pub struct Attempts {
    give_up: Instant,
}

impl Attempts {
    /// Whether to drop the connection that failed with `error` and check
    /// out another.
    pub fn another<E: ReadyFailure>(&self, error: &E) -> bool {
        let another = error.worth_another_connection() && Instant::now() < self.give_up;
        if another {
            tracing::debug!(%error, "pooled connection unusable; trying another");
        }
        another
    }
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    /// Every connection for this (database, role) stayed busy.
    #[error("no upstream connection became free within {0:?}")]
    Timeout(Duration),
    /// Logging in a new connection failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl UpstreamPool {
    /// An empty pool named `name` (in metrics) for the server in
    /// `config`, whose checkouts wait while `gates` pause their database.
    /// Run [`reap`] beside it to close idle connections on time.
    pub fn new(
        name: &'static str,
        config: UpstreamConfig,
        limits: PoolLimits,
        metrics: Arc<Metrics>,
        gates: Arc<Gates>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name,
            config,
            state: Mutex::new(State {
                limits,
                slots: FxHashMap::default(),
            }),
            keepers: Mutex::new(HashMap::new()),
            checkout_wait: metrics.checkout_wait(name),
            metrics,
            gates,
        })
    }

    /// The pool's name in metrics.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The pool's limits now.
    pub fn limits(&self) -> PoolLimits {
        self.state().limits
    }

    /// Changes the limits: new checkouts and releases follow them at once;
    /// a smaller size is reached as busy connections come back.
    pub fn set_limits(&self, limits: PoolLimits) {
        let mut state = self.state();
        state.limits = limits;
        for slot in state.slots() {
            let mut connections = slot.connections();
            capacity::resize(&slot.permits, connections.size, limits.max_per_key);
            connections.size = limits.max_per_key;
            connections.limits = limits;
            // Kept connections go back, to be kept again (or not) under
            // the new limits.
            slot.recall_kept();
        }
    }

    /// The server it connects to.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every (database, role) with its connections now.
    pub fn snapshot(&self) -> PoolSnapshot {
        let state = self.state();
        let mut slots: Vec<SlotSnapshot> = state
            .slots()
            .map(|slot| {
                let connections = slot.connections();
                SlotSnapshot {
                    database: slot.database.clone(),
                    role: slot.role.clone(),
                    idle: connections.idle.len(),
                    in_use: slot.busy.get(),
                    waiting: slot.waiting.get(),
                    size: connections.size,
                }
            })
            .collect();
        slots.sort_by(|a, b| (&a.database, &a.role).cmp(&(&b.database, &b.role)));
        PoolSnapshot {
            pool: self.name,
            slots,
        }
    }

    /// A connection for (`database`, `role`) for `client`: an idle one as
    /// [`pick`] chooses, or a new login as `role` with `password`. When
    /// none is free, waiters take turns by `fair` ([`fair`]).
    pub async fn checkout(
        self: &Arc<Self>,
        database: &str,
        role: &str,
        password: Option<&str>,
        client: u64,
        fair: Fairness<'_>,
    ) -> Result<Pooled, CheckoutError> {
        self.checkout_as(database, role, || password, (client, None), fair)
            .await
    }

    /// [`UpstreamPool::checkout`] for a client whose session would be
    /// `wanted`: an idle connection holding such a session is preferred
    /// to a clean one (see `upstream::shape`). The role's password is
    /// looked up only for a new login.
    pub async fn checkout_as<'p>(
        self: &Arc<Self>,
        database: &str,
        role: &str,
        password: impl FnOnce() -> Option<&'p str>,
        (client, wanted): (u64, Option<&SessionShape>),
        fair: Fairness<'_>,
    ) -> Result<Pooled, CheckoutError> {
        let key = self.key(database, role);
        self.checkout_keyed(&key, password, (client, wanted), fair, Instant::now())
            .await
    }

    /// The (database, role) whose connections a client checks out, held
    /// by a transaction-pooled client between its transactions: a checkout
    /// by key looks nothing up, and the client keeps no copy of the names.
    pub fn key(&self, database: &str, role: &str) -> PoolKey {
        PoolKey(self.slot(database, role).0)
    }

    /// [`UpstreamPool::checkout_as`] for a key of this pool, started at
    /// `now` (the caller's clock reading: a connection free at once is
    /// handed out with no reading of its own).
    pub async fn checkout_keyed<'p>(
        self: &Arc<Self>,
        key: &PoolKey,
        password: impl FnOnce() -> Option<&'p str>,
        (client, wanted): (u64, Option<&SessionShape>),
        fair: Fairness<'_>,
        now: Instant,
    ) -> Result<Pooled, CheckoutError> {
        let slot = Arc::clone(&key.0);
        // Limits are read under the slot's lock where used: most
        // checkouts take that lock once, to take an idle connection.
        let checkout_timeout = || slot.connections().limits.checkout_timeout;
        let (database, role) = (slot.database.as_str(), slot.role.as_str());
        let mut waited = false;
        // The waits below are boxed: they are rare, and their futures
        // would make every checkout's (and transaction's) larger.
        if self.gates.is_paused(database) {
            let _waiting = slot.waiting.hold();
            let checkout_timeout = checkout_timeout();
            let deadline = now + checkout_timeout;
            waited = true;
            if !Box::pin(self.gates.wait_open(database, deadline)).await {
                self.metrics.checkout_timeout(self.name, database, role);
                return Err(CheckoutError::Timeout(checkout_timeout));
            }
        }
        // A free slot needs no timer: most checkouts take this path.
        let permit = match Arc::clone(&slot.permits).try_acquire_owned() {
            Ok(permit) => {
                self.checkout_wait.observe(Duration::ZERO);
                permit
            }
            Err(_) => {
                let started = Instant::now();
                let checkout_timeout = checkout_timeout();
                waited = true;
                let _waiting = slot.waiting.hold();
                // Clients keeping connections between their transactions
                // give them back (those in a transaction, at its end: the
                // wait is counted first).
                slot.call_keepers.call();
                let acquired = Box::pin(tokio::time::timeout(
                    checkout_timeout,
                    slot.turnstiles.acquire(fair, Arc::clone(&slot.permits)),
                ))
                .await;
                self.checkout_wait.observe(started.elapsed());
                self.metrics.waited(database, role, started.elapsed());
                match acquired {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        self.metrics.checkout_timeout(self.name, database, role);
                        return Err(CheckoutError::Timeout(checkout_timeout));
                    }
                }
            }
        };
        let held = SlotPermit {
            _permit: permit,
            _busy: slot.busy.hold(),
        };
        let recalls = slot.recalls.load(std::sync::atomic::Ordering::SeqCst);
        let now = if waited { Instant::now() } else { now };
        let (took, reused) = match Self::take_usable_idle(&slot, (client, wanted), now).await {
            Some(took) => (took, true),
            None => {
                // Boxed: a login's future is large and rarely needed.
                let limits = slot.connections().limits;
                let login = Box::pin(self.log_in(database, role, password(), &[], &limits));
                let conn = Box::new(login.await?);
                let created = Instant::now();
                let place = (slot.connections().active).insert(&conn, (created, created), client);
                let idle = Idle {
                    conn,
                    created,
                    since: created,
                };
                let took = Took {
                    idle,
                    place,
                    at: created,
                    query_timeout: limits.internal_query_timeout,
                };
                (took, false)
            }
        };
        let Took {
            idle,
            place,
            at,
            query_timeout,
        } = took;
        Ok(Pooled {
            conn: Some(idle.conn),
            created: idle.created,
            taken: at,
            query_timeout,
            reused,
            slot,
            place: Some(place),
            recalls,
            _place: held,
        })
    }

    /// The slot of (`database`, `role`), made on first use, and the limits
    /// now.
    fn slot(&self, database: &str, role: &str) -> (Arc<Slot>, PoolLimits) {
        let mut state = self.state();
        let limits = state.limits;
        if let Some(slot) = state.slots.get(database).and_then(|roles| roles.get(role)) {
            return (Arc::clone(slot), limits);
        }
        let slot = Arc::new(Slot {
            database: database.to_owned(),
            role: role.to_owned(),
            permits: Arc::new(Semaphore::new(limits.max_per_key)),
            busy: Count::default(),
            waiting: Count::default(),
            turnstiles: fair::Turnstiles::default(),
            call_keepers: keep::Calls::default(),
            kept: Count::default(),
            recalls: AtomicU64::new(0),
            connections: Mutex::new(Connections {
                idle: Vec::new(),
                active: operate::ActiveList::default(),
                size: limits.max_per_key,
                limits,
                retire_before: None,
            }),
        });
        (state.slots.entry(database.to_owned()).or_default())
            .insert(role.to_owned(), Arc::clone(&slot));
        (slot, limits)
    }

    /// The retry policy for checkouts starting at `now` under `limits`
    /// ([`Attempts`]).
    pub fn attempts(limits: &PoolLimits, now: Instant) -> Attempts {
        Attempts {
            give_up: now + limits.checkout_timeout,
        }
    }

    /// The idle connection [`pick`] chooses for `client` at `now`, listed
    /// as active, skipping (and closing) those past their lifetime, those
    /// the server spoke on or closed while they sat idle, and those that
    /// fail a due health check. Each check's deadline counts from the time
    /// it starts: `now` for the first, a new reading after each one (a
    /// check that timed out used its whole allowance).
    async fn take_usable_idle(
        slot: &Slot,
        (client, wanted): (u64, Option<&SessionShape>),
        mut now: Instant,
    ) -> Option<Took> {
        loop {
            let (mut idle, query_timeout) = match Self::take_idle(slot, (client, wanted), now) {
                Taken::Ready(took) => return Some(took),
                Taken::Check(idle, query_timeout) => (idle, query_timeout),
                Taken::None => return None,
            };
            let pinged = Box::pin(idle.conn.ping(now + query_timeout)).await;
            now = Instant::now();
            if let Err(error) = pinged {
                tracing::debug!(%error, "an idle upstream connection failed its health check");
                continue;
            }
            let place = (slot.connections().active).insert(&idle.conn, (idle.created, now), client);
            return Some(Took {
                idle,
                place,
                at: now,
                query_timeout,
            });
        }
    }

    /// Takes the idle connection [`pick`] chooses for `client` at `now`:
    /// listed as active at once if it is usable as it is, or to be checked
    /// first.
    /// Those past their lifetime or closed by the server are dropped
    /// (after the lock is let go).
    fn take_idle(
        slot: &Slot,
        (client, wanted): (u64, Option<&SessionShape>),
        now: Instant,
    ) -> Taken {
        let mut dropped = Vec::new();
        let mut connections = slot.connections();
        let limits = connections.limits;
        let taken = loop {
            // Checked out, the caller included.
            let busy = slot.busy.get();
            let may_grow = busy + connections.idle.len() < connections.size;
            let same = |idle: &Idle| wanted.is_some_and(|wanted| idle.conn.serves(wanted));
            let Some(at) = pick(&connections.idle, client, same, may_grow) else {
                break Taken::None;
            };
            let mut idle = connections.idle.remove(at);
            let verdict = idle.candidate().verdict(&limits, now.into_std());
            if verdict == Verdict::Close {
                dropped.push(idle);
                continue;
            }
            if idle.conn.spoke_while_idle() {
                tracing::debug!("an idle upstream connection was closed by the server");
                dropped.push(idle);
                continue;
            }
            if verdict == Verdict::Check {
                break Taken::Check(idle, limits.internal_query_timeout);
            }
            let place = (connections.active).insert(&idle.conn, (idle.created, now), client);
            break Taken::Ready(Took {
                idle,
                place,
                at: now,
                query_timeout: limits.internal_query_timeout,
            });
        };
        drop(connections);
        drop(dropped);
        taken
    }

    /// Logs in a connection of a client's own (`pool_mode = "none"`),
    /// outside the pool's count, with the client's startup `parameters`;
    /// a password a client changed is set back as for pooled logins.
    pub async fn log_in_unpooled(
        self: &Arc<Self>,
        database: &str,
        role: &str,
        password: Option<&str>,
        parameters: &[(String, String)],
    ) -> Result<Upstream, UpstreamError> {
        let limits = self.limits();
        self.log_in(database, role, password, parameters, &limits)
            .await
    }

    /// Logs in a new connection as `role`. A login refused for its
    /// password is tried once more after an idle connection of the role
    /// has set the password back: any role may change its own password,
    /// so a client can have changed it (see `upstream::repair`).
    async fn log_in(
        self: &Arc<Self>,
        database: &str,
        role: &str,
        password: Option<&str>,
        parameters: &[(String, String)],
        limits: &PoolLimits,
    ) -> Result<Upstream, UpstreamError> {
        let first = self
            .connect_timed(database, role, password, parameters)
            .await;
        let Some(password) = password else {
            return first;
        };
        match &first {
            Err(UpstreamError::LoginRefused { error, .. }) if error.code() == "28P01" => {}
            Ok(_) => {
                self.ensure_keeper(database, role, password);
                return first;
            }
            Err(_) => return first,
        }
        let deadline = Instant::now() + limits.internal_query_timeout;
        if !self.restore_password(role, password, deadline).await {
            return first;
        }
        self.connect_timed(database, role, Some(password), parameters)
            .await
    }

    async fn connect_timed(
        &self,
        database: &str,
        role: &str,
        password: Option<&str>,
        parameters: &[(String, String)],
    ) -> Result<Upstream, UpstreamError> {
        let started = Instant::now();
        let connected = upstream::connect(&self.config, role, database, password, parameters).await;
        self.metrics.upstream_login(
            database,
            role,
            started.elapsed(),
            connected
                .as_ref()
                .map(|_| ())
                .map_err(|error| error as &dyn crate::error::Classify),
        );
        connected
    }

    /// Marks the idle connections holding `client`'s session as nobody's
    /// to come back to (the client left); they are reset before reuse.
    pub fn disown(&self, key: &PoolKey, client: u64) {
        for idle in &mut key.0.connections().idle {
            if idle.conn.owner() == Owner::Client(client) {
                idle.conn.set_owner(Owner::Unknown);
            }
        }
    }

    /// Idle connections for (`database`, `role`).
    pub fn idle(&self, database: &str, role: &str) -> usize {
        self.existing(database, role)
            .map_or(0, |slot| slot.connections().idle.len())
    }

    /// The slot of (`database`, `role`), if it exists.
    fn existing(&self, database: &str, role: &str) -> Option<Arc<Slot>> {
        let state = self.state();
        state.slots.get(database)?.get(role).map(Arc::clone)
    }

    /// Closes idle connections past their idle timeout or lifetime at
    /// `now`, and forgets (database, role) entries with no connection and
    /// nothing holding them (no checkout under way or held, nobody
    /// waiting); returns how many connections it closed.
    pub fn prune(&self, now: Instant) -> usize {
        let mut state = self.state();
        let limits = state.limits;
        let mut closed = 0;
        for roles in state.slots.values_mut() {
            roles.retain(|_, slot| {
                let mut connections = slot.connections();
                let before = connections.idle.len();
                connections
                    .idle
                    .retain(|idle| !idle.candidate().expired(&limits, now.into_std()));
                closed += before - connections.idle.len();
                !(connections.idle.is_empty() && Arc::strong_count(slot) == 1)
            });
        }
        state.slots.retain(|_, roles| !roles.is_empty());
        closed
    }
}

/// What [`UpstreamPool::take_idle`] found.
enum Taken {
    /// A connection to hand out.
    Ready(Took),
    /// A connection to check before handing it out, with the pool's
    /// internal query timeout (read under the same lock).
    Check(Idle, Duration),
    /// None: log in a new one.
    None,
}

/// An idle connection taken for a client.
struct Took {
    idle: Idle,
    /// Its place among the slot's active connections.
    place: usize,
    /// When it was handed out.
    at: Instant,
    /// The pool's internal query timeout then (read under the lock that
    /// took it).
    query_timeout: Duration,
}

impl Pooled {
    /// The connection.
    pub fn conn(&mut self) -> &mut Upstream {
        #[allow(
            clippy::expect_used,
            reason = "a Pooled holds its connection until release or drop"
        )]
        self.conn.as_mut().expect("a Pooled holds its connection")
    }

    /// Whether the connection served someone before (and so may have died
    /// while idle).
    pub fn reused(&self) -> bool {
        self.reused
    }

    /// When it was handed out.
    pub fn taken(&self) -> Instant {
        self.taken
    }

    /// The deadline for readying it (the pool's internal query timeout
    /// from when it was handed out): no clock reading or lock of its own.
    pub fn ready_by(&self) -> Instant {
        self.taken + self.query_timeout
    }

    /// Ends a connection whose backend may still be working for a client
    /// that left ([`Upstream::abandon`]), by `deadline`. The connection
    /// stays counted as checked out until its backend is gone, so work
    /// nobody waits for cannot take the pool past its size.
    pub async fn abandon(mut self, deadline: Instant) {
        if let Some(conn) = self.conn.take() {
            conn.abandon(deadline).await;
        }
    }

    /// Returns the connection to the pool; call only when it is idle and
    /// holds no state of the request that used it. A connection that is
    /// broken or past its lifetime is closed instead.
    pub fn release(self) {
        self.release_at(Instant::now());
    }

    /// [`Pooled::release`] with the caller's clock reading of when the
    /// connection became idle (its idle age counts from there).
    pub fn release_at(mut self, now: Instant) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        conn.shrink();
        let mut connections = self.slot.connections();
        if let Some(at) = self.place.take() {
            connections.active.remove(at);
        }
        if conn.is_broken()
            || now.duration_since(self.created) >= connections.limits.server_lifetime
            || Slot::retired(&connections, self.created)
        {
            drop(connections);
            return;
        }
        connections.idle.push(Idle {
            conn,
            created: self.created,
            since: now,
        });
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // Released connections left the list already (under the lock
        // their release took); this is for those closed or abandoned.
        if let Some(at) = self.place.take() {
            self.slot.connections().active.remove(at);
        }
    }
}

/// Closes expired idle connections now and then, until the pool is gone.
pub async fn reap(pool: Weak<UpstreamPool>) {
    let mut next_prune = Instant::now();
    loop {
        let (prune_every, look_every) = match pool.upgrade() {
            Some(pool) => {
                let limits = pool.limits();
                let prune_every = (limits.idle_timeout.min(limits.server_lifetime) / 2)
                    .clamp(Duration::from_millis(100), Duration::from_secs(30));
                (prune_every, keep::look_period(&limits))
            }
            None => return,
        };
        if next_prune <= Instant::now() {
            next_prune = Instant::now() + prune_every;
        }
        // Kept connections are looked at every half keep, the pool pruned
        // on its own period.
        let wake = look_every.map_or(next_prune, |every| next_prune.min(Instant::now() + every));
        tokio::time::sleep_until(wake).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        pool.look_at_kept();
        if Instant::now() >= next_prune {
            let closed = pool.prune(Instant::now());
            if closed > 0 {
                tracing::debug!(closed, "closed expired idle upstream connections");
            }
        }
    }
}
