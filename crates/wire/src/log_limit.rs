//! Log lines about refused or garbage connections are limited: a flood of
//! them must not become a flood of log writes. A [`LogLimiter`] lets a
//! burst of lines through per window and counts the rest, which the next
//! line that gets through reports.

use std::sync::Mutex;
use std::sync::PoisonError;
use std::time::Duration;

use tokio::time::Instant;

/// Lines let through per window.
const BURST: u32 = 20;
/// The window.
const WINDOW: Duration = Duration::from_secs(10);

/// A limit on one kind of log line.
#[derive(Debug)]
pub struct LogLimiter {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    lines: u32,
    suppressed: u64,
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                window_start: None,
                lines: 0,
                suppressed: 0,
            }),
        }
    }
}

impl LogLimiter {
    /// Whether a line may be logged at `now`: `Some(n)` with the number of
    /// lines suppressed since the last one that was, or `None` to drop it.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = state
            .window_start
            .is_none_or(|start| now.duration_since(start) >= WINDOW);
        if fresh {
            state.window_start = Some(now);
            state.lines = 0;
        }
        if state.lines >= BURST {
            state.suppressed += 1;
            return None;
        }
        state.lines += 1;
        Some(std::mem::take(&mut state.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_what_was_dropped() {
        let limiter = LogLimiter::default();
        let start = Instant::now();
        for _ in 0..BURST {
            assert_eq!(limiter.allow(start), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(limiter.allow(start + Duration::from_secs(1)), None);
        }
        assert_eq!(limiter.allow(start + WINDOW), Some(5));
        assert_eq!(limiter.allow(start + WINDOW), Some(0));
    }
}
