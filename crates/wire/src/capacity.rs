//! Semaphores whose size changes while permits are out (a reload that
//! changes a limit), and exact counts of what is held.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Semaphore;

/// Changes `semaphore`'s size from `from` to `to` permits. Growing adds
/// permits at once; shrinking takes the free ones at once and the rest as
/// they come back (a task waits for them), so holders are never cut off
/// and the new size holds once they leave.
pub(crate) fn resize(semaphore: &Arc<Semaphore>, from: usize, to: usize) {
    if to > from {
        semaphore.add_permits(to - from);
        return;
    }
    let excess = from - to;
    let owed = excess - semaphore.forget_permits(excess);
    if owed == 0 {
        return;
    }
    let semaphore = Arc::clone(semaphore);
    tokio::spawn(async move {
        let owed = u32::try_from(owed).unwrap_or(u32::MAX);
        if let Ok(permits) = semaphore.acquire_many_owned(owed).await {
            permits.forget();
        }
    });
}

/// How many of something are held now, counted by [`Held`] guards: exact
/// while a resize is still collecting permits, unlike a semaphore's count.
#[derive(Debug, Default)]
pub(crate) struct Count(Arc<AtomicUsize>);

/// One held thing of a [`Count`]; uncounted on drop.
#[derive(Debug)]
pub(crate) struct Held(Arc<AtomicUsize>);

impl Count {
    /// Counts one more until the guard drops.
    pub(crate) fn hold(&self) -> Held {
        self.0.fetch_add(1, Ordering::Relaxed);
        Held(Arc::clone(&self.0))
    }

    /// How many are held.
    pub(crate) fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn shrinking_waits_for_holders_and_growing_is_immediate() {
        let semaphore = Arc::new(Semaphore::new(3));
        let held: Vec<_> = (0..3)
            .map(|_| Arc::clone(&semaphore).try_acquire_owned().expect("free"))
            .collect();
        resize(&semaphore, 3, 1);
        drop(held);
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(
            semaphore.available_permits(),
            1,
            "two taken as they came back"
        );
        resize(&semaphore, 1, 4);
        assert_eq!(semaphore.available_permits(), 4);
    }
}
