//! Totals per database and role: transactions, queries, bytes and the
//! time spent in them, for `/metrics` (counters and latency histograms by
//! database, role and transport) and for the console's `SHOW STATS`
//! ([`DatabaseStats`], pgbouncer's columns).
//!
//! A session resolves its [`Tally`] once, at login (one lookup under a
//! lock); from then on a count is a relaxed atomic add on memory only its
//! (database, role, transport) shares (a transaction or query is one add
//! into a histogram bucket found by arithmetic, and one to its time), and
//! a load and store on the session's own counts ([`SessionCounts`]).
//! Databases and roles come from sessions that logged in upstream, so they
//! are bounded by the configuration (`[roles]`) and by the databases the
//! server has; past [`MAX_KEYS`] pairs, new ones count under [`OTHER`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::transport::Transport;

/// Most (database, role) pairs counted apart: a server with more databases
/// than this (with `[upstream] databases` empty, any is served) counts the
/// rest together.
pub const MAX_KEYS: usize = 1000;

/// The database and role label of pairs past [`MAX_KEYS`].
pub const OTHER: &str = "(other)";

/// Upper bound of the first latency bucket, in microseconds.
const FIRST_BUCKET_US: u64 = 100;
/// Latency buckets, each twice the one before: 100 µs to about 13 s, then
/// `+Inf`.
pub(crate) const BUCKETS: usize = 18;

/// The upper bounds of the latency buckets, in seconds (without `+Inf`).
pub(crate) fn bucket_bounds() -> impl Iterator<Item = f64> {
    (0..BUCKETS).map(|i| (FIRST_BUCKET_US << i) as f64 / 1e6)
}

/// The bucket of a duration of `us` microseconds: the first whose bound
/// is not below it, or [`BUCKETS`] (`+Inf`).
fn bucket_of(us: u64) -> usize {
    let hundreds = us.div_ceil(FIRST_BUCKET_US);
    if hundreds <= 1 {
        return 0;
    }
    // The smallest i with 2^i >= hundreds.
    let index = (u64::BITS - (hundreds - 1).leading_zeros()) as usize;
    index.min(BUCKETS)
}

fn micros(took: Duration) -> u64 {
    u64::try_from(took.as_micros()).unwrap_or(u64::MAX)
}

/// A latency histogram of relaxed atomics: its count is the sum of its
/// buckets ([`Buckets::total`]); its sum is kept by the owner (the
/// transaction or query time).
#[derive(Debug, Default)]
pub(crate) struct Buckets([AtomicU64; BUCKETS + 1]);

impl Buckets {
    fn observe(&self, us: u64) {
        self.0[bucket_of(us)].fetch_add(1, Ordering::Relaxed);
    }

    /// Each bucket's own count (not cumulative), `+Inf` last.
    pub(crate) fn counts(&self) -> [u64; BUCKETS + 1] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }

    /// Observations in all buckets.
    fn total(&self) -> u64 {
        total(&self.counts())
    }
}

/// Observations in all of a histogram's buckets, as [`Buckets::counts`]
/// read them: the histogram's count.
pub(crate) fn total(counts: &[u64; BUCKETS + 1]) -> u64 {
    counts.iter().copied().fold(0, u64::wrapping_add)
}

/// What one (database, role) moved over one transport. How many
/// transactions and queries is what their histograms hold
/// ([`Counts::transactions`]): one atomic add each, not two.
#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub(crate) received: AtomicU64,
    pub(crate) sent: AtomicU64,
    pub(crate) transaction_us: AtomicU64,
    pub(crate) query_us: AtomicU64,
    pub(crate) transaction_buckets: Buckets,
    pub(crate) query_buckets: Buckets,
}

impl Counts {
    fn transaction(&self, us: u64) {
        self.transaction_us.fetch_add(us, Ordering::Relaxed);
        self.transaction_buckets.observe(us);
    }

    fn query(&self, us: u64) {
        self.query_us.fetch_add(us, Ordering::Relaxed);
        self.query_buckets.observe(us);
    }

    /// Transactions (and statements outside one) completed.
    pub(crate) fn transactions(&self) -> u64 {
        self.transaction_buckets.total()
    }

    /// Queries completed.
    pub(crate) fn queries(&self) -> u64 {
        self.query_buckets.total()
    }
}

/// The counts of one (database, role): one [`Counts`] per transport, and
/// the time its clients waited for a pooled connection.
#[derive(Debug)]
pub(crate) struct Entry {
    pub(crate) database: String,
    pub(crate) role: String,
    by_transport: [Counts; 3],
    pub(crate) wait_us: AtomicU64,
}

impl Entry {
    pub(crate) fn new(database: &str, role: &str) -> Self {
        Self {
            database: database.to_owned(),
            role: role.to_owned(),
            by_transport: Default::default(),
            wait_us: AtomicU64::new(0),
        }
    }

