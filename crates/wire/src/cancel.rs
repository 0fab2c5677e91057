//! Cancel keys: the proxy hands clients its own random (pid, key) and maps
//! them to the upstream backend's, which never leave the proxy.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Where a client's cancel request must go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamKey {
    /// Upstream backend pid.
    pub pid: i32,
    /// Upstream backend secret key.
    pub secret_key: i32,
}

/// Live sessions by the cancel key their client was given.
#[derive(Default, Clone)]
pub struct CancelRegistry {
    sessions: Arc<Mutex<HashMap<i32, (i32, UpstreamKey)>>>,
}

impl CancelRegistry {
    /// Registers a session under a fresh random (pid, key); the entry is
    /// removed when the returned guard drops.
    pub fn register(&self, upstream: UpstreamKey, random: &mut impl FnMut() -> u64) -> CancelGuard {
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            let bits = random();
            // Positive pids, as Postgres hands out, so clients print them sanely.
            let pid = ((bits >> 32) as i32) & i32::MAX;
            let key = bits as i32;
            if pid != 0 && !sessions.contains_key(&pid) {
                sessions.insert(pid, (key, upstream));
                return CancelGuard {
                    registry: self.clone(),
                    pid,
                    key,
                };
            }
        }
    }

    /// The upstream key for a client's (pid, key), if both match a session.
    pub fn lookup(&self, pid: i32, key: i32) -> Option<UpstreamKey> {
        let sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        match sessions.get(&pid) {
            Some((expected, upstream)) if *expected == key => Some(*upstream),
            _ => None,
        }
    }
}

/// Keeps a session's cancel entry alive.
pub struct CancelGuard {
    registry: CancelRegistry,
    /// The pid the client sees.
    pub pid: i32,
    /// The key the client sees.
    pub key: i32,
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

    #[test]
    fn maps_only_the_exact_key_and_forgets_on_drop() {
        let registry = CancelRegistry::default();
        let upstream = UpstreamKey {
            pid: 100,
            secret_key: 5,
        };
        let mut values = [0x0000_0007_0000_0009u64].into_iter();
        let guard = registry.register(upstream, &mut || values.next().unwrap_or(1));
        assert_eq!((guard.pid, guard.key), (7, 9));
        assert_eq!(registry.lookup(7, 9), Some(upstream));
        assert_eq!(registry.lookup(7, 10), None);
        assert_eq!(registry.lookup(100, 5), None);
        drop(guard);
        assert_eq!(registry.lookup(7, 9), None);
    }
}
