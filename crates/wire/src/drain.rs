//! Shutting down without cutting anyone off.
//!
//! ```text
//! Serving ─unready()─► Unready ─start()─► Draining ─force()─► Closing
//!          readiness false;      listeners stop;    the rest get
//!          still accepting       each client closed  57P01 now
//!          and serving (for      with 57P01 at its
//!          load balancers to     next idle
//!          notice)               transaction boundary
//! ```
//!
//! A client that logged in moments before the drain (within
//! [`FRESH_SESSION_GRACE`]) is given that long to run what it connected
//! for before it is closed: a connection-per-transaction client
//! (`pgbench -C`, a serverless function) caught mid-login completes its
//! transaction instead of failing.
//!
//! Every client connection, on every listener, runs as a task of the one
//! [`Drain`], so the process knows when the last one is gone
//! ([`Drain::wait_clients`]). Listeners learn of the phases through
//! [`Drain::draining`] and [`Drain::closing`]; each client connection is
//! told through its entry in the client registry the drain keeps
//! ([`crate::clients::ClientHandle::draining`], `closing`), which costs it
//! no waiter list. The policy (how long to wait before forcing) is the
//! caller's.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clients::Clients;

/// How long after its login a session is spared by a drain.
pub const FRESH_SESSION_GRACE: Duration = Duration::from_secs(1);

/// The shutdown state every listener and session shares.
#[derive(Debug, Default)]
pub struct Drain {
    unready: CancellationToken,
    draining: CancellationToken,
    closing: CancellationToken,
    clients: TaskTracker,
    /// The connections to tell.
    registry: Arc<Clients>,
}

impl Drain {
    /// Announces the drain (readiness turns false) without changing how
    /// clients are served yet.
    pub fn unready(&self) {
        self.unready.cancel();
    }

    /// Starts draining: listeners stop accepting, idle clients are closed
    /// at their next transaction boundary.
    pub fn start(&self) {
        self.unready();
        self.draining.cancel();
        self.registry.drain_all();
        self.clients.close();
    }

    /// Whether the drain has been announced (or has started).
    pub fn is_unready(&self) -> bool {
        self.unready.is_cancelled()
    }

    /// Stops waiting: every client left is closed now.
    pub fn force(&self) {
        self.start();
        self.closing.cancel();
        self.registry.close_all();
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Completes when a drain starts (at once if it has).
    pub fn draining(&self) -> impl Future<Output = ()> + Send + '_ {
        self.draining.cancelled()
    }

    /// The client registry whose connections it tells.
    pub(crate) fn registry(&self) -> &Arc<Clients> {
        &self.registry
    }

    /// Completes when the drain is forced (at once if it was).
    pub fn closing(&self) -> impl Future<Output = ()> + Send + '_ {
        self.closing.cancelled()
    }

    /// Runs a client connection's task, counted until it ends.
    pub fn spawn_client<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.clients.spawn(task);
    }

    /// Client connections still open.
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// Completes when a drain has started and every client task has ended.
    pub fn wait_clients(&self) -> impl Future<Output = ()> + Send + '_ {
        self.clients.wait()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_clients_and_forcing_reaches_them() {
        let drain = Arc::new(Drain::default());
        for _ in 0..3 {
            let drain2 = Arc::clone(&drain);
            drain.spawn_client(async move {
                drain2.draining().await;
                drain2.closing().await;
            });
        }
        assert_eq!(drain.clients(), 3);
        drain.unready();
        assert!(drain.is_unready() && !drain.is_draining());
        drain.start();
        assert!(drain.is_draining());
        assert!(
            tokio::time::timeout(Duration::from_secs(5), drain.wait_clients())
                .await
                .is_err(),
            "clients that wait for closing are still there"
        );
        drain.force();
        tokio::time::timeout(Duration::from_secs(1), drain.wait_clients())
            .await
            .expect("all gone once forced");
        assert_eq!(drain.clients(), 0);
    }
}
