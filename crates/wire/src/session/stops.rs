//! What stops a session's relay from outside it, looked at beside the
//! relay on every wake: one load of the client's told flags while nothing
//! is told, not a future per stop (a session's task is woken twice a
//! transaction, and three futures polled each time were a tenth of the
//! relay's cost).
//!
//! A kill (`KILL_CLIENT`, a forced drain) stops the relay now. A drain,
//! once a freshly logged-in session's grace is over, and an enforced token
//! expiry stop it at its next idle transaction boundary.

use std::future::Future as _;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use tokio::time::{Instant, Sleep};

use crate::clients::ClientHandle;
use crate::relay::Heed;

/// Why a relay was asked to stop at an idle boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Boundary {
    /// The token expired (`enforce_token_expiry`).
    TokenExpired,
    /// The proxy drains for shutdown.
    Draining,
}

/// The stops of one relayed stretch of a session.
pub(super) struct Stops<'a> {
    registered: &'a ClientHandle,
    /// Until when a drain spares the session (a fresh login's grace).
    spared_until: Instant,
    /// The token's enforced expiry. Boxed, and made only when enforced:
    /// every idle session holds this.
    expiry: Option<Pin<Box<Sleep>>>,
    /// The rest of the grace, made once a drain begins within it.
    grace: Option<Pin<Box<Sleep>>>,
    /// The idle-boundary stop asked for, once one is.
    asked: Option<Boundary>,
}

impl<'a> Stops<'a> {
    /// The stops of a session registered as `registered`, spared by a
    /// drain until `spared_until`, whose token's expiry is enforced at
    /// `expires`.
    pub(super) fn new(
        registered: &'a ClientHandle,
        spared_until: Instant,
        expires: Option<SystemTime>,
    ) -> Self {
        Self {
            registered,
            spared_until,
            expiry: expiry_timer(expires),
            grace: None,
            asked: None,
        }
    }

    /// The idle-boundary stop asked for so far, if any.
    pub(super) fn asked(&self) -> Option<Boundary> {
        self.asked
    }

    /// Whether a drain has begun and the session's grace is over, as of
    /// `now`: where a drain closes it at its next idle boundary.
    pub(super) fn drain_reached(&self, now: Instant) -> bool {
        self.registered.is_draining() && now >= self.spared_until
    }

    /// Whether any stop is due as of `now`, with the token's enforced
    /// expiry at `expires` (the stops keep only its timer): what
    /// [`Stops::poll`] would say, were it polled at this very moment.
    pub(super) fn due(&self, now: Instant, expires: Option<SystemTime>) -> bool {
        self.registered.is_closing()
            || expires.is_some_and(|at| SystemTime::now() >= at)
            || self.drain_reached(now)
    }

    /// `Ready(Heed::Now)` once the session must stop now;
    /// `Ready(Heed::AtIdle)` once (and only once) it must stop at its next
    /// idle boundary; otherwise the task is woken when either may have
    /// changed.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Heed> {
        let listening_for_drain = self.asked.is_none();
        let mut told = self.registered.poll_told(listening_for_drain, cx);
        let draining = matches!(told, Poll::Ready(told) if !told.close());
        if draining {
            // Listen for a kill from here on: a `Ready` registered nothing.
            told = self.registered.poll_told(false, cx);
        }
        if let Poll::Ready(told) = told
            && told.close()
        {
            return Poll::Ready(Heed::Now);
        }
        // An expired token is named before a drain when both are due.
        if listening_for_drain
            && let Some(expiry) = self.expiry.as_mut()
            && expiry.as_mut().poll(cx).is_ready()
        {
            return self.ask(Boundary::TokenExpired);
        }
        if draining {
            let spared_until = self.spared_until;
            let grace = self
                .grace
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(spared_until)));
            if grace.as_mut().poll(cx).is_ready() {
                return self.ask(Boundary::Draining);
            }
        }
        Poll::Pending
    }

    fn ask(&mut self, boundary: Boundary) -> Poll<Heed> {
        self.asked = Some(boundary);
        Poll::Ready(Heed::AtIdle)
    }
}

