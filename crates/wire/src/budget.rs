//! How many client connections the proxy holds: one budget for every
//! listener (Postgres over TCP, HTTP, WebSocket), and inside it a smaller
//! one, capped per source address too, for connections that have not
//! authenticated yet.
//!
//! A new connection takes its places at once when they are free
//! ([`Budget::enter`]). When its source's share or the unauthenticated
//! budget is full, it may wait for a place until its authentication
//! deadline ([`Entry::admit`]), in a queue as long as the unauthenticated
//! budget; a waiting connection holds no place. So a burst of legitimate
//! connections (a pool warming up, two hundred parallel `fetch`es) queues
//! for a moment, while stalled or garbage connections from one source hold
//! only that source's share and cannot lock anyone else out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout_at};

use crate::capacity::{Count, Held};

/// The limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Client connections in all, every listener together.
    pub max_connections: usize,
    /// Of those, connections that have not authenticated yet; also how
    /// many may wait for such a place.
    pub max_unauthenticated: usize,
    /// Unauthenticated connections from one source address.
    pub max_unauthenticated_per_source: usize,
}

/// Why a connection was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Full {
    /// The proxy holds `max_connections`.
    #[error("too many client connections")]
    Connections,
    /// No place among the unauthenticated came free before the deadline,
    /// or too many connections wait for one.
    #[error("too many connections waiting to authenticate")]
    Unauthenticated,
    /// No place for this source came free before the deadline.
    #[error("too many connections from one address waiting to authenticate")]
    Source,
}

/// The connection budget.
#[derive(Debug)]
pub struct Budget {
    /// The limits now; a reload changes them ([`Budget::set_limits`]).
    limits: Mutex<ConnectionLimits>,
    connections: Arc<Semaphore>,
    unauthenticated: Arc<Semaphore>,
    /// Places of unauthenticated connections, per source address.
    sources: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
    /// Connections waiting for a place.
    waiting: Arc<Semaphore>,
    /// Tickets held, and of those not authenticated: exact counts for
    /// [`Budget::in_use`] while a lowered limit is still being reached.
    held: Count,
    pending: Count,
}

/// A new connection: admitted already, or waiting to be.
#[derive(Debug)]
pub struct Entry {
    budget: Arc<Budget>,
    source: IpAddr,
    state: EntryState,
}

#[derive(Debug)]
enum EntryState {
    Admitted(Ticket),
    /// Holds a place in the waiting queue.
    Waiting(OwnedSemaphorePermit),
}

/// A connection's places in the budget; given back on drop.
#[derive(Debug)]
pub struct Ticket {
    _connection: OwnedSemaphorePermit,
    _held: Held,
    /// Held until the connection authenticates (boxed: the ticket lives
    /// in every session, long after this is gone).
    pending: Option<Box<Pending>>,
}

#[derive(Debug)]
struct Pending {
    /// The places (unauthenticated, source); given back first on drop.
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
    _counted: Held,
    budget: Arc<Budget>,
    source: IpAddr,
}

impl Drop for Pending {
    fn drop(&mut self) {
        drop(self.permits.take());
        self.budget.forget_idle_source(self.source);
    }
}

