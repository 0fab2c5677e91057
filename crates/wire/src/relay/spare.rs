//! Relay buffers kept for reuse by the thread that let them go.
//!
//! A transaction-pooled session builds a relay for every transaction:
//! allocating, zeroing and freeing its two buffers each time was a
//! measurable part of the proxy's CPU per transaction (issue 26), while
//! keeping them in every idle session would cost each idle client their
//! size. A few per thread are kept instead. A reused buffer still holds
//! the bytes of whoever used it last; a [`super::Pipe`] only ever exposes
//! what it read or loaded itself, between its own `start` and `end`.

use std::cell::RefCell;

/// Buffers of each size kept per thread.
const KEPT: usize = 64;

/// Spare buffers of one size.
type Shelf = (usize, Vec<Box<[u8]>>);

thread_local! {
    /// Spare buffers on this thread, by size.
    static SPARE: RefCell<Vec<Shelf>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `size` bytes: a spare one, or a new one.
pub(super) fn take(size: usize) -> Box<[u8]> {
    SPARE
        .try_with(|spare| {
            let mut spare = spare.borrow_mut();
            spare
                .iter_mut()
                .find(|(kept, _)| *kept == size)
                .and_then(|(_, buffers)| buffers.pop())
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| vec![0; size].into_boxed_slice())
}

/// Keeps `buffer` for the next relay on this thread, unless enough are.
pub(super) fn give(buffer: Box<[u8]>) {
    let size = buffer.len();
    // During thread teardown the buffer is simply freed.
    let _ = SPARE.try_with(|spare| {
        let mut spare = spare.borrow_mut();
        let index = match spare.iter().position(|(kept, _)| *kept == size) {
            Some(index) => index,
            None => {
                spare.push((size, Vec::new()));
                spare.len() - 1
            }
        };
        if let Some((_, buffers)) = spare.get_mut(index)
            && buffers.len() < KEPT
        {
            buffers.push(buffer);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_by_size_and_the_kept_ones_are_bounded() {
        let mut first = take(100);
        first[0] = 7;
        let address = first.as_ptr();
        give(first);
        // Another size does not take it.
        let other = take(200);
        assert_ne!(other.as_ptr(), address);
        let again = take(100);
        assert_eq!(again.as_ptr(), address);
        assert_eq!(again.len(), 100);
        for _ in 0..KEPT + 10 {
            give(vec![0; 100].into_boxed_slice());
        }
        let kept = SPARE.with(|spare| {
            spare
                .borrow()
                .iter()
                .find(|(size, _)| *size == 100)
                .map_or(0, |(_, buffers)| buffers.len())
        });
        assert_eq!(kept, KEPT);
    }
}
