//! Sans-IO message framing of a relayed byte stream.
//!
//! The relay forwards bytes untouched; a [`Framer`] follows the 5-byte
//! message headers as the bytes pass and reports where each message starts
//! and ends, collecting the bodies of the few message kinds the proxy must
//! read (ReadyForQuery's transaction status, command tags, named Parse
//! messages), so the relay knows where transactions end without buffering
//! whole messages. Which messages are reported and which bodies are kept
//! are [`TagSet`]s, built at compile time by whoever needs them.

/// A set of message tags, as a 256-bit map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagSet([u64; 4]);

impl TagSet {
    /// No tag.
    pub const NONE: Self = Self([0; 4]);
    /// Every tag.
    pub const ALL: Self = Self([u64::MAX; 4]);

    /// The set of `tags`.
    #[allow(clippy::indexing_slicing, reason = "i < tags.len(), and tag >> 6 < 4")]
    pub const fn of(tags: &[u8]) -> Self {
        let mut bits = [0u64; 4];
        let mut i = 0;
        while i < tags.len() {
            let tag = tags[i];
            bits[(tag >> 6) as usize] |= 1 << (tag & 63);
            i += 1;
        }
        Self(bits)
    }

    /// Tags in either set.
    pub const fn union(self, other: Self) -> Self {
        let (a, b) = (self.0, other.0);
        Self([a[0] | b[0], a[1] | b[1], a[2] | b[2], a[3] | b[3]])
    }

    /// Whether `tag` is in the set.
    #[allow(clippy::indexing_slicing, reason = "tag >> 6 < 4")]
    pub const fn contains(self, tag: u8) -> bool {
        self.0[(tag >> 6) as usize] & (1 << (tag & 63)) != 0
    }
}

/// A message boundary found by [`Framer::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A message with this tag begins at the returned offset; its tag byte
    /// is not consumed yet.
    Start(u8),
    /// The message with this tag ends at the returned offset; its body is in
    /// [`Framer::body`] if its kind is captured and it fit, and its length
    /// field in [`Framer::length`].
    End(u8),
}

/// Follows message framing across arbitrary chunk boundaries.
#[derive(Debug)]
pub struct Framer {
    /// Messages whose end is reported; the rest pass without a stop, which
    /// keeps result streams fast.
    report: TagSet,
    /// Whether the starts of the `report` messages are reported too (not
    /// for a caller that needs only ends, [`Framer::ends_only`]). A flag,
    /// not a second set: a relay holds two framers, and 62 bytes more took
    /// the relay past the allocator's small sizes.
    starts: bool,
    /// Messages whose bodies are collected, up to `capture_limit` bytes.
    capture: TagSet,
    capture_limit: usize,
    header: [u8; 5],
    header_len: usize,
    /// The length field of the current (or just ended) message.
    length: u32,
    /// Bytes of the current message body still to pass.
    body_left: usize,
    /// The start of the current message was reported (or not wanted).
    start_reported: bool,
    /// The current body is being collected (it is captured and fits).
    collecting: bool,
    body: Body,
    /// Whether `body` holds the complete body of the message that just ended.
    body_complete: bool,
}

impl Framer {
    /// A framer reporting the boundaries of the messages in `report` and
    /// collecting the bodies of those in `capture`, up to `capture_limit`
    /// bytes each.
    pub fn new(report: TagSet, capture: TagSet, capture_limit: usize) -> Self {
        Self {
            report,
            starts: true,
            capture,
            capture_limit,
            header: [0; 5],
            header_len: 0,
            length: 0,
            body_left: 0,
            start_reported: false,
            collecting: false,
            body: Body::default(),
            body_complete: false,
        }
    }

    /// The same framer reporting only where messages end: one stop per
    /// reported message instead of two, for a caller that reads only ends.
    #[must_use]
    pub fn ends_only(mut self) -> Self {
        self.starts = false;
        self
    }

