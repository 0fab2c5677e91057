//! Sans-IO tracking of message boundaries in the server-to-client stream.
//!
//! The relay forwards bytes untouched; this scanner only reads the 5-byte
//! headers as they pass to learn each ReadyForQuery's transaction status,
//! which marks a transaction boundary ('I' idle, 'T' in a transaction,
//! 'E' failed transaction).

/// Message tag of ReadyForQuery.
const READY_FOR_QUERY: u8 = b'Z';

/// Follows backend message framing across arbitrary chunk boundaries.
#[derive(Debug, Default)]
pub struct MessageScanner {
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current message body still to pass.
    body_left: usize,
    /// The current message is a ReadyForQuery whose status byte is next.
    status_next: bool,
    last_status: Option<u8>,
}

impl MessageScanner {
    /// A scanner for a stream whose last message was a ReadyForQuery with
    /// this status (the proxy sent the handshake's own ReadyForQuery).
    pub fn after_ready(status: u8) -> Self {
        Self {
            last_status: Some(status),
            ..Self::default()
        }
    }

    /// Feeds the next bytes of the stream; returns the status of the last
    /// ReadyForQuery completed within them, if any.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Option<u8> {
        let mut completed = None;
        while !bytes.is_empty() {
            if self.body_left > 0 {
                if self.status_next {
                    self.status_next = false;
                    self.last_status = Some(bytes[0]);
                    completed = Some(bytes[0]);
                }
                let take = self.body_left.min(bytes.len());
                self.body_left -= take;
                bytes = &bytes[take..];
                continue;
            }
            let take = (5 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&bytes[..take]);
            self.header_len += take;
            bytes = &bytes[take..];
            if self.header_len == 5 {
                self.header_len = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.body_left = len.saturating_sub(4);
                self.status_next = self.header[0] == READY_FOR_QUERY && self.body_left == 1;
            }
        }
        completed
    }

    /// Feeds bytes until a message with `tag` begins; returns its offset in
    /// `bytes` (the scanner stops there) or `None` if none begins in them.
    /// Used on the client's stream to find Terminate ('X').
    pub fn feed_until(&mut self, bytes: &[u8], tag: u8) -> Option<usize> {
        let mut offset = 0;
        while offset < bytes.len() {
            if self.at_boundary() && bytes[offset] == tag {
                return Some(offset);
            }
            let end = if self.body_left > 0 {
                offset + self.body_left.min(bytes.len() - offset)
            } else {
                offset + (5 - self.header_len).min(bytes.len() - offset)
            };
            self.feed(&bytes[offset..end]);
            offset = end;
        }
        None
    }

    /// The status of the last ReadyForQuery seen.
    pub fn last_status(&self) -> Option<u8> {
        self.last_status
    }

    /// Whether the stream sits between messages (not inside one).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn finds_ready_for_query_across_every_split() {
        let mut stream = message(b'T', &[0; 30]);
        stream.extend(message(b'D', b"a row"));
        stream.extend(message(b'C', b"SELECT 1\0"));
        stream.extend(message(b'Z', b"T"));
        stream.extend(message(b'C', b"COMMIT\0"));
        stream.extend(message(b'Z', b"I"));
        for split in 0..stream.len() {
            let mut scanner = MessageScanner::default();
            let (a, b) = stream.split_at(split);
            let first = scanner.feed(a);
            let second = scanner.feed(b);
            assert_eq!(second.or(first), Some(b'I'), "split at {split}");
            assert_eq!(scanner.last_status(), Some(b'I'));
            assert!(scanner.at_boundary());
        }
        let mut bytewise = MessageScanner::default();
        let statuses: Vec<u8> = stream.iter().filter_map(|b| bytewise.feed(&[*b])).collect();
        assert_eq!(statuses, b"TI");
    }

    #[test]
    fn finds_terminate_only_at_a_message_start() {
        let mut stream = message(b'Q', b"select 'X'\0");
        stream.extend(message(b'X', b""));
        for split in 0..stream.len() {
            let mut scanner = MessageScanner::default();
            let (a, b) = stream.split_at(split);
            let found = match scanner.feed_until(a, b'X') {
                Some(at) => Some(at),
                None => scanner.feed_until(b, b'X').map(|at| at + a.len()),
            };
            assert_eq!(found, Some(stream.len() - 5), "split at {split}");
        }
    }

    #[test]
    fn a_z_byte_inside_data_is_not_a_boundary() {
        let mut scanner = MessageScanner::default();
        assert_eq!(scanner.feed(&message(b'D', b"Z\0\0\0\x05I")), None);
        assert_eq!(scanner.last_status(), None);
    }
}