    /// The counts over `transport`.
    pub(crate) fn counts(&self, transport: Transport) -> &Counts {
        &self.by_transport[transport_index(transport)]
    }
}

/// The transports in the order [`Entry`] keeps them.
pub(crate) const TRANSPORTS: [Transport; 3] =
    [Transport::Wire, Transport::WebSocket, Transport::Http];

/// Where `transport` is in [`TRANSPORTS`] (and in arrays kept by transport).
pub(crate) fn transport_index(transport: Transport) -> usize {
    match transport {
        Transport::Wire => 0,
        Transport::WebSocket => 1,
        Transport::Http => 2,
    }
}

/// Every (database, role) counted so far.
#[derive(Debug, Default)]
pub(crate) struct Table {
    /// By database, then role: looked up with borrowed names.
    entries: Mutex<HashMap<String, HashMap<String, Arc<Entry>>>>,
}

impl Table {
    /// The entry of (`database`, `role`), made on first use.
    pub(crate) fn entry(&self, database: &str, role: &str) -> Arc<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = entries.get(database).and_then(|roles| roles.get(role)) {
            return Arc::clone(found);
        }
        let held: usize = entries.values().map(HashMap::len).sum();
        let (database, role) = if held >= MAX_KEYS {
            (OTHER, OTHER)
        } else {
            (database, role)
        };
        let roles = entries.entry(database.to_owned()).or_default();
        Arc::clone(
            roles
                .entry(role.to_owned())
                .or_insert_with(|| Arc::new(Entry::new(database, role))),
        )
    }

    /// Every entry, sorted by database and role.
    pub(crate) fn entries(&self) -> Vec<Arc<Entry>> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let mut all: Vec<Arc<Entry>> = entries
            .values()
            .flat_map(|roles| roles.values().cloned())
            .collect();
        drop(entries);
        all.sort_by(|a, b| (&a.database, &a.role).cmp(&(&b.database, &b.role)));
        all
    }
}

/// Totals of one database and role since the proxy started, every
/// transport together (`/sql` requests included): the numbers pgbouncer's
/// `SHOW STATS` shows as `total_*`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DatabaseStats {
    /// The database.
    pub database: String,
    /// The role clients logged in upstream as.
    pub role: String,
    /// Transactions (and statements outside one) completed; a `/sql`
    /// request counts as one.
    pub xact_count: u64,
    /// Queries completed: each request cycle up to its ReadyForQuery (a
    /// simple Query, or the extended-protocol messages up to a Sync); each
    /// statement of a `/sql` request.
    pub query_count: u64,
    /// Bytes received from clients.
    pub received: u64,
    /// Bytes sent to clients.
    pub sent: u64,
    /// Microseconds spent in transactions.
    pub xact_time_us: u64,
    /// Microseconds spent in queries.
    pub query_time_us: u64,
    /// Microseconds clients waited for a pooled upstream connection.
    pub wait_time_us: u64,
}

impl Entry {
    /// The totals over every transport.
    pub(crate) fn totals(&self) -> DatabaseStats {
        let sum = |field: fn(&Counts) -> u64| -> u64 {
            self.by_transport
                .iter()
                .map(field)
                .fold(0, u64::saturating_add)
        };
        DatabaseStats {
            database: self.database.clone(),
            role: self.role.clone(),
            xact_count: sum(Counts::transactions),
            query_count: sum(Counts::queries),
            received: sum(|c| c.received.load(Ordering::Relaxed)),
            sent: sum(|c| c.sent.load(Ordering::Relaxed)),
            xact_time_us: sum(|c| c.transaction_us.load(Ordering::Relaxed)),
            query_time_us: sum(|c| c.query_us.load(Ordering::Relaxed)),
            wait_time_us: self.wait_us.load(Ordering::Relaxed),
        }
    }

    /// Records `waited` as a client's wait for a pooled connection.
    pub(crate) fn waited(&self, waited: Duration) {
        self.wait_us.fetch_add(micros(waited), Ordering::Relaxed);
    }
}

/// What one session moved, for its end-of-session log line.
///
/// Written by one session at a time (its relays run one after another, a
/// `/sql` request has its own), so a count is a plain load and store
/// ([`add`]), not an atomic read-modify-write, which costs a locked
/// instruction (tens of cycles) each time: others only read them.
#[derive(Debug, Default)]
pub struct SessionCounts {
    /// Transactions completed.
    pub transactions: AtomicU64,
    /// Queries completed.
    pub queries: AtomicU64,
    /// Bytes from the client.
    pub received: AtomicU64,
    /// Bytes to the client.
    pub sent: AtomicU64,
    /// How the last relay stretch ended (a [`crate::relay::Stop`] label),
    /// empty while it runs.
    stop: Mutex<&'static str>,
}

/// Adds `n` to a counter only one thread writes at a time (see
/// [`SessionCounts`]): readers see the old or the new value.
fn add(counter: &AtomicU64, n: u64) {
    counter.store(
        counter.load(Ordering::Relaxed).saturating_add(n),
        Ordering::Relaxed,
    );
}

