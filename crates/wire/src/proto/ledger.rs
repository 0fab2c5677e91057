//! Where a backend stands in its conversation with the client: which of the
//! client's messages the server still owes an answer, and in which mode it
//! will read the next one.
//!
//! A backend may be handed to another client, or reset, only when it is
//! proven idle: every message the client sent has been answered and the
//! server waits for input in its normal mode. Counting ReadyForQuery
//! messages is not enough, because the server's mode changes what a
//! message costs
//! ([protocol flow](https://www.postgresql.org/docs/current/protocol-flow.html)):
//!
//! * after an error in an extended-query message (Parse, Bind, Describe,
//!   Execute, Close) the server skips every message up to the next Sync,
//!   Query and FunctionCall included, so they get no ReadyForQuery;
//! * in COPY FROM STDIN it reads CopyData, ignores Flush and Sync (which
//!   libpq and tokio-postgres send there), ends on CopyDone or CopyFail,
//!   and aborts on anything else;
//! * outside COPY it ignores CopyData, CopyDone and CopyFail.
//!
//! The [`Ledger`] follows that exactly: it queues the client's messages as
//! they are forwarded and retires them as the server's replies show the
//! server taking them up. Where the server's behaviour cannot be told from
//! the bytes (a COPY that the server aborts while the client's stream has
//! moved past it), it says so ([`Ledger::lost`]) and the backend is never
//! released or reset on its word. Malformed Flush and Sync messages and
//! message types the protocol does not have are refused before they reach
//! the server ([`Violation`]), so every message it forwards has one known
//! meaning.

use std::collections::VecDeque;

use super::framer::TagSet;

/// Messages the ledger must see from the server: every reply that ends a
/// client message's processing, and those that change the server's mode.
/// DataRow and CopyData, the bulk of any result, are not among them.
pub const SERVER_REPORTED: TagSet = TagSet::of(b"123nsCIEGHWZVT");
/// Server messages whose bodies the ledger reads (ReadyForQuery's status).
pub const SERVER_BODIES: TagSet = TagSet::of(b"Z");

/// Most queued entries followed before the ledger gives up on a client
/// that pipelines without reading.
const MAX_QUEUED: usize = 4096;
/// ReadyForQuery status outside a transaction block.
pub const IDLE: u8 = b'I';

/// A client message the server has not finished with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlight {
    /// Query ('Q'): answered up to a ReadyForQuery.
    Query,
    /// FunctionCall ('F'): answered up to a ReadyForQuery.
    FunctionCall,
    /// Sync ('S'): ends an extended-query batch with a ReadyForQuery.
    Sync,
    /// Parse ('P'): ParseComplete or an error.
    Parse,
    /// Bind ('B'): BindComplete or an error.
    Bind,
    /// Describe ('D'): a RowDescription or NoData, or an error.
    Describe,
    /// Execute ('E'): a command's completion, or an error, or COPY.
    Execute,
    /// Close ('C'): CloseComplete or an error.
    Close,
    /// Flush ('H'): no reply.
    Flush,
    /// CopyData ('d').
    CopyData,
    /// CopyDone ('c').
    CopyDone,
    /// CopyFail ('f').
    CopyFail,
}

impl InFlight {
    fn of(tag: u8) -> Option<Self> {
        Some(match tag {
            b'Q' => Self::Query,
            b'F' => Self::FunctionCall,
            b'S' => Self::Sync,
            b'P' => Self::Parse,
            b'B' => Self::Bind,
            b'D' => Self::Describe,
            b'E' => Self::Execute,
            b'C' => Self::Close,
            b'H' => Self::Flush,
            b'd' => Self::CopyData,
            b'c' => Self::CopyDone,
            b'f' => Self::CopyFail,
            _ => return None,
        })
    }

    fn extended(self) -> bool {
        matches!(
            self,
            Self::Parse | Self::Bind | Self::Describe | Self::Execute | Self::Close
        )
    }

    /// Whether this reply tag ends the message's processing successfully.
    fn completed_by(self, tag: u8) -> bool {
        match self {
            Self::Parse => tag == b'1',
            Self::Bind => tag == b'2',
            Self::Close => tag == b'3',
            Self::Describe => matches!(tag, b'T' | b'n'),
            Self::Execute => matches!(tag, b'C' | b'I' | b's'),
            _ => false,
        }
    }
}

/// How the server dealt with a client message, as the ledger retires it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Processed successfully.
    Done,
    /// Processed and failed (an ErrorResponse).
    Failed,
    /// Not processed: skipped after an error, or ignored (CopyData outside
    /// COPY, Flush), or read as COPY input.
    Skipped,
}

