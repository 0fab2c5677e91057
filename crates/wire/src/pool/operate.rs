//! What the console reads from and does to a pool: every server
//! connection with what it is doing (`SHOW SERVERS`), `RECONNECT`
//! (replace every connection of a database as it comes free) and the
//! waits of `PAUSE` and `WAIT_CLOSE`.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::{Key, State, UpstreamPool};
use crate::upstream::Upstream;

/// The serial of a [`super::Pooled`] whose release took it off the list.
pub(super) const RELEASED: u64 = 0;

/// How often the console's waits look again.
const POLL: Duration = Duration::from_millis(20);

/// A connection checked out.
#[derive(Debug, Clone)]
pub(super) struct Active {
    pid: i32,
    key: Key,
    created: Instant,
    since: Instant,
    /// The pool id of the client using it.
    client: u64,
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

/// Whether a connection of `database` created at `created` was retired by
/// a `RECONNECT`.
pub(super) fn retired(state: &State, database: &str, created: Instant) -> bool {
    let before = |key: Option<String>| {
        state
            .retire_before
            .get(&key)
            .is_some_and(|&at| created < at)
    };
    before(None) || before(Some(database.to_owned()))
}

/// Wall-clock time of a monotonic instant in the past.
fn wall(at: Instant) -> SystemTime {
    SystemTime::now()
        .checked_sub(at.elapsed())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

impl UpstreamPool {
    /// Lists `conn` among the active connections; returns its serial.
    pub(super) fn activate(
        &self,
        conn: &Upstream,
        key: &Key,
        created: Instant,
        client: u64,
    ) -> u64 {
        let mut state = self.state();
        state.next_serial += 1;
        let serial = state.next_serial;
        let active = Active {
            pid: conn.pid(),
            key: key.clone(),
            created,
            since: Instant::now(),
            client,
        };
        state.active.insert(serial, active);
        serial
    }

    /// Takes connection `serial` off the active list.
    pub(super) fn deactivate(&self, serial: u64) {
        self.state().active.remove(&serial);
    }

    /// Every server connection now, active ones first.
    pub fn servers(&self) -> Vec<ServerInfo> {
        let address = self.config.address();
        let tls = !matches!(self.config.tls, crate::transport::UpstreamTls::Disable);
        let info = |pid, key: &Key, state, created, since, client| ServerInfo {
            pool: self.name,
            pid,
            database: key.0.clone(),
            role: key.1.clone(),
            state,
            connected: wall(created),
            since: wall(since),
            client,
            addr: address.clone(),
            tls,
        };
        let state = self.state();
        let mut servers: Vec<ServerInfo> = state
            .active
            .values()
            .map(|a| info(a.pid, &a.key, "active", a.created, a.since, Some(a.client)))
            .collect();
        for (key, slot) in &state.slots {
            for idle in &slot.idle {
                let pid = idle.conn.pid();
                servers.push(info(pid, key, "idle", idle.created, idle.since, None));
            }
        }
        servers
    }

    /// Closes the idle connections of `database` (`None`: of all) now and
    /// every active one as it is returned: the next checkouts log in
    /// anew (after a password or server change). Returns how many it
    /// closed now.
    pub fn reconnect(&self, database: Option<&str>) -> usize {
        let mut state = self.state();
        state
            .retire_before
            .insert(database.map(str::to_owned), Instant::now());
        let mut closed = 0;
        for (key, slot) in &mut state.slots {
            if database.is_none_or(|d| d == key.0) {
                closed += slot.idle.len();
                slot.idle.clear();
            }
        }
        closed
    }

    /// Connections of `database` (`None`: of all) checked out now.
    pub fn in_use(&self, database: Option<&str>) -> usize {
        self.state()
            .active
            .values()
            .filter(|a| database.is_none_or(|d| d == a.key.0))
            .count()
    }

    /// Active connections of `database` (`None`: of all) that a
    /// `RECONNECT` retired and that are still out.
    fn retired_in_use(&self, database: Option<&str>) -> usize {
        let state = self.state();
        state
            .active
            .values()
            .filter(|a| database.is_none_or(|d| d == a.key.0))
            .filter(|a| retired(&state, &a.key.0, a.created))
            .count()
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