    /// Consumes `bytes` up to the next message start or end; returns how
    /// many were consumed and the boundary reached, if any (`None` means all
    /// of `bytes` was consumed inside messages).
    pub fn next(&mut self, bytes: &[u8]) -> (usize, Option<Frame>) {
        let mut at = 0;
        while let Some(&first) = bytes.get(at) {
            if self.header_len == 0 {
                if !self.start_reported {
                    self.start_reported = true;
                    self.body_complete = false;
                    if self.starts && self.report.contains(first) {
                        return (at, Some(Frame::Start(first)));
                    }
                }
                // Most headers arrive whole: read in place, not gathered.
                if let Some(&[tag, a, b, c, d]) = bytes.get(at..at + 5) {
                    self.header[0] = tag;
                    self.header_len = 5;
                    at += 5;
                    self.begin_body(u32::from_be_bytes([a, b, c, d]));
                }
            }
            if self.header_len < 5 {
                let rest = bytes.get(at..).unwrap_or_default();
                let take = (5 - self.header_len).min(rest.len());
                let into = self.header.get_mut(self.header_len..self.header_len + take);
                if let (Some(into), Some(from)) = (into, rest.get(..take)) {
                    into.copy_from_slice(from);
                }
                self.header_len += take;
                at += take;
                if self.header_len < 5 {
                    break;
                }
                let [_, a, b, c, d] = self.header;
                self.begin_body(u32::from_be_bytes([a, b, c, d]));
            }
            let rest = bytes.get(at..).unwrap_or_default();
            let take = self.body_left.min(rest.len());
            if self.collecting {
                self.body.extend(rest.get(..take).unwrap_or_default());
            }
            self.body_left -= take;
            at += take;
            if self.body_left == 0 {
                self.header_len = 0;
                self.start_reported = false;
                self.body_complete = self.collecting;
                if self.report.contains(self.header[0]) {
                    return (at, Some(Frame::End(self.header[0])));
                }
            }
        }
        (at, None)
    }

    /// Starts the body of the message whose header was just read.
    fn begin_body(&mut self, length: u32) {
        self.length = length;
        self.body_left = usize::try_from(length.saturating_sub(4)).unwrap_or(usize::MAX);
        self.body.clear();
        self.collecting =
            self.capture.contains(self.header[0]) && self.body_left <= self.capture_limit;
    }

    /// The body of the message that just ended, if its kind is captured and
    /// it was within the limit.
    pub fn body(&self) -> Option<&[u8]> {
        self.body_complete.then(|| self.body.as_slice())
    }

    /// The length field of the message that just ended (4 for an empty
    /// body).
    pub fn length(&self) -> u32 {
        self.length
    }

    /// Whether the stream sits between messages (not inside one).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.body_left == 0
    }
}

/// Bodies up to this long are collected in place.
const INLINE: usize = 64;

/// A collected body: in place up to [`INLINE`] bytes (a ReadyForQuery, a
/// command tag, a short statement), on the heap beyond. A pooled
/// transaction builds its relay afresh, so a body that always allocated
/// would allocate in every transaction.
#[derive(Debug)]
struct Body {
    /// Bytes in `inline`, while `heap` is empty.
    len: usize,
    inline: [u8; INLINE],
    /// The body, once it outgrew `inline`.
    heap: Vec<u8>,
}

impl Default for Body {
    fn default() -> Self {
        Self {
            len: 0,
            inline: [0; INLINE],
            heap: Vec::new(),
        }
    }
}

impl Body {
    fn clear(&mut self) {
        self.len = 0;
        self.heap.clear();
    }

    fn extend(&mut self, bytes: &[u8]) {
        if self.heap.is_empty() {
            let end = self.len + bytes.len();
            if let Some(into) = self.inline.get_mut(self.len..end) {
                into.copy_from_slice(bytes);
                self.len = end;
                return;
            }
            let kept = self.inline.get(..self.len).unwrap_or_default();
            self.heap.extend_from_slice(kept);
        }
        self.heap.extend_from_slice(bytes);
    }

    fn as_slice(&self) -> &[u8] {
        if self.heap.is_empty() {
            self.inline.get(..self.len).unwrap_or_default()
        } else {
            &self.heap
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A protocol message: tag, length, body.
    pub(crate) fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let length = u32::try_from(body.len() + 4).expect("test message fits");
        out.extend_from_slice(&length.to_be_bytes());
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
    fn tag_sets_hold_exactly_their_tags() {
        let set = TagSet::of(b"Z1\xff\0");
        for tag in 0..=255u8 {
            assert_eq!(set.contains(tag), b"Z1\xff\0".contains(&tag), "{tag}");
        }
        let both = TagSet::of(b"a").union(TagSet::of(b"b"));
        assert!(both.contains(b'a') && both.contains(b'b') && !both.contains(b'c'));
        assert!(TagSet::ALL.contains(0) && !TagSet::NONE.contains(b'Z'));
    }

    #[test]
    fn finds_every_boundary_and_captured_body_across_every_split() {
        let mut stream = message(b'T', &[0; 30]);
        stream.extend(message(b'C', b"SELECT 1\0"));
        stream.extend(message(b'Z', b"I"));
        let capture = TagSet::of(b"CZ");
        let whole = frames(&mut Framer::new(TagSet::ALL, capture, 64), &[&stream]);
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
            let mut framer = Framer::new(TagSet::ALL, capture, 64);
            assert_eq!(frames(&mut framer, &[a, b]), whole, "split at {split}");
            assert!(framer.at_boundary());
        }
        let mut framer = Framer::new(TagSet::ALL, capture, 64);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frames(&mut framer, &bytes), whole);
    }

