//! Which waker a poll came with, compared without cloning it: the relay
//! and a connection's close and drain waits skip re-registering a waker
//! that is already where a wake would use it.

use std::task::Waker;

/// A waker's data and vtable addresses, as [`Waker::will_wake`] compares
/// them.
pub(crate) fn waker_id(waker: &Waker) -> (usize, usize) {
    (
        waker.data().addr(),
        std::ptr::from_ref(waker.vtable()).addr(),
    )
}