/// A client message the relay must not forward: the client is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A message type that has no meaning after authentication.
    #[error("unexpected message type 0x{0:02x} after authentication")]
    UnknownMessage(u8),
    /// A Flush or Sync with a body (the server would answer a malformed
    /// Flush by skipping to the next Sync).
    #[error("malformed {0} message (it has no body)")]
    NotEmpty(&'static str),
    /// A length field below the four bytes of the length itself.
    #[error("message length {0} is shorter than its own length field")]
    BadLength(u32),
}

/// How the server reads the next client message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    /// After an error in an extended-query message: everything up to the
    /// next Sync is skipped.
    SkipToSync,
    /// Reading COPY FROM STDIN data.
    CopyIn(Copy),
}

/// A COPY FROM STDIN in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Copy {
    /// Started by an Execute (extended protocol) rather than a Query.
    extended: bool,
    /// How the client ended it, once the server has read that.
    end: Option<CopyEnd>,
    /// The ledger counted a Sync as read during the COPY; had the COPY
    /// failed before the server read it, the server would answer it.
    read_sync: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyEnd {
    /// CopyDone: CommandComplete or an error follows.
    Done,
    /// CopyFail: an error follows.
    Fail,
    /// Another message type, which aborts the COPY with an error; had the
    /// server failed before reading it, it would process it instead.
    Aborted,
}

/// The reply accounting of one backend (see the module docs).
#[derive(Debug)]
pub struct Ledger {
    /// Messages sent and not yet taken up by the server, run-length coded.
    queue: Runs,
    /// The message the server is processing, if any.
    current: Option<InFlight>,
    mode: Mode,
    /// Status of the last ReadyForQuery.
    status: u8,
    /// An extended-query message was processed since the last
    /// ReadyForQuery: the batch (and any implicit transaction) is open
    /// until a Sync.
    batch_open: bool,
    /// Why the ledger can no longer tell where the backend stands.
    lost: Option<&'static str>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            queue: Runs::default(),
            current: None,
            mode: Mode::Normal,
            status: IDLE,
            batch_open: false,
            lost: None,
        }
    }
}

impl Ledger {
    /// Checks a client message whose header just arrived (`length` is its
    /// length field): refuses what must not be forwarded.
    pub fn check(tag: u8, length: u32) -> Result<(), Violation> {
        if length < 4 {
            return Err(Violation::BadLength(length));
        }
        match tag {
            b'H' | b'S' if length != 4 => Err(Violation::NotEmpty(if tag == b'H' {
                "Flush"
            } else {
                "Sync"
            })),
            // Terminate is the relay's to handle.
            b'X' => Ok(()),
            _ if InFlight::of(tag).is_some() => Ok(()),
            _ => Err(Violation::UnknownMessage(tag)),
        }
    }

    /// Notes a client message as forwarded; `retired` hears of every
    /// message the server has thereby taken up without a reply.
    pub fn client_message(&mut self, tag: u8, retired: &mut impl FnMut(InFlight, Outcome)) {
        let Some(request) = InFlight::of(tag) else {
            self.lose("a message the ledger does not know");
            return;
        };
        let queued = self.queue.len();
        match self.queue.back_mut() {
            Some((last, count)) if *last == request => *count += 1,
            _ if queued >= MAX_QUEUED => {
                self.lose("too many messages in flight to follow");
                return;
            }
            _ => self.queue.push_back((request, 1)),
        }
        self.advance(retired);
    }

    /// A server message whose length field cannot be (below 4): the
    /// framing of the rest cannot be trusted.
    pub fn malformed_server_message(&mut self) {
        self.lose("a server message with an impossible length");
    }

    /// Notes a server message that [`SERVER_REPORTED`] names, with its body
    /// when [`SERVER_BODIES`] does.
    pub fn server_message(
        &mut self,
        tag: u8,
        body: Option<&[u8]>,
        retired: &mut impl FnMut(InFlight, Outcome),
    ) {
        if self.lost.is_some() {
            return;
        }
        match (self.mode, tag) {
            (Mode::CopyIn(copy), b'C' | b'E') => self.copy_ended(copy, tag, retired),
            (Mode::CopyIn(_), _) => self.lose("an unexpected reply during COPY"),
            (_, b'G') => self.copy_in(),
            (_, b'H') => {} // COPY TO STDOUT: the rows follow, then its completion.
            (_, b'W') => self.lose("COPY BOTH (replication) is not followed"),
            (_, b'Z') => self.ready(body, retired),
            (_, b'E') => self.failed(retired),
            (_, tag) => self.replied(tag, retired),
        }
        self.advance(retired);
    }

