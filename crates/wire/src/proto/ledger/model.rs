//! A reference model of how a Postgres backend answers a client's messages,
//! written as a server (what it reads, what it sends) rather than as the
//! ledger's bookkeeping of replies, to check the [`Ledger`] against: the
//! unit tests run seeded random conversations through it, and the
//! `ledger` fuzz target runs the fuzzer's.
//!
//! The driver interleaves three things as its choice bytes say: the
//! client sending its next message, the server reading one, and a reply
//! reaching the proxy. After every step it asserts that whenever the ledger
//! says the backend is settled (or idle), the model's server has nothing
//! left to say and reads in its normal mode, and that the ledger is not
//! needlessly lost.

use std::collections::VecDeque;

use super::{InFlight, Ledger, Outcome};

/// Client message tags the model sends.
const CLIENT_TAGS: &[u8] = b"QFSPBDECHdcf";

/// A source of decisions: the fuzzer's bytes, or a seeded generator.
pub trait Choices {
    /// A number below `n` (n > 0).
    fn below(&mut self, n: usize) -> usize;
}

/// Choices read from a byte string; zeros once it runs out.
#[cfg_attr(test, allow(dead_code, reason = "the fuzz target's source of choices"))]
pub struct Bytes<'a>(pub &'a [u8]);

