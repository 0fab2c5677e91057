//! What operators hold shut from the console: `PAUSE` (no new checkouts
//! of a database, or of all, until `RESUME`: what runs finishes, what
//! comes waits) and `DISABLE` (no new logins to a database until
//! `ENABLE`). Every pool and every login checks the same gates; with
//! nothing shut, a check is one atomic load.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use tokio::sync::Notify;
use tokio::time::{Instant, timeout_at};

/// The gates of one proxy.
#[derive(Debug, Default)]
pub struct Gates {
    /// Whether anything is shut: the fast path's one load.
    any: AtomicBool,
    state: Mutex<Shut>,
    /// Woken when a pause ends.
    resumed: Notify,
}

#[derive(Debug, Default)]
struct Shut {
    paused_all: bool,
    paused: BTreeSet<String>,
    disabled: BTreeSet<String>,
}

impl Shut {
    fn any(&self) -> bool {
        self.paused_all || !self.paused.is_empty() || !self.disabled.is_empty()
    }

    fn paused(&self, database: &str) -> bool {
        self.paused_all || self.paused.contains(database)
    }
}

impl Gates {
    fn change<T>(&self, change: impl FnOnce(&mut Shut) -> T) -> T {
        let mut shut = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let result = change(&mut shut);
        self.any.store(shut.any(), Ordering::Release);
        result
    }

    fn read<T>(&self, read: impl FnOnce(&Shut) -> T) -> T {
        read(&self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Holds new checkouts of `database` (`None`: of every database).
    pub fn pause(&self, database: Option<&str>) {
        self.change(|shut| match database {
            Some(database) => {
                shut.paused.insert(database.to_owned());
            }
            None => shut.paused_all = true,
        });
    }

    /// Lets checkouts of `database` (`None`: of every database) go on;
    /// false when it was not paused.
    pub fn resume(&self, database: Option<&str>) -> bool {
        let resumed = self.change(|shut| match database {
            Some(database) => shut.paused.remove(database),
            None => {
                let was = shut.paused_all || !shut.paused.is_empty();
                shut.paused_all = false;
                shut.paused.clear();
                was
            }
        });
        self.resumed.notify_waiters();
        resumed
    }

    /// Whether checkouts of `database` are held.
    pub fn is_paused(&self, database: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.read(|shut| shut.paused(database))
    }

    /// Waits until `database` is not paused; false if it still is at
    /// `deadline`.
    pub async fn wait_open(&self, database: &str, deadline: Instant) -> bool {
        loop {
            let resumed = self.resumed.notified();
            tokio::pin!(resumed);
            resumed.as_mut().enable();
            if !self.is_paused(database) {
                return true;
            }
            if timeout_at(deadline, resumed).await.is_err() {
                return !self.is_paused(database);
            }
        }
    }

    /// Refuses new logins to `database`.
    pub fn disable(&self, database: &str) {
        self.change(|shut| shut.disabled.insert(database.to_owned()));
    }

    /// Accepts new logins to `database` again; false when it was not
    /// disabled.
    pub fn enable(&self, database: &str) -> bool {
        self.change(|shut| shut.disabled.remove(database))
    }

    /// Whether new logins to `database` are refused.
    pub fn is_disabled(&self, database: &str) -> bool {
        self.any.load(Ordering::Acquire) && self.read(|shut| shut.disabled.contains(database))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn a_paused_database_holds_its_checkouts_until_resumed() {
        let gates = Arc::new(Gates::default());
        gates.pause(Some("app"));
        assert!(gates.is_paused("app") && !gates.is_paused("other"));
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(!gates.wait_open("app", soon).await, "still paused");
        let waiter = {
            let gates = Arc::clone(&gates);
            tokio::spawn(async move {
                gates
                    .wait_open("app", Instant::now() + Duration::from_secs(5))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(gates.resume(Some("app")));
        assert!(waiter.await.expect("waiter"));
        assert!(!gates.resume(Some("app")), "not paused any more");
    }

    #[test]
    fn pausing_everything_and_disabling_are_separate() {
        let gates = Gates::default();
        gates.pause(None);
        gates.disable("app");
        assert!(gates.is_paused("any") && gates.is_disabled("app"));
        assert!(gates.resume(None));
        assert!(!gates.is_paused("any") && gates.is_disabled("app"));
        assert!(gates.enable("app") && !gates.is_disabled("app"));
    }
}
