//! Fair waiting for a saturated pool slot: identities take turns.
//!
//! A slot's connections are handed out by a FIFO semaphore, so alone it
//! serves requests in arrival order: a user with 200 requests queued ahead
//! of a user with one makes that one wait for all 200. Here each identity
//! (a [`Fairness`] key) has a turnstile, a semaphore of one, in front of
//! the slot's queue: only the identity's first waiter queues for a
//! connection, the rest wait at its turnstile, and the next one steps into
//! the slot's queue (at its back) once the one ahead got a connection. So
//! the slot serves the waiting identities round-robin, and one waiting
//! request of a light user waits behind at most one request of each other
//! identity.
//!
//! Only a checkout that found no free connection comes here (the fast path
//! takes no turnstile and no lock). A turnstile exists only while someone
//! of its identity waits: the map holds waiting identities, no more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};

/// Who a waiting checkout is, for taking turns: the user (`auth.user_id()`)
/// of an authenticated client, the client's address for an anonymous one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fairness<'a>(&'a str);

impl<'a> Fairness<'a> {
    /// The turn-taking key `key`.
    pub fn new(key: &'a str) -> Self {
        Self(key)
    }
}

/// The turnstiles of one slot, by identity.
#[derive(Debug, Default)]
pub(super) struct Turnstiles {
    waiting: Mutex<HashMap<Box<str>, Arc<Semaphore>>>,
}

impl Turnstiles {
    /// A permit of `permits` for `who`, after `who`'s earlier waiters got
    /// theirs. Cancel-safe: a waiter dropped (its checkout timed out)
    /// leaves its place to the next.
    pub(super) async fn acquire(
        &self,
        who: Fairness<'_>,
        permits: Arc<Semaphore>,
    ) -> Result<OwnedSemaphorePermit, AcquireError> {
        let entry = Entry::enter(self, who.0);
        let turn = entry.turnstile().acquire().await?;
        let permit = permits.acquire_owned().await;
        // The next waiter of this identity queues now, behind everyone
        // already in the slot's queue.
        drop(turn);
        drop(entry);
        permit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, Arc<Semaphore>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Identities with someone waiting (tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// One waiter's hold on its identity's turnstile. Every clone of a
/// turnstile is made and dropped under the map's lock, so the last waiter
/// out removes it.
struct Entry<'t> {
    turnstiles: &'t Turnstiles,
    key: &'t str,
    turnstile: Option<Arc<Semaphore>>,
}

impl<'t> Entry<'t> {
    fn enter(turnstiles: &'t Turnstiles, key: &'t str) -> Self {
        let mut waiting = turnstiles.lock();
        let turnstile = match waiting.get(key) {
            Some(turnstile) => Arc::clone(turnstile),
            None => {
                let turnstile = Arc::new(Semaphore::new(1));
                waiting.insert(key.into(), Arc::clone(&turnstile));
                turnstile
            }
        };
        Self {
            turnstiles,
            key,
            turnstile: Some(turnstile),
        }
    }

    fn turnstile(&self) -> &Semaphore {
        #[allow(
            clippy::expect_used,
            reason = "an Entry holds its turnstile until dropped"
        )]
        self.turnstile.as_ref().expect("held until drop")
    }
}

impl Drop for Entry<'_> {
    fn drop(&mut self) {
        let mut waiting = self.turnstiles.lock();
        drop(self.turnstile.take());
        if waiting
            .get(self.key)
            .is_some_and(|turnstile| Arc::strong_count(turnstile) == 1)
        {
            waiting.remove(self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used, reason = "test code: a panic is a failing test")]

    use super::*;

    use std::time::Duration;

    /// Order in which waiters got a permit.
    type Served = Arc<Mutex<Vec<String>>>;

    fn waiter(
        turnstiles: &Arc<Turnstiles>,
        permits: &Arc<Semaphore>,
        served: &Served,
        who: &str,
        n: usize,
    ) -> tokio::task::JoinHandle<()> {
        let (turnstiles, permits, served) = (
            Arc::clone(turnstiles),
            Arc::clone(permits),
            Arc::clone(served),
        );
        let who = who.to_owned();
        tokio::spawn(async move {
            let permit = turnstiles
                .acquire(Fairness::new(&who), permits)
                .await
                .expect("open");
            served.lock().expect("lock").push(format!("{who}{n}"));
            tokio::task::yield_now().await;
            drop(permit);
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_light_user_is_served_after_one_request_of_a_heavy_one_not_all() {
        let turnstiles = Arc::new(Turnstiles::default());
        let permits = Arc::new(Semaphore::new(1));
        let held = Arc::clone(&permits).acquire_owned().await.expect("held");
        let served = Served::default();
        let mut tasks = Vec::new();
        for n in 0..20 {
            tasks.push(waiter(&turnstiles, &permits, &served, "heavy", n));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tasks.push(waiter(&turnstiles, &permits, &served, "light", 0));
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(turnstiles.len(), 2);
        drop(held);
        for task in tasks {
            task.await.expect("task");
        }
        let served = served.lock().expect("lock").clone();
        let light = served.iter().position(|w| w == "light0").expect("served");
        assert!(light <= 1, "the light user waited for {light}: {served:?}");
        // The heavy user's own requests keep their order.
        let heavy: Vec<_> = served.iter().filter(|w| w.starts_with("heavy")).collect();
        let expected: Vec<_> = (0..20).map(|n| format!("heavy{n}")).collect();
        assert_eq!(heavy, expected.iter().collect::<Vec<_>>());
        assert_eq!(turnstiles.len(), 0, "no turnstile outlives its waiters");
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_leaves_its_turn_to_the_next() {
        let turnstiles = Arc::new(Turnstiles::default());
        let permits = Arc::new(Semaphore::new(1));
        let held = Arc::clone(&permits).acquire_owned().await.expect("held");
        let first = {
            let (t, p) = (Arc::clone(&turnstiles), Arc::clone(&permits));
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_millis(10), t.acquire(Fairness::new("a"), p))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        let served = Served::default();
        let second = waiter(&turnstiles, &permits, &served, "a", 1);
        assert!(first.await.expect("task").is_err(), "the first timed out");
        drop(held);
        second.await.expect("the second got its turn");
        assert_eq!(*served.lock().expect("lock"), ["a1"]);
        assert_eq!(turnstiles.len(), 0);
    }
}
