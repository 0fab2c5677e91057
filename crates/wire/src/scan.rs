//! Sans-IO message framing of a relayed byte stream.
//!
//! The relay forwards bytes untouched; a [`Framer`] follows the 5-byte
//! message headers as the bytes pass and reports where each message starts
//! and ends, collecting the bodies of the few message kinds the proxy must
//! read (ReadyForQuery's transaction status, command tags, named Parse
//! messages), so the relay knows where transactions end without buffering
//! whole messages.

/// A message boundary found by [`Framer::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A message with this tag begins at the returned offset; its tag byte
    /// is not consumed yet.
    Start(u8),
    /// The message with this tag ends at the returned offset; its body is in
    /// [`Framer::body`] if its kind is captured and it fit.
    End(u8),
}

/// Which messages a [`Framer`] reports.
#[derive(Debug, Clone, Copy)]
pub enum Report {
    /// The start and end of every message.
    All,
    /// Only the start and end of messages with one of these tags (the rest
    /// pass without a stop, which keeps result streams fast).
    Tags(&'static [u8]),
}

impl Report {
    fn includes(self, tag: u8) -> bool {
        match self {
            Self::All => true,
            Self::Tags(tags) => tags.contains(&tag),
        }
    }
}

/// Follows message framing across arbitrary chunk boundaries.
#[derive(Debug)]
pub struct Framer {
    report: Report,
    /// Tags whose bodies are collected, and the most collected per body.
    capture: &'static [u8],
    capture_limit: usize,
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current message body still to pass.
    body_left: usize,
    /// The start of the current message was reported.
    start_reported: bool,
    /// The current body is being collected (it is captured and fits).
    collecting: bool,
    body: Vec<u8>,
    /// Whether `body` holds the complete body of the message that just ended.
    body_complete: bool,
}

impl Framer {
    /// A framer reporting the boundaries of the messages in `report` and
    /// collecting the bodies of those tagged with one of `capture`, up to
    /// `capture_limit` bytes each.
    pub fn new(report: Report, capture: &'static [u8], capture_limit: usize) -> Self {
        Self {
            report,
            capture,
            capture_limit,
            header: [0; 5],
            header_len: 0,
            body_left: 0,
            start_reported: false,
            collecting: false,
            body: Vec::new(),
            body_complete: false,
        }
    }

    /// Consumes `bytes` up to the next message start or end; returns how
    /// many were consumed and the boundary reached, if any (`None` means all
    /// of `bytes` was consumed inside messages).
    pub fn next(&mut self, bytes: &[u8]) -> (usize, Option<Frame>) {
        let mut at = 0;
        while at < bytes.len() {
            if self.header_len == 0 && !self.start_reported {
                self.start_reported = true;
                self.body_complete = false;
                if self.report.includes(bytes[at]) {
                    return (at, Some(Frame::Start(bytes[at])));
                }
            }
            if self.header_len < 5 {
                let take = (5 - self.header_len).min(bytes.len() - at);
                self.header[self.header_len..self.header_len + take]
                    .copy_from_slice(&bytes[at..at + take]);
                self.header_len += take;
                at += take;
                if self.header_len < 5 {
                    break;
                }
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                self.body_left = len.saturating_sub(4);
                self.body.clear();
                self.collecting =
                    self.capture.contains(&self.header[0]) && self.body_left <= self.capture_limit;
            }
            let take = self.body_left.min(bytes.len() - at);
            if self.collecting {
                self.body.extend_from_slice(&bytes[at..at + take]);
            }
            self.body_left -= take;
            at += take;
            if self.body_left == 0 {
                self.header_len = 0;
                self.start_reported = false;
                self.body_complete = self.collecting;
                if self.report.includes(self.header[0]) {
                    return (at, Some(Frame::End(self.header[0])));
                }
            }
        }
        (at, None)
    }

    /// The body of the message that just ended, if its kind is captured and
    /// it was within the limit.
    pub fn body(&self) -> Option<&[u8]> {
        self.body_complete.then_some(&self.body[..])
    }

    /// Whether the stream sits between messages (not inside one).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A protocol message: tag, length, body.
    pub(crate) fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Every boundary in `chunks`, as (absolute offset, frame, body).
    fn frames(framer: &mut Framer, chunks: &[&[u8]]) -> Vec<(usize, Frame, Option<Vec<u8>>)> {
        let mut found = Vec::new();
        let mut base = 0;
        for chunk in chunks {
            let mut at = 0;
            loop {
                let (used, frame) = framer.next(&chunk[at..]);
                at += used;
                let Some(frame) = frame else { break };
                let body = matches!(frame, Frame::End(_))
                    .then(|| framer.body().map(<[u8]>::to_vec))
                    .flatten();
                found.push((base + at, frame, body));
            }
            base += chunk.len();
        }
        found
    }

    #[test]
    fn finds_every_boundary_and_captured_body_across_every_split() {
        let mut stream = message(b'T', &[0; 30]);
        stream.extend(message(b'C', b"SELECT 1\0"));
        stream.extend(message(b'Z', b"I"));
        let whole = frames(&mut Framer::new(Report::All, b"CZ", 64), &[&stream]);
        assert_eq!(
            whole,
            vec![
                (0, Frame::Start(b'T'), None),
                (35, Frame::End(b'T'), None),
                (35, Frame::Start(b'C'), None),
                (49, Frame::End(b'C'), Some(b"SELECT 1\0".to_vec())),
                (49, Frame::Start(b'Z'), None),
                (55, Frame::End(b'Z'), Some(b"I".to_vec())),
            ]
        );
        for split in 0..stream.len() {
            let (a, b) = stream.split_at(split);
            let mut framer = Framer::new(Report::All, b"CZ", 64);
            assert_eq!(frames(&mut framer, &[a, b]), whole, "split at {split}");
            assert!(framer.at_boundary());
        }
        let mut framer = Framer::new(Report::All, b"CZ", 64);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frames(&mut framer, &bytes), whole);
    }

    #[test]
    fn a_tag_byte_inside_a_body_is_not_a_message() {
        let mut framer = Framer::new(Report::All, b"Z", 64);
        let found = frames(&mut framer, &[&message(b'D', b"Z\0\0\0\x05I")]);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].1, Frame::End(b'D'));
    }

    #[test]
    fn only_the_chosen_messages_are_reported() {
        let mut stream = message(b'D', b"row");
        stream.extend(message(b'Z', b"I"));
        stream.extend(message(b'D', b"row"));
        let mut framer = Framer::new(Report::Tags(b"Z"), b"Z", 64);
        let found = frames(&mut framer, &[&stream]);
        assert_eq!(
            found,
            vec![
                (8, Frame::Start(b'Z'), None),
                (14, Frame::End(b'Z'), Some(b"I".to_vec())),
            ]
        );
        assert!(framer.at_boundary());
    }

    #[test]
    fn bodies_over_the_limit_are_not_captured() {
        let mut framer = Framer::new(Report::All, b"P", 4);
        let found = frames(&mut framer, &[&message(b'P', b"too long")]);
        assert_eq!(found[1], (13, Frame::End(b'P'), None));
    }
}