    fn ready(&mut self, body: Option<&[u8]>, retired: &mut impl FnMut(InFlight, Outcome)) {
        match (self.current, body) {
            (
                Some(request @ (InFlight::Query | InFlight::FunctionCall | InFlight::Sync)),
                Some(&[status]),
            ) => {
                self.current = None;
                self.status = status;
                self.batch_open = false;
                retired(request, Outcome::Done);
            }
            _ => self.lose("a ReadyForQuery nothing asked for"),
        }
    }

    fn failed(&mut self, retired: &mut impl FnMut(InFlight, Outcome)) {
        match self.current {
            // Errors inside a Query or FunctionCall end with its
            // ReadyForQuery; a Sync's own processing (ending an implicit
            // transaction) may fail too.
            Some(InFlight::Query | InFlight::FunctionCall | InFlight::Sync) => {}
            Some(request) if request.extended() => {
                self.current = None;
                self.mode = Mode::SkipToSync;
                retired(request, Outcome::Failed);
            }
            _ => self.lose("an error nothing asked for"),
        }
    }

    fn replied(&mut self, tag: u8, retired: &mut impl FnMut(InFlight, Outcome)) {
        match self.current {
            Some(request) if request.completed_by(tag) => {
                self.current = None;
                retired(request, Outcome::Done);
            }
            // Results inside a Query; a FunctionCall's result.
            Some(InFlight::Query) if matches!(tag, b'T' | b'C' | b'I') => {}
            Some(InFlight::FunctionCall) if tag == b'V' => {}
            // A RowDescription before an Execute's rows is not sent; one
            // before a Describe's end is its end (handled above).
            _ => self.lose("a reply to nothing in flight"),
        }
    }

    /// CopyInResponse: the current Query or Execute now reads COPY data.
    fn copy_in(&mut self) {
        match self.current {
            Some(request @ (InFlight::Query | InFlight::Execute)) => {
                self.mode = Mode::CopyIn(Copy {
                    extended: request == InFlight::Execute,
                    end: None,
                    read_sync: false,
                });
            }
            _ => self.lose("COPY started by nothing in flight"),
        }
    }

    fn copy_ended(&mut self, copy: Copy, tag: u8, retired: &mut impl FnMut(InFlight, Outcome)) {
        let failed = tag == b'E';
        // The ledger counts the client's messages read as they are sent;
        // the server reads them as it goes. A COPY that ends in an error
        // may have ended before the server read them: a Sync or another
        // message it would then answer make the replies unknowable.
        // (CopyData, CopyDone, CopyFail and Flush get no reply either way.)
        let ambiguous = failed && (copy.read_sync || copy.end == Some(CopyEnd::Aborted));
        if ambiguous {
            self.lose("a COPY the server aborted at a point the proxy cannot see");
            return;
        }
        if !failed && copy.end != Some(CopyEnd::Done) {
            self.lose("a COPY completed before the client ended it");
            return;
        }
        match (copy.extended, failed) {
            // COPY in a Query: the Query goes on to its ReadyForQuery.
            (false, _) => self.mode = Mode::Normal,
            (true, false) => {
                self.mode = Mode::Normal;
                self.current = None;
                retired(InFlight::Execute, Outcome::Done);
            }
            (true, true) => {
                self.mode = Mode::SkipToSync;
                self.current = None;
                retired(InFlight::Execute, Outcome::Failed);
            }
        }
    }

    /// Lets the server take up queued messages while it reads input.
    fn advance(&mut self, retired: &mut impl FnMut(InFlight, Outcome)) {
        while self.lost.is_none() {
            let reading = match self.mode {
                Mode::CopyIn(copy) => copy.end.is_none(),
                Mode::Normal | Mode::SkipToSync => self.current.is_none(),
            };
            if !reading {
                return;
            }
            let Some(request) = self.pop() else {
                return;
            };
            match self.mode {
                Mode::CopyIn(mut copy) => {
                    match request {
                        InFlight::CopyData | InFlight::Flush => {}
                        InFlight::Sync => copy.read_sync = true,
                        InFlight::CopyDone => copy.end = Some(CopyEnd::Done),
                        InFlight::CopyFail => copy.end = Some(CopyEnd::Fail),
                        _ => copy.end = Some(CopyEnd::Aborted),
                    }
                    self.mode = Mode::CopyIn(copy);
                    retired(request, Outcome::Skipped);
                }
                Mode::SkipToSync if request == InFlight::Sync => {
                    self.mode = Mode::Normal;
                    self.current = Some(request);
                }
                Mode::SkipToSync => retired(request, Outcome::Skipped),
                Mode::Normal => match request {
                    InFlight::Flush
                    | InFlight::CopyData
                    | InFlight::CopyDone
                    | InFlight::CopyFail => {
                        retired(request, Outcome::Skipped);
                    }
                    _ => {
                        self.batch_open |= request.extended();
                        self.current = Some(request);
                    }
                },
            }
        }
    }