/// A timer for a token's enforced expiry at `expires`, if enforced: boxed,
/// and made only then (an idle session holds the future that holds it).
pub(super) fn expiry_timer(expires: Option<SystemTime>) -> Option<Pin<Box<Sleep>>> {
    expires.map(|at| {
        let left = at
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        Box::pin(tokio::time::sleep(left))
    })
}

/// Completes when a drain has begun and the session's grace after its
/// login (`spared_until`) is over: where a drain closes it, at its next
/// idle boundary. The timer is boxed, made only once a drain begins: every
/// idle session holds this future.
pub(super) async fn drain_reaches(registered: &ClientHandle, spared_until: Instant) {
    registered.draining().await;
    Box::pin(tokio::time::sleep_until(spared_until)).await;
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;

    use super::*;
    use crate::clients::Clients;
    use crate::transport::Transport;

    /// What the stops say when the task is woken, within `within`.
    async fn next(stops: &mut Stops<'_>, within: Duration) -> Option<Heed> {
        tokio::time::timeout(within, poll_fn(|cx| stops.poll(cx)))
            .await
            .ok()
    }

    // Paused: the timers fire as tokio's clock is advanced, not by how
    // fast a busy machine runs the test.
    #[tokio::test(start_paused = true)]
    async fn a_drain_waits_out_the_grace_and_is_asked_once_and_a_kill_is_heard_after_it() {
        let clients = Arc::new(Clients::default());
        let handle = clients.register("127.0.0.1:5000".parse().expect("addr"), Transport::Wire);
        let grace = Duration::from_millis(200);
        let mut stops = Stops::new(&handle, Instant::now() + grace, None);
        let short = Duration::from_millis(20);
        assert_eq!(next(&mut stops, short).await, None, "nothing told");
        assert!(!stops.due(Instant::now(), None));
        let expired = SystemTime::now() - Duration::from_secs(1);
        assert!(stops.due(Instant::now(), Some(expired)), "an expired token");
        clients.drain_all();
        assert!(!stops.due(Instant::now(), None), "within the grace");
        assert_eq!(next(&mut stops, short).await, None, "within the grace");
        assert_eq!(next(&mut stops, grace).await, Some(Heed::AtIdle));
        assert_eq!(stops.asked(), Some(Boundary::Draining));
        assert!(stops.drain_reached(Instant::now()));
        assert!(stops.due(Instant::now(), None));
        assert_eq!(next(&mut stops, short).await, None, "asked once");
        // A task waiting on its stops is woken by the kill.
        let waiting = tokio::time::timeout(Duration::from_secs(5), poll_fn(|cx| stops.poll(cx)));
        let (heard, ()) = tokio::join!(waiting, async {
            tokio::time::sleep(short).await;
            assert!(clients.kill(handle.id()));
        });
        assert_eq!(heard.ok(), Some(Heed::Now));
    }

    // Paused: the timers fire as tokio's clock is advanced, not by how
    // fast a busy machine runs the test.
    #[tokio::test(start_paused = true)]
    async fn an_expired_token_is_asked_for_and_named_before_a_drain_due_at_once() {
        let clients = Arc::new(Clients::default());
        let handle = clients.register("127.0.0.1:5000".parse().expect("addr"), Transport::Wire);
        let expires = SystemTime::now() + Duration::from_millis(100);
        let mut stops = Stops::new(&handle, Instant::now(), Some(expires));
        assert_eq!(next(&mut stops, Duration::from_millis(20)).await, None);
        assert_eq!(
            next(&mut stops, Duration::from_secs(5)).await,
            Some(Heed::AtIdle)
        );
        assert_eq!(stops.asked(), Some(Boundary::TokenExpired));

        let expired = SystemTime::now() - Duration::from_secs(1);
        let mut both = Stops::new(&handle, Instant::now(), Some(expired));
        clients.drain_all();
        assert_eq!(
            next(&mut both, Duration::from_secs(5)).await,
            Some(Heed::AtIdle)
        );
        assert_eq!(both.asked(), Some(Boundary::TokenExpired));
    }
}
