//! What the console reads from and does to a pool: every server
//! connection with what it is doing (`SHOW SERVERS`), `RECONNECT`
//! (replace every connection of a database as it comes free) and the
//! waits of `PAUSE` and `WAIT_CLOSE`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Slot, UpstreamPool};
use crate::upstream::Upstream;

/// How often the console's waits look again.
const POLL: Duration = Duration::from_millis(20);

/// A connection checked out.
#[derive(Debug, Clone, Copy)]
struct Active {
    pid: i32,
    created: Instant,
    since: Instant,
    /// The pool id of the client using it.
    client: u64,
}

/// A slot's checked-out connections, each at a place that stays its own
/// until it is removed (a free place is used again), so listing and
/// removing one costs no allocation and no hashing.
#[derive(Debug, Default)]
pub(super) struct ActiveList {
    places: Vec<Option<Active>>,
    free: Vec<usize>,
}

impl ActiveList {
    /// Lists `conn`, created at `created`, checked out at `now` by
    /// `client`; returns its place.
    pub(super) fn insert(
        &mut self,
        conn: &Upstream,
        (created, now): (Instant, Instant),
        client: u64,
    ) -> usize {
        let active = Active {
            pid: conn.pid(),
            created,
            since: now,
            client,
        };
        match self.free.pop() {
            Some(at) => {
                if let Some(place) = self.places.get_mut(at) {
                    *place = Some(active);
                }
                at
            }
            None => {
                self.places.push(Some(active));
                self.places.len() - 1
            }
        }
    }

    /// Takes the connection at `at` off the list.
    pub(super) fn remove(&mut self, at: usize) {
        if let Some(place) = self.places.get_mut(at).filter(|place| place.is_some()) {
            *place = None;
            self.free.push(at);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Active> {
        self.places.iter().flatten()
    }

    fn len(&self) -> usize {
        self.places.len() - self.free.len()
    }
}

/// One server connection, as `SHOW SERVERS` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServerInfo {
    /// Which pool (`wire` or `http`).
    pub pool: &'static str,
    /// The backend's process id.
    pub pid: i32,
    /// The database.
    pub database: String,
    /// The role it is logged in as.
    pub role: String,
    /// `active` (checked out) or `idle`.
    pub state: &'static str,
    /// When it logged in.
    #[serde(skip)]
    pub connected: SystemTime,
    /// When it was last checked out or returned.
    #[serde(skip)]
    pub since: SystemTime,
    /// The pool id of the client using it (linked to `SHOW CLIENTS`).
    pub client: Option<u64>,
    /// The server's address.
    pub addr: String,
    /// Whether the connection is encrypted.
    pub tls: bool,
}

/// Wall-clock time of a monotonic instant in the past.
fn wall(at: Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(at.elapsed())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

impl UpstreamPool {
    /// Every server connection now, active ones first.
    pub fn servers(&self) -> Vec<ServerInfo> {
        let address = self.config.address();
        let tls = !matches!(self.config.tls, crate::transport::UpstreamTls::Disable);
        let info = |pid, slot: &Slot, state, created, since, client| ServerInfo {
            pool: self.name,
            pid,
            database: slot.database.clone(),
            role: slot.role.clone(),
            state,
            connected: wall(created),
            since: wall(since),
            client,
            addr: address.clone(),
            tls,
        };
        let mut servers = Vec::new();
        let mut idle = Vec::new();
        for slot in self.slots() {
            let connections = slot.connections();
            servers.extend(
                connections
                    .active
                    .iter()
                    .map(|a| info(a.pid, &slot, "active", a.created, a.since, Some(a.client))),
            );
            idle.extend(
                connections
                    .idle
                    .iter()
                    .map(|i| info(i.conn.pid(), &slot, "idle", i.created, i.since, None)),
            );
        }
        servers.append(&mut idle);
        servers
    }

    /// Closes the idle connections of `database` (`None`: of all) now and
    /// every active one as it is returned: the next checkouts log in
    /// anew (after a password or server change). Returns how many it
    /// closed now.
    pub fn reconnect(&self, database: Option<&str>) -> usize {
        let now = Instant::now();
        let mut closed = 0;
        for slot in self.slots_of(database) {
            let mut connections = slot.connections();
            connections.retire_before = Some(now);
            closed += connections.idle.len();
            connections.idle.clear();
            drop(connections);
            slot.recall_kept();
        }
        closed
    }

    /// Connections of `database` (`None`: of all) checked out now.
    pub fn in_use(&self, database: Option<&str>) -> usize {
        (self.slots_of(database).iter())
            .map(|slot| slot.connections().active.len())
            .sum()
    }

    /// Active connections of `database` (`None`: of all) that a
    /// `RECONNECT` retired and that are still out.
    fn retired_in_use(&self, database: Option<&str>) -> usize {
        (self.slots_of(database).iter())
            .map(|slot| {
                let connections = slot.connections();
                (connections.active.iter())
                    .filter(|a| Slot::retired(&connections, a.created))
                    .count()
            })
            .sum()
    }

    /// The slots of `database` (`None`: every slot), taken from the map so
    /// that each is then locked on its own.
    pub(super) fn slots_of(&self, database: Option<&str>) -> Vec<Arc<Slot>> {
        let state = self.state();
        state
            .slots()
            .filter(|slot| database.is_none_or(|d| d == slot.database))
            .cloned()
            .collect()
    }

    /// Every slot (see [`UpstreamPool::slots_of`]).
    fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots_of(None)
    }

    /// Waits until no connection of `database` (`None`: of any) is
    /// checked out, or until `deadline`; returns how many still are.
    pub async fn wait_idle(&self, database: Option<&str>, deadline: Instant) -> usize {
        wait(|| self.in_use(database), deadline).await
    }

    /// Waits until every connection a `RECONNECT` retired is closed, or
    /// until `deadline`; returns how many are still out.
    pub async fn wait_closed(&self, database: Option<&str>, deadline: Instant) -> usize {
        wait(|| self.retired_in_use(database), deadline).await
    }
}

/// Polls `left` until it is zero or `deadline` passes; returns its last
/// value.
async fn wait(left: impl Fn() -> usize, deadline: Instant) -> usize {
    loop {
        let now = left();
        if now == 0 || Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(POLL).await;
    }
}
