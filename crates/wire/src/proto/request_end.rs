//! Where a client's request ends, for a request the proxy answers itself
//! without the server (a transaction refused by a limit): a Query or a
//! FunctionCall is one message; an extended-protocol batch runs to its
//! Sync, and what comes before the Sync is discarded, as Postgres discards
//! a failed batch's messages. The bodies are passed over, never buffered.
//!
//! Reference: <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-EXT-QUERY>.

use super::framer::{Frame, Framer, TagSet};

/// Query.
const QUERY: u8 = b'Q';
/// FunctionCall.
const FUNCTION_CALL: u8 = b'F';
/// Sync.
const SYNC: u8 = b'S';
/// Terminate.
const TERMINATE: u8 = b'X';

/// Follows a client's bytes to the end of its current request.
#[derive(Debug)]
pub struct RequestEnd {
    framer: Framer,
    /// Whether the request is one Query or FunctionCall (`None` until its
    /// first byte).
    single: Option<bool>,
}

impl Default for RequestEnd {
    fn default() -> Self {
        Self {
            framer: Framer::new(
                TagSet::of(&[QUERY, FUNCTION_CALL, SYNC, TERMINATE]),
                TagSet::NONE,
                0,
            ),
            single: None,
        }
    }
}

impl RequestEnd {
    /// Consumes the request's next `bytes`: `Some(offset)` once it ended,
    /// the offset just past its last message, or at the start of a
    /// Terminate (the client leaves: the caller sees it next); `None` when
    /// all of `bytes` belongs to the request.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut at = 0;
        if self.single.is_none() {
            let &first = bytes.first()?;
            self.single = Some(matches!(first, QUERY | FUNCTION_CALL));
        }
        loop {
            let (used, frame) = self.framer.next(bytes.get(at..).unwrap_or_default());
            at += used;
            match frame? {
                Frame::Start(TERMINATE) => return Some(at),
                Frame::End(SYNC) => return Some(at),
                Frame::End(QUERY | FUNCTION_CALL) if self.single == Some(true) => {
                    return Some(at);
                }
                Frame::Start(_) | Frame::End(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::framer::tests::message;

    fn ends(chunks: &[&[u8]]) -> Option<usize> {
        let mut end = RequestEnd::default();
        let mut base = 0;
        for chunk in chunks {
            if let Some(at) = end.feed(chunk) {
                return Some(base + at);
            }
            base += chunk.len();
        }
        None
    }

    #[test]
    fn a_query_is_one_message_and_what_follows_is_the_next_request() {
        let query = message(b'Q', b"select 1\0");
        let bytes = [query.clone(), message(b'Q', b"select 2\0")].concat();
        assert_eq!(ends(&[&bytes]), Some(query.len()));
        assert_eq!(ends(&[&query[..3], &query[3..]]), Some(query.len()));
        assert_eq!(ends(&[&query[..7]]), None);
    }

    #[test]
    fn a_batch_runs_to_its_sync_with_queries_inside_discarded() {
        let batch = [
            message(b'P', b"\0select 1\0\0\0"),
            message(b'B', &[0; 8]),
            message(b'H', b""),
            message(b'Q', b"discarded\0"),
            message(b'E', &[0; 5]),
        ]
        .concat();
        let sync = message(b'S', b"");
        let all = [batch.clone(), sync.clone()].concat();
        assert_eq!(ends(&[&batch]), None);
        assert_eq!(ends(&[&all]), Some(all.len()));
        let (a, b) = all.split_at(9);
        assert_eq!(ends(&[a, b]), Some(all.len()));
    }

    #[test]
    fn a_terminate_ends_it_unconsumed() {
        let parse = message(b'P', b"\0select 1\0\0\0");
        let bytes = [parse.clone(), message(b'X', b"")].concat();
        assert_eq!(ends(&[&bytes]), Some(parse.len()));
    }
}