    fn pop(&mut self) -> Option<InFlight> {
        let (request, count) = self.queue.front_mut()?;
        let request = *request;
        *count -= 1;
        if *count == 0 {
            self.queue.pop_front();
        }
        Some(request)
    }

    fn lose(&mut self, why: &'static str) {
        self.lost.get_or_insert(why);
    }

    /// Why the ledger cannot tell where the backend stands, if it cannot.
    pub fn lost(&self) -> Option<&'static str> {
        self.lost
    }

    /// Whether every message sent has been answered, the last batch ended
    /// with its ReadyForQuery, and the server reads input in its normal
    /// mode (inside a transaction block or not): a reset can bring such a
    /// backend back for another client.
    pub fn settled(&self) -> bool {
        self.lost.is_none()
            && self.current.is_none()
            && self.queue.is_empty()
            && self.mode == Mode::Normal
            && !self.batch_open
    }

    /// Whether the server has answered everything it was sent and waits
    /// for the client's next message, in a transaction block, an open
    /// extended-query batch (ended by Flush, not Sync) or a COPY FROM
    /// STDIN alike: a backend that works for nobody unless the client
    /// speaks. False when the ledger is lost.
    pub fn waiting_for_client(&self) -> bool {
        // In COPY FROM STDIN the Query or Execute that started it is still
        // current: the server reads data until the client ends it.
        let reading = match self.mode {
            Mode::CopyIn(copy) => copy.end.is_none(),
            Mode::Normal | Mode::SkipToSync => self.current.is_none(),
        };
        self.lost.is_none() && self.queue.is_empty() && reading
    }

    /// Whether the client holds the backend in a transaction, or in an
    /// open batch that runs as one, while the server waits for it: what
    /// `idle_in_transaction` limits.
    pub fn idle_in_transaction(&self) -> bool {
        self.waiting_for_client()
            && !matches!(self.mode, Mode::CopyIn(_))
            && (self.status != IDLE || self.batch_open || self.mode == Mode::SkipToSync)
    }

    /// Whether the backend is settled outside any transaction block: the
    /// boundary where transaction pooling hands it back.
    pub fn idle(&self) -> bool {
        self.settled() && self.status == IDLE
    }
}

#[cfg(any(test, feature = "internals"))]
pub mod model;
/// Runs in place before the queue spills to the heap: a pooled
/// transaction builds its ledger afresh, and a simple query or an
/// extended-query batch (Bind, Execute, Sync) fits.
const RUNS_IN_PLACE: usize = 4;

/// The ledger's queue of runs (message kind, count), oldest first: the
/// oldest in place, the rest, once those are full, on the heap.
#[derive(Debug)]
struct Runs {
    /// A ring of the oldest runs: `len` of them from `start`.
    in_place: [(InFlight, u32); RUNS_IN_PLACE],
    start: usize,
    len: usize,
    /// Runs after those in place.
    spilled: VecDeque<(InFlight, u32)>,
}

impl Default for Runs {
    fn default() -> Self {
        Self {
            // Placeholders: only `len` of them from `start` are runs.
            in_place: [(InFlight::Sync, 0); RUNS_IN_PLACE],
            start: 0,
            len: 0,
            spilled: VecDeque::new(),
        }
    }
}

impl Runs {
    fn len(&self) -> usize {
        self.len + self.spilled.len()
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn slot(&self, nth: usize) -> usize {
        (self.start + nth) % RUNS_IN_PLACE
    }

    fn back_mut(&mut self) -> Option<&mut (InFlight, u32)> {
        if !self.spilled.is_empty() {
            return self.spilled.back_mut();
        }
        let last = self.len.checked_sub(1)?;
        let at = self.slot(last);
        self.in_place.get_mut(at)
    }

    /// Adds a run after the others: in place while there is room and
    /// nothing has spilled (which would put it before older runs).
    fn push_back(&mut self, run: (InFlight, u32)) {
        if self.len < RUNS_IN_PLACE && self.spilled.is_empty() {
            let at = self.slot(self.len);
            if let Some(place) = self.in_place.get_mut(at) {
                *place = run;
                self.len += 1;
                return;
            }
        }
        self.spilled.push_back(run);
    }

    fn front_mut(&mut self) -> Option<&mut (InFlight, u32)> {
        if self.len == 0 {
            return self.spilled.front_mut();
        }
        self.in_place.get_mut(self.start)
    }

    fn pop_front(&mut self) {
        if self.len == 0 {
            self.spilled.pop_front();
            return;
        }
        self.start = self.slot(1);
        self.len -= 1;
    }
}

#[cfg(test)]
mod tests;