    #[test]
    fn bodies_longer_than_those_kept_in_place_are_whole_at_every_split() {
        let long: Vec<u8> = (0..=u8::MAX).cycle().take(INLINE * 3 + 5).collect();
        let exact: Vec<u8> = (0..INLINE).map(|i| u8::try_from(i).unwrap_or(0)).collect();
        let mut stream = message(b'Q', &long);
        stream.extend(message(b'Q', b"select 1\0"));
        stream.extend(message(b'Q', &exact));
        stream.extend(message(b'Q', &long));
        let capture = TagSet::of(b"Q");
        let bodies = |framer: &mut Framer, chunks: &[&[u8]]| -> Vec<Vec<u8>> {
            frames(framer, chunks)
                .into_iter()
                .filter_map(|(_, _, body)| body)
                .collect()
        };
        let expected = vec![
            long.clone(),
            b"select 1\0".to_vec(),
            exact.clone(),
            long.clone(),
        ];
        let mut framer = Framer::new(TagSet::ALL, capture, 1024);
        assert_eq!(bodies(&mut framer, &[&stream]), expected);
        for split in (0..stream.len()).step_by(7) {
            let (a, b) = stream.split_at(split);
            let mut framer = Framer::new(TagSet::ALL, capture, 1024);
            assert_eq!(bodies(&mut framer, &[a, b]), expected, "split at {split}");
        }
        let mut framer = Framer::new(TagSet::ALL, capture, 1024);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(bodies(&mut framer, &bytes), expected);
    }

    #[test]
    fn a_tag_byte_inside_a_body_is_not_a_message() {
        let mut framer = Framer::new(TagSet::ALL, TagSet::of(b"Z"), 64);
        let found = frames(&mut framer, &[&message(b'D', b"Z\0\0\0\x05I")]);
        assert_eq!(found.len(), 2);
        assert_eq!(found[1].1, Frame::End(b'D'));
    }

    #[test]
    fn only_the_chosen_messages_are_reported() {
        let mut stream = message(b'D', b"row");
        stream.extend(message(b'Z', b"I"));
        stream.extend(message(b'D', b"row"));
        let mut framer = Framer::new(TagSet::of(b"Z"), TagSet::of(b"Z"), 64);
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
    fn a_framer_for_ends_only_stops_once_per_message_at_every_split() {
        let mut stream = message(b'T', &[0; 30]);
        stream.extend(message(b'D', b"row"));
        stream.extend(message(b'C', b"SELECT 1\0"));
        stream.extend(message(b'Z', b"I"));
        let framer = || Framer::new(TagSet::of(b"TCZ"), TagSet::of(b"CZ"), 64).ends_only();
        let whole = frames(&mut framer(), &[&stream]);
        assert_eq!(
            whole,
            vec![
                (35, Frame::End(b'T'), None),
                (57, Frame::End(b'C'), Some(b"SELECT 1\0".to_vec())),
                (63, Frame::End(b'Z'), Some(b"I".to_vec())),
            ]
        );
        for split in 0..stream.len() {
            let (a, b) = stream.split_at(split);
            assert_eq!(frames(&mut framer(), &[a, b]), whole, "split at {split}");
        }
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(frames(&mut framer(), &bytes), whole);
    }

    #[test]
    fn bodies_over_the_limit_are_not_captured_and_lengths_are_kept() {
        let mut framer = Framer::new(TagSet::ALL, TagSet::of(b"P"), 4);
        let found = frames(&mut framer, &[&message(b'P', b"too long")]);
        assert_eq!(found[1], (13, Frame::End(b'P'), None));
        assert_eq!(framer.length(), 12);
    }
}