impl SessionCounts {
    /// How the session's relay last stopped, if it did.
    pub fn stop(&self) -> Option<&'static str> {
        let stop = *self.stop.lock().unwrap_or_else(PoisonError::into_inner);
        (!stop.is_empty()).then_some(stop)
    }
}

/// A session's counters, resolved once at login: its (database, role)
/// over its transport, and its own totals. Not `Clone`: the session's
/// counts take one writer at a time ([`SessionCounts`]), so a session
/// shares its one tally among its relays (`relay::Observed`), which run
/// one after another.
#[derive(Debug)]
pub struct Tally {
    entry: Arc<Entry>,
    transport: Transport,
    session: Arc<SessionCounts>,
    /// The session's identity, for the heaviest identities and tenants.
    who: Option<Arc<crate::usage::UsageSubject>>,
}

impl Default for Tally {
    /// Counts nowhere visible (tests, and a session before its login).
    fn default() -> Self {
        Self::new(Arc::new(Entry::new("", "")), Transport::Wire)
    }
}

impl Tally {
    pub(crate) fn new(entry: Arc<Entry>, transport: Transport) -> Self {
        Self {
            entry,
            transport,
            session: Arc::default(),
            who: None,
        }
    }

    /// The same counters, also counting each transaction for `who`.
    pub(crate) fn identified(self, who: Arc<crate::usage::UsageSubject>) -> Self {
        Self {
            who: Some(who),
            ..self
        }
    }

    fn counts(&self) -> &Counts {
        self.entry.counts(self.transport)
    }

    /// Bytes received from the client.
    pub fn received(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.counts().received.fetch_add(n, Ordering::Relaxed);
        add(&self.session.received, n);
    }

    /// Bytes sent to the client.
    pub fn sent(&self, n: usize) {
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.counts().sent.fetch_add(n, Ordering::Relaxed);
        add(&self.session.sent, n);
    }

    /// A transaction (or a statement outside one) that took `took`,
    /// ending `now` (the caller's clock reading, not another).
    pub fn transaction(&self, took: Duration, now: tokio::time::Instant) {
        let us = micros(took);
        self.counts().transaction(us);
        add(&self.session.transactions, 1);
        if let Some(who) = &self.who {
            who.transaction(us, now);
        }
    }

    /// A query that took `took`.
    pub fn query(&self, took: Duration) {
        self.counts().query(micros(took));
        add(&self.session.queries, 1);
    }

    /// Notes how a relay stretch of the session stopped.
    pub fn stopped(&self, label: &'static str) {
        *self
            .session
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = label;
    }

    /// This session's own totals.
    pub fn session(&self) -> &SessionCounts {
        &self.session
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_duration_lands_in_the_first_bucket_that_holds_it() {
        let bounds: Vec<u64> = (0..BUCKETS).map(|i| FIRST_BUCKET_US << i).collect();
        for us in [
            0, 1, 99, 100, 101, 199, 200, 201, 399, 400, 401, 1_000_000, 13_107_200,
        ]
        .into_iter()
        .chain(bounds.iter().copied())
        {
            let expected = bounds.iter().position(|&b| us <= b).unwrap_or(BUCKETS);
            assert_eq!(bucket_of(us), expected, "{us} µs");
        }
        assert_eq!(bucket_of(13_107_201), BUCKETS);
        assert_eq!(bucket_of(u64::MAX), BUCKETS);
    }

    #[test]
    fn totals_add_the_transports_up_and_pairs_past_the_limit_share_one_entry() {
        let table = Table::default();
        let tcp = Tally::new(table.entry("app", "authenticated"), Transport::Wire);
        let http = Tally::new(table.entry("app", "authenticated"), Transport::Http);
        tcp.transaction(Duration::from_micros(300), tokio::time::Instant::now());
        tcp.query(Duration::from_micros(250));
        tcp.received(10);
        http.transaction(Duration::from_micros(700), tokio::time::Instant::now());
        http.sent(5);
        table
            .entry("app", "authenticated")
            .waited(Duration::from_micros(40));
        let [stats] = &table.entries()[..] else {
            panic!("one entry");
        };
        assert_eq!(
            stats.totals(),
            DatabaseStats {
                database: "app".into(),
                role: "authenticated".into(),
                xact_count: 2,
                query_count: 1,
                received: 10,
                sent: 5,
                xact_time_us: 1000,
                query_time_us: 250,
                wait_time_us: 40,
            }
        );
        assert_eq!(tcp.session().transactions.load(Ordering::Relaxed), 1);

        let table = Table::default();
        for i in 0..MAX_KEYS + 5 {
            table.entry(&format!("db{i}"), "r");
        }
        let entries = table.entries();
        assert_eq!(entries.len(), MAX_KEYS + 1);
        assert!(
            entries
                .iter()
                .any(|e| e.database == OTHER && e.role == OTHER)
        );
    }
}
