//! Which idle connection a checkout takes: a pure function of the idle
//! list, the client asking and the time, so the policy is tested without
//! sockets or a clock.

use std::time::Instant;

use crate::config::PoolLimits;
use crate::upstream::Owner;

/// What the choice looks at in an idle connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Candidate {
    /// Whose session state it holds.
    pub(crate) owner: Owner,
    /// When it logged in.
    pub(crate) created: Instant,
    /// Since when it has been idle.
    pub(crate) since: Instant,
}

impl Candidate {
    /// Whether it must be closed at `now` rather than reused.
    pub(crate) fn expired(&self, limits: &PoolLimits, now: Instant) -> bool {
        self.verdict(limits, now) == Verdict::Close
    }

    /// Whether it is closed, checked first or handed out as it is, at
    /// `now`: one subtraction per instant it looks at (each costs a
    /// normalisation in std).
    pub(crate) fn verdict(&self, limits: &PoolLimits, now: Instant) -> Verdict {
        let idle = now.duration_since(self.since);
        if idle >= limits.idle_timeout || now.duration_since(self.created) >= limits.server_lifetime
        {
            Verdict::Close
        } else if idle >= limits.health_check_after {
            Verdict::Check
        } else {
            Verdict::Use
        }
    }
}

/// What becomes of an idle connection a checkout picked
/// ([`Candidate::verdict`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Past its idle timeout or lifetime: closed.
    Close,
    /// Idle long enough to answer a health check first.
    Check,
    /// Handed out as it is.
    Use,
}

/// What the choice needs of an idle connection: whose session it holds.
pub(crate) trait Owned {
    /// The owner of the session it holds.
    fn owner(&self) -> Owner;
}

impl Owned for Candidate {
    fn owner(&self) -> Owner {
        self.owner
    }
}

/// The idle connection (index into `idle`, oldest first) a checkout for
/// `client` takes, most preferred first: one holding `client`'s own
/// session; one holding a session exactly like it (`same`, see
/// `upstream::shape`: no reset, no attach); a clean one; one whose client
/// has left; none while the pool `may_grow` (a new login beats taking
/// over a session); else the one idle longest, whose client is the least
/// likely to be back soon.
pub(crate) fn pick<T: Owned>(
    idle: &[T],
    client: u64,
    same: impl Fn(&T) -> bool,
    may_grow: bool,
) -> Option<usize> {
    let with = |owner: Owner| idle.iter().rposition(|c| c.owner() == owner);
    with(Owner::Client(client))
        .or_else(|| idle.iter().rposition(&same))
        .or_else(|| with(Owner::Nobody))
        .or_else(|| with(Owner::Unknown))
        .or_else(|| (!may_grow && !idle.is_empty()).then_some(0))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(base: Instant, owner: Owner, idle_since_secs: u64) -> Candidate {
        Candidate {
            owner,
            created: base,
            since: base + Duration::from_secs(idle_since_secs),
        }
    }

    #[test]
    fn own_then_clean_then_orphaned_then_grow_then_the_longest_idle() {
        let base = Instant::now();
        let idle = [
            at(base, Owner::Client(2), 0),
            at(base, Owner::Unknown, 1),
            at(base, Owner::Nobody, 2),
            at(base, Owner::Client(1), 3),
        ];
        let none = |_: &Candidate| false;
        assert_eq!(pick(&idle, 1, none, true), Some(3));
        assert_eq!(pick(&idle, 9, none, true), Some(2));
        assert_eq!(pick(&idle[..2], 9, none, true), Some(1));
        assert_eq!(
            pick(&idle[..1], 9, none, true),
            None,
            "grow rather than take over"
        );
        assert_eq!(pick(&idle[..1], 9, none, false), Some(0));
        assert_eq!(pick::<Candidate>(&[], 9, none, false), None);
        // A session exactly like the client's beats a clean connection,
        // but not the client's own.
        let like_client_2 = |c: &Candidate| c.owner == Owner::Client(2);
        assert_eq!(pick(&idle, 9, like_client_2, true), Some(0));
        assert_eq!(pick(&idle, 1, like_client_2, true), Some(3));
    }

    #[test]
    fn expiry_and_health_checks_follow_the_given_time() {
        let base = Instant::now();
        let limits = PoolLimits {
            idle_timeout: Duration::from_secs(60),
            server_lifetime: Duration::from_secs(600),
            health_check_after: Duration::from_secs(30),
            ..PoolLimits::default()
        };
        let idle = at(base, Owner::Nobody, 0);
        let later = |secs| base + Duration::from_secs(secs);
        assert!(!idle.expired(&limits, later(59)) && idle.expired(&limits, later(60)));
        assert_eq!(idle.verdict(&limits, later(29)), Verdict::Use);
        assert_eq!(idle.verdict(&limits, later(30)), Verdict::Check);
        assert_eq!(idle.verdict(&limits, later(59)), Verdict::Check);
        assert_eq!(idle.verdict(&limits, later(60)), Verdict::Close);
        let old = at(base, Owner::Nobody, 590);
        assert!(!old.expired(&limits, later(599)) && old.expired(&limits, later(600)));
        assert_eq!(old.verdict(&limits, later(599)), Verdict::Use);
        assert_eq!(old.verdict(&limits, later(600)), Verdict::Close);
    }
}