impl Budget {
    /// A budget with these limits.
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            limits: Mutex::new(limits),
            connections: Arc::new(Semaphore::new(limits.max_connections)),
            unauthenticated: Arc::new(Semaphore::new(limits.max_unauthenticated)),
            sources: Mutex::new(HashMap::new()),
            waiting: Arc::new(Semaphore::new(limits.max_unauthenticated)),
            held: Count::default(),
            pending: Count::default(),
        })
    }

    fn sources(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Arc<Semaphore>>> {
        self.sources.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The limits now.
    pub fn limits(&self) -> ConnectionLimits {
        *self.limits.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the limits. Connections held are never cut off: a smaller
    /// limit is reached as they leave. A source's share changes once the
    /// source has no connection waiting or authenticating.
    pub fn set_limits(&self, new: ConnectionLimits) {
        let mut limits = self.limits.lock().unwrap_or_else(PoisonError::into_inner);
        let old = *limits;
        crate::capacity::resize(&self.connections, old.max_connections, new.max_connections);
        crate::capacity::resize(
            &self.unauthenticated,
            old.max_unauthenticated,
            new.max_unauthenticated,
        );
        crate::capacity::resize(
            &self.waiting,
            old.max_unauthenticated,
            new.max_unauthenticated,
        );
        *limits = new;
    }

    fn source(&self, source: IpAddr) -> Arc<Semaphore> {
        let per_source = self.limits().max_unauthenticated_per_source;
        Arc::clone(
            self.sources()
                .entry(source)
                .or_insert_with(|| Arc::new(Semaphore::new(per_source))),
        )
    }

    /// Drops the entry of a source nobody holds a place of or waits for.
    fn forget_idle_source(&self, source: IpAddr) {
        let mut sources = self.sources();
        if sources
            .get(&source)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            sources.remove(&source);
        }
    }

    /// Lets a new connection from `source` in: with its places at once
    /// when they are free, else into the waiting queue, else refused.
    pub fn enter(self: &Arc<Self>, source: IpAddr) -> Result<Entry, Full> {
        let per_source = self.source(source);
        let places = Arc::clone(&per_source)
            .try_acquire_owned()
            .ok()
            .zip(Arc::clone(&self.unauthenticated).try_acquire_owned().ok());
        drop(per_source);
        let state = match places {
            Some(permits) => EntryState::Admitted(self.ticket(permits, source)?),
            None => {
                self.forget_idle_source(source);
                EntryState::Waiting(
                    Arc::clone(&self.waiting)
                        .try_acquire_owned()
                        .map_err(|_| Full::Unauthenticated)?,
                )
            }
        };
        Ok(Entry {
            budget: Arc::clone(self),
            source,
            state,
        })
    }

    /// A ticket with its unauthenticated places, taking its place in the
    /// total.
    fn ticket(
        self: &Arc<Self>,
        (source_place, place): (OwnedSemaphorePermit, OwnedSemaphorePermit),
        source: IpAddr,
    ) -> Result<Ticket, Full> {
        let pending = Pending {
            permits: Some((place, source_place)),
            _counted: self.pending.hold(),
            budget: Arc::clone(self),
            source,
        };
        let connection = Arc::clone(&self.connections)
            .try_acquire_owned()
            .map_err(|_| Full::Connections)?;
        Ok(Ticket {
            _connection: connection,
            _held: self.held.hold(),
            pending: Some(Box::new(pending)),
        })
    }

    /// Connections held now, and how many of them are authenticating.
    pub fn in_use(&self) -> (usize, usize) {
        (self.held.get(), self.pending.get())
    }
}

impl Entry {
    /// The connection's ticket: at once if it was admitted on entry, else
    /// once places come free, waiting at most until `deadline`.
    pub async fn admit(self, deadline: Instant) -> Result<Ticket, Full> {
        let Self {
            budget,
            source,
            state,
        } = self;
        let waiting = match state {
            EntryState::Admitted(ticket) => return Ok(ticket),
            EntryState::Waiting(waiting) => waiting,
        };
        let per_source = budget.source(source);
        let source_place = timeout_at(deadline, per_source.acquire_owned()).await;
        let result = match source_place {
            Ok(Ok(source_place)) => {
                let unauthenticated = Arc::clone(&budget.unauthenticated);
                match timeout_at(deadline, unauthenticated.acquire_owned()).await {
                    Ok(Ok(place)) => budget.ticket((source_place, place), source),
                    _ => Err(Full::Unauthenticated),
                }
            }
            _ => Err(Full::Source),
        };
        drop(waiting);
        if result.is_err() {
            budget.forget_idle_source(source);
        }
        result
    }
}

impl Ticket {
    /// The connection authenticated: it no longer counts against the
    /// unauthenticated budget.
    pub fn authenticated(&mut self) {
        self.pending = None;
    }

    /// Whether the connection has authenticated.
    pub fn is_authenticated(&self) -> bool {
        self.pending.is_none()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::time::Duration;

    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
    }

    fn budget(total: usize, unauthenticated: usize, per_source: usize) -> Arc<Budget> {
        Budget::new(ConnectionLimits {
            max_connections: total,
            max_unauthenticated: unauthenticated,
            max_unauthenticated_per_source: per_source,
        })
    }

    async fn admit(budget: &Arc<Budget>, source: u8, wait_ms: u64) -> Result<Ticket, Full> {
        let deadline = Instant::now() + Duration::from_millis(wait_ms);
        budget.enter(ip(source))?.admit(deadline).await
    }

    #[tokio::test(start_paused = true)]
    async fn one_source_holds_only_its_share_and_others_still_get_in() {
        let budget = budget(100, 4, 2);
        let _stalled: Vec<Ticket> = vec![
            admit(&budget, 1, 0).await.expect("first"),
            admit(&budget, 1, 0).await.expect("second"),
        ];
        assert_eq!(admit(&budget, 1, 1000).await.err(), Some(Full::Source));
        let mut other = admit(&budget, 2, 0).await.expect("another source");
        other.authenticated();
        assert!(other.is_authenticated());
        assert_eq!(budget.in_use(), (3, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_waits_for_places_instead_of_being_refused() {
        let budget = budget(100, 2, 2);
        let first = admit(&budget, 1, 0).await.expect("first");
        let second = admit(&budget, 1, 0).await.expect("second");
        let waiting = {
            let budget = Arc::clone(&budget);
            tokio::spawn(async move { admit(&budget, 1, 5000).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        let mut first = first;
        first.authenticated();
        assert!(
            waiting.await.expect("join").is_ok(),
            "let in once a place freed"
        );
        drop(second);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_connections_hold_no_place_and_their_queue_is_bounded() {
        let budget = budget(6, 2, 1);
        let _stalled = admit(&budget, 1, 0).await.expect("first");
        let queued: Vec<Entry> = (0..2)
            .map(|_| budget.enter(ip(1)).expect("queued"))
            .collect();
        assert_eq!(
            budget.enter(ip(1)).err(),
            Some(Full::Unauthenticated),
            "queue full"
        );
        assert_eq!(budget.in_use(), (1, 1), "the queued hold nothing");
        // Another source is let in at once, past the queue.
        assert!(admit(&budget, 2, 0).await.is_ok());
        drop(queued);
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_refuses_at_once_and_sources_are_forgotten() {
        let budget = budget(2, 2, 2);
        let mut held = Vec::new();
        for source in [1, 2] {
            let mut ticket = admit(&budget, source, 0).await.expect("room");
            ticket.authenticated();
            held.push(ticket);
        }
        assert_eq!(admit(&budget, 3, 0).await.err(), Some(Full::Connections));
        assert!(
            budget.sources().is_empty(),
            "no source waits or holds a place"
        );
        held.pop();
        assert!(admit(&budget, 3, 0).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn new_limits_apply_to_new_connections_and_spare_those_held() {
        let budget = budget(2, 2, 2);
        let mut held = Vec::new();
        for source in [1, 2] {
            let mut ticket = admit(&budget, source, 0).await.expect("room");
            ticket.authenticated();
            held.push(ticket);
        }
        budget.set_limits(ConnectionLimits {
            max_connections: 3,
            max_unauthenticated: 2,
            max_unauthenticated_per_source: 2,
        });
        let third = admit(&budget, 3, 0).await.expect("the raised limit");
        budget.set_limits(ConnectionLimits {
            max_connections: 1,
            max_unauthenticated: 2,
            max_unauthenticated_per_source: 2,
        });
        assert_eq!(budget.in_use().0, 3, "nobody held is cut off");
        drop(third);
        held.pop();
        tokio::task::yield_now().await;
        assert_eq!(admit(&budget, 4, 0).await.err(), Some(Full::Connections));
        held.pop();
        tokio::task::yield_now().await;
        assert!(
            admit(&budget, 4, 0).await.is_ok(),
            "room under the lowered limit"
        );
    }
}
