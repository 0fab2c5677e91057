//! Cancel keys: the proxy hands clients its own random (pid, key) and maps
//! them to the upstream backend's, which never leave the proxy.
//!
//! In transaction pooling a client's backend changes from one transaction to
//! the next, and between transactions it has none: the session retargets
//! its entry as it takes and releases connections. A cancel is forwarded
//! while holding the entry, and a session waits for that before releasing
//! its connection, so a cancel never reaches a backend that has moved on to
//! another client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use crate::upstream::UpstreamKey;

/// The backend currently serving a client, if any.
pub(crate) type Target = Arc<tokio::sync::Mutex<Option<UpstreamKey>>>;

/// Live sessions by the pid their client was given: its key and target.
type Sessions = HashMap<i32, ([u8; 4], Target)>;

/// Live sessions by the cancel key their client was given.
#[derive(Default, Clone)]
pub(crate) struct CancelRegistry {
    sessions: Arc<Mutex<Sessions>>,
}

impl CancelRegistry {
    /// Registers a session under a fresh random (pid, key), serving from
    /// `upstream`; the entry is removed when the returned guard drops.
    pub(crate) fn register(
        &self,
        upstream: Option<UpstreamKey>,
        random: &mut impl FnMut() -> u64,
    ) -> CancelGuard {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        let target = Arc::new(tokio::sync::Mutex::new(upstream));
        loop {
            let [a, b, c, d, e, f, g, h] = random().to_be_bytes();
            // Positive pids, as Postgres hands out, so clients print them sanely.
            let pid = i32::from_be_bytes([a, b, c, d]) & i32::MAX;
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

    /// The target of the session with this exact (pid, key). Hold its lock
    /// while forwarding the cancel.
    pub(crate) fn lookup(&self, pid: i32, key: &[u8]) -> Option<Target> {
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
    target: Target,
    /// The pid the client sees.
    pub(crate) pid: i32,
    /// The key the client sees.
    pub(crate) key: [u8; 4],
}

impl CancelGuard {
    /// Points the client's cancel key at `upstream` (or at nothing); waits
    /// for a cancel being forwarded to the old target to finish first.
    pub(crate) async fn retarget(&self, upstream: Option<UpstreamKey>) {
        *self.target.lock().await = upstream;
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
            Some(target) => target.lock().await.clone(),
            None => None,
        }
    }

    fn upstream() -> UpstreamKey {
        UpstreamKey {
            pid: 100,
            secret: Arc::from(&5i32.to_be_bytes()[..]),
        }
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
        let forwarding = target.lock().await;
        let mut retarget = Box::pin(guard.retarget(None));
        assert!(futures_now(&mut retarget).is_none(), "did not wait");
        drop(forwarding);
        retarget.await;
        assert_eq!(*target.lock().await, None);
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
