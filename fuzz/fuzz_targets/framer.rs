//! The framer over arbitrary bytes cut at arbitrary points: it consumes
//! every byte, reports starts and ends in order, and captured bodies are
//! exactly the bodies.

#![no_main]

use authgres_wire::internals::{Frame, Framer, TagSet};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(cut).max(1);
    let mut framer = Framer::new(TagSet::ALL, TagSet::of(b"PQZC"), 1024);
    let mut open: Option<u8> = None;
    let mut consumed = 0;
    for piece in stream.chunks(chunk) {
        let mut at = 0;
        while at < piece.len() {
            let (used, frame) = framer.next(&piece[at..]);
            at += used;
            match frame {
                None => break,
                Some(Frame::Start(tag)) => {
                    assert_eq!(open, None, "a message started inside another");
                    open = Some(tag);
                }
                Some(Frame::End(tag)) => {
                    assert_eq!(open, Some(tag), "an end without its start");
                    if let Some(body) = framer.body() {
                        // A length below 4 reads as an empty body (the
                        // ledger refuses such messages).
                        let length = u64::from(framer.length()).max(4);
                        assert_eq!(body.len() as u64 + 4, length);
                    }
                    open = None;
                }
            }
        }
        assert_eq!(at, piece.len(), "bytes left unconsumed");
        consumed += at;
    }
    assert_eq!(consumed, stream.len());
    // Between messages exactly when none is open.
    assert_eq!(framer.at_boundary(), open.is_none());
});