impl Choices for Bytes<'_> {
    fn below(&mut self, n: usize) -> usize {
        match self.0.split_first() {
            Some((&byte, rest)) => {
                self.0 = rest;
                usize::from(byte) % n
            }
            None => 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    Skip,
    CopyIn { extended: bool },
}

/// The model's backend.
#[derive(Debug)]
struct Server {
    inbox: VecDeque<u8>,
    outbox: VecDeque<(u8, Option<u8>)>,
    mode: Mode,
    status: u8,
    /// An extended-query batch is open: its Sync has not come.
    batch_open: bool,
    /// A COPY failed: the ledger may not know how far the server read, and
    /// may give up (soundness is still checked; completeness is not).
    unfollowable: bool,
}

impl Server {
    fn ready(&mut self, choices: &mut impl Choices) {
        self.batch_open = false;
        self.status = b"ITE".get(choices.below(3)).copied().unwrap_or(b'I');
        self.outbox.push_back((b'Z', Some(self.status)));
    }

    fn send(&mut self, tag: u8) {
        self.outbox.push_back((tag, None));
    }

    /// Reads and processes the next message, if the server is reading.
    fn read(&mut self, choices: &mut impl Choices) -> bool {
        let Some(tag) = self.inbox.pop_front() else {
            return false;
        };
        match self.mode {
            Mode::Skip => {
                if tag == b'S' {
                    self.mode = Mode::Normal;
                    self.ready(choices);
                }
            }
            Mode::CopyIn { extended } => self.copy_message(tag, extended, choices),
            Mode::Normal => self.normal_message(tag, choices),
        }
        true
    }

    fn normal_message(&mut self, tag: u8, choices: &mut impl Choices) {
        let fails = choices.below(4) == 0;
        if b"PBDEC".contains(&tag) {
            self.batch_open = true;
        }
        match tag {
            b'Q' => match choices.below(5) {
                0 => {
                    self.send(b'E');
                    self.ready(choices);
                }
                1 => {
                    self.send(b'G');
                    self.mode = Mode::CopyIn { extended: false };
                }
                2 => {
                    for tag in [b'H', b'C', b'T', b'C'] {
                        self.send(tag);
                    }
                    self.ready(choices);
                }
                _ => {
                    for tag in [b'T', b'C', b'I'] {
                        self.send(tag);
                    }
                    self.ready(choices);
                }
            },
            b'F' => {
                self.send(if fails { b'E' } else { b'V' });
                self.ready(choices);
            }
            b'S' => {
                if fails {
                    self.send(b'E');
                }
                self.ready(choices);
            }
            b'P' | b'B' | b'C' | b'D' if fails => self.extended_error(),
            b'P' => self.send(b'1'),
            b'B' => self.send(b'2'),
            b'C' => self.send(b'3'),
            b'D' => self.send(if choices.below(2) == 0 { b'T' } else { b'n' }),
            b'E' => match choices.below(6) {
                0 => self.extended_error(),
                1 => {
                    self.send(b'G');
                    self.mode = Mode::CopyIn { extended: true };
                }
                2 => {
                    self.send(b'H');
                    self.send(b'C');
                }
                3 => self.send(b's'),
                4 => self.send(b'I'),
                _ => self.send(b'C'),
            },
            // Flush, and COPY messages outside COPY: no reply.
            _ => {}
        }
    }

    fn extended_error(&mut self) {
        self.send(b'E');
        self.mode = Mode::Skip;
    }

    fn copy_message(&mut self, tag: u8, extended: bool, choices: &mut impl Choices) {
        match tag {
            b'd' => {}
            b'H' | b'S' => {}
            b'c' if choices.below(3) != 0 => {
                self.send(b'C');
                self.copy_over(extended, false, choices);
            }
            b'c' | b'f' => {
                self.send(b'E');
                self.copy_over(extended, true, choices);
            }
            _ => {
                self.unfollowable = true;
                self.send(b'E');
                self.copy_over(extended, true, choices);
            }
        }
    }

    /// The server fails the COPY on its own (a bad row, a constraint).
    fn copy_fails(&mut self, choices: &mut impl Choices) {
        if let Mode::CopyIn { extended } = self.mode {
            self.unfollowable = true;
            self.send(b'E');
            self.copy_over(extended, true, choices);
        }
    }

    fn copy_over(&mut self, extended: bool, failed: bool, choices: &mut impl Choices) {
        self.unfollowable |= failed;
        match (extended, failed) {
            (true, true) => self.mode = Mode::Skip,
            (true, false) => self.mode = Mode::Normal,
            (false, _) => {
                self.mode = Mode::Normal;
                self.ready(choices);
            }
        }
    }

    /// Nothing left to say, and what it has yet to read gets no reply.
    fn quiescent(&self) -> bool {
        self.outbox.is_empty()
            && self.mode == Mode::Normal
            && !self.batch_open
            && self.inbox.iter().all(|tag| b"Hdcf".contains(tag))
    }
}

/// Runs one conversation of at most `steps` steps chosen by `choices`,
/// asserting the ledger's soundness after each (see the module docs).
pub fn run(choices: &mut impl Choices, steps: usize) {
    let mut ledger = Ledger::default();
    let mut server = Server {
        inbox: VecDeque::new(),
        outbox: VecDeque::new(),
        mode: Mode::Normal,
        status: b'I',
        batch_open: false,
        unfollowable: false,
    };
    let mut retired = |_: InFlight, _: Outcome| {};
    // What happened, for the failure message.
    let mut trace = String::new();
    for _ in 0..steps {
        match choices.below(4) {
            0 => {
                let tag = CLIENT_TAGS
                    .get(choices.below(CLIENT_TAGS.len()))
                    .copied()
                    .unwrap_or(b'Q');
                ledger.client_message(tag, &mut retired);
                server.inbox.push_back(tag);
                trace.push_str(&format!(" >{}", char::from(tag)));
            }
            1 => {
                let before = server.outbox.len();
                if server.read(choices) {
                    trace.push_str(" read");
                    for (tag, _) in server.outbox.iter().skip(before) {
                        trace.push_str(&format!(" +{}", char::from(*tag)));
                    }
                }
            }
            2 => {
                if let Some((tag, body)) = server.outbox.pop_front() {
                    let body = body.as_ref().map(std::slice::from_ref);
                    ledger.server_message(tag, body, &mut retired);
                    trace.push_str(&format!(" <{}", char::from(tag)));
                }
            }
            _ if choices.below(8) == 0 => {
                if matches!(server.mode, Mode::CopyIn { .. }) {
                    trace.push_str(" copy-fails");
                }
                server.copy_fails(choices);
            }
            _ => {}
        }
        check(&ledger, &server, &trace);
    }
    // Let everything play out: every reply delivered.
    while server.read(choices) {}
    while let Some((tag, body)) = server.outbox.pop_front() {
        let body = body.as_ref().map(std::slice::from_ref);
        ledger.server_message(tag, body, &mut retired);
        trace.push_str(&format!(" <{}", char::from(tag)));
        check(&ledger, &server, &trace);
        while server.read(choices) {}
    }
    check(&ledger, &server, &trace);
}

fn check(ledger: &Ledger, server: &Server, trace: &str) {
    if ledger.settled() {
        assert!(
            server.quiescent(),
            "the ledger says settled while the server owes replies or is not reading \
             normally: {ledger:?} {server:?}\ntrace:{trace}"
        );
    }
    if ledger.idle() {
        assert_eq!(
            server.status, b'I',
            "idle outside a transaction: {server:?}\ntrace:{trace}"
        );
    }
    if server.quiescent() && !server.unfollowable && ledger.lost().is_none() {
        assert!(
            ledger.settled(),
            "the ledger missed that the server is done: {ledger:?} {server:?}\ntrace:{trace}"
        );
    }
    if !server.unfollowable {
        assert_eq!(
            ledger.lost(),
            None,
            "lost without cause: {server:?}\ntrace:{trace}"
        );
    }
}
