use super::*;

/// A conversation step: the client sends a tag, or the server replies.
enum Step {
    Client(&'static [u8]),
    Server(&'static [u8]),
}
use Step::{Client, Server};

/// Plays `steps` through a fresh ledger, ReadyForQuery bodies taken from
/// the tag that follows each 'Z' (`b"ZI"` is ReadyForQuery idle).
fn play(steps: &[Step]) -> (Ledger, Vec<(InFlight, Outcome)>) {
    let mut ledger = Ledger::default();
    let mut seen = Vec::new();
    let mut record = |request, outcome| seen.push((request, outcome));
    for step in steps {
        match step {
            Client(tags) => {
                for &tag in *tags {
                    ledger.client_message(tag, &mut record);
                }
            }
            Server(tags) => {
                let mut tags = tags.iter();
                while let Some(&tag) = tags.next() {
                    let status = (tag == b'Z').then(|| tags.next().copied()).flatten();
                    let body = status.as_ref().map(std::slice::from_ref);
                    ledger.server_message(tag, body, &mut record);
                }
            }
        }
    }
    (ledger, seen)
}

#[test]
fn a_simple_query_is_idle_once_answered() {
    let (ledger, _) = play(&[Client(b"Q"), Server(b"TCZI")]);
    assert!(ledger.idle());
    let (ledger, _) = play(&[Client(b"Q"), Server(b"TC")]);
    assert!(!ledger.settled());
    let (ledger, _) = play(&[Client(b"Q"), Server(b"CZT")]);
    assert!(
        ledger.settled() && !ledger.idle(),
        "inside a transaction block"
    );
}

#[test]
fn pipelined_extended_queries_need_their_sync() {
    let (ledger, _) = play(&[Client(b"PBDES"), Server(b"12TC")]);
    assert!(!ledger.settled());
    let (ledger, seen) = play(&[Client(b"PBDESPBES"), Server(b"12TCZI12CZI")]);
    assert!(ledger.idle());
    assert_eq!(seen.first(), Some(&(InFlight::Parse, Outcome::Done)));
    let (ledger, _) = play(&[Client(b"PBE"), Server(b"12C")]);
    assert!(!ledger.settled(), "no Sync yet: the batch is open");
    assert_eq!(ledger.lost(), None);
}

#[test]
fn after_an_error_the_server_skips_queries_and_calls_up_to_the_sync() {
    // Parse fails: the Query and FunctionCall after it get no answer.
    let (ledger, seen) = play(&[Client(b"PQFBS"), Server(b"EZI")]);
    assert!(ledger.idle(), "{ledger:?}");
    assert_eq!(
        seen,
        [
            (InFlight::Parse, Outcome::Failed),
            (InFlight::Query, Outcome::Skipped),
            (InFlight::FunctionCall, Outcome::Skipped),
            (InFlight::Bind, Outcome::Skipped),
            (InFlight::Sync, Outcome::Done),
        ]
    );
    // A failed Execute leaves the server skipping until a Sync arrives.
    let (ledger, _) = play(&[Client(b"PBE"), Server(b"12E")]);
    assert!(!ledger.settled(), "skipping to a Sync that was never sent");
}

#[test]
fn flush_and_copy_messages_outside_copy_get_no_reply() {
    let (ledger, _) = play(&[Client(b"H")]);
    assert!(ledger.idle());
    let (ledger, _) = play(&[Client(b"dcf"), Client(b"Q"), Server(b"CZI")]);
    assert!(ledger.idle());
    let (ledger, _) = play(&[Client(b"PH"), Server(b"1")]);
    assert!(
        !ledger.settled(),
        "a Parse before a Flush still needs its Sync"
    );
}

#[test]
fn function_calls_and_failing_syncs_end_with_ready_for_query() {
    let (ledger, _) = play(&[Client(b"FF"), Server(b"VZIEZI")]);
    assert!(ledger.idle());
    // A Sync whose implicit commit fails (a deferred constraint).
    let (ledger, _) = play(&[Client(b"PBES"), Server(b"12CEZI")]);
    assert!(ledger.idle());
}

#[test]
fn copy_from_stdin_in_a_query_and_the_syncs_drivers_send_during_it() {
    // psql's \copy: a Query, data, CopyDone.
    let (ledger, _) = play(&[Client(b"Q"), Server(b"G"), Client(b"ddc"), Server(b"CZI")]);
    assert!(ledger.idle());
    // tokio-postgres: Bind, Execute, Sync (read and ignored in COPY), data,
    // CopyDone, Sync.
    let (ledger, seen) = play(&[
        Client(b"BES"),
        Server(b"2G"),
        Client(b"ddcS"),
        Server(b"CZI"),
    ]);
    assert!(ledger.idle(), "{ledger:?}");
    assert!(seen.contains(&(InFlight::Execute, Outcome::Done)));
    // CopyFail ends an extended COPY with an error, then skips to the Sync.
    let (ledger, _) = play(&[Client(b"BE"), Server(b"2G"), Client(b"dfS"), Server(b"EZI")]);
    assert!(ledger.idle());
    // CopyFail in a Query: the error, then the Query's ReadyForQuery.
    let (ledger, _) = play(&[Client(b"Q"), Server(b"G"), Client(b"f"), Server(b"EZI")]);
    assert!(ledger.idle());
}

#[test]
fn a_copy_the_server_aborts_after_reading_a_sync_cannot_be_followed() {
    // The server may or may not have read that Sync before it failed: if
    // not, it answers it after the COPY.
    let (ledger, _) = play(&[Client(b"BES"), Server(b"2G"), Client(b"dd"), Server(b"E")]);
    assert!(ledger.lost().is_some());
    assert!(!ledger.settled());
    // A bad row with nothing else read is followed exactly.
    let (ledger, _) = play(&[Client(b"Q"), Server(b"G"), Client(b"dd"), Server(b"EZI")]);
    assert!(ledger.idle());
    // A Query sent in the middle of COPY data.
    let (ledger, _) = play(&[Client(b"Q"), Server(b"G"), Client(b"dQ"), Server(b"EZI")]);
    assert!(ledger.lost().is_some());
}

#[test]
fn copy_to_stdout_completes_its_statement() {
    let (ledger, _) = play(&[Client(b"Q"), Server(b"HCZI")]);
    assert!(ledger.idle());
    let (ledger, _) = play(&[Client(b"BES"), Server(b"2HCZI")]);
    assert!(ledger.idle());
}

#[test]
fn replies_nobody_asked_for_lose_the_ledger() {
    for replies in [&b"ZI"[..], b"1", b"E", b"G", b"W"] {
        let (ledger, _) = play(&[Server(replies)]);
        assert!(ledger.lost().is_some(), "{replies:?}");
        assert!(!ledger.settled());
    }
}

#[test]
fn a_client_that_pipelines_without_end_is_given_up_on() {
    let mut ledger = Ledger::default();
    for _ in 0..MAX_QUEUED {
        ledger.client_message(b'P', &mut |_, _| {});
        ledger.client_message(b'B', &mut |_, _| {});
    }
    assert!(ledger.lost().is_some());
    let mut runs = Ledger::default();
    for _ in 0..100_000 {
        runs.client_message(b'H', &mut |_, _| {});
    }
    assert_eq!(runs.lost(), None, "runs of one kind take one entry");
}

#[test]
fn malformed_flush_and_sync_and_unknown_messages_are_refused() {
    assert_eq!(Ledger::check(b'H', 4), Ok(()));
    assert_eq!(Ledger::check(b'S', 4), Ok(()));
    assert_eq!(Ledger::check(b'H', 5), Err(Violation::NotEmpty("Flush")));
    assert_eq!(Ledger::check(b'S', 6), Err(Violation::NotEmpty("Sync")));
    assert_eq!(
        Ledger::check(b'p', 40),
        Err(Violation::UnknownMessage(b'p'))
    );
    assert_eq!(Ledger::check(b'X', 4), Ok(()));
    assert_eq!(Ledger::check(b'Q', 9), Ok(()));
}

#[test]
fn a_length_below_its_own_four_bytes_is_refused() {
    // Found by the framer fuzz target: such a message read as empty, and
    // was forwarded.
    for length in [0, 1, 3] {
        assert_eq!(
            Ledger::check(b'Q', length),
            Err(Violation::BadLength(length))
        );
    }
}

/// A xorshift generator: conversations that are random and repeatable.
struct Seeded(u64);

impl model::Choices for Seeded {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        usize::try_from(self.0 % u64::try_from(n).unwrap_or(1)).unwrap_or(0)
    }
}

#[test]
fn agrees_with_the_reference_server_over_random_conversations() {
    for seed in 1..3000u64 {
        model::run(&mut Seeded(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15)), 300);
    }
}

#[test]
fn a_backend_waits_for_the_client_once_everything_sent_is_answered() {
    let (ledger, _) = play(&[Client(b"Q")]);
    assert!(!ledger.waiting_for_client(), "a query in flight");
    let (ledger, _) = play(&[Client(b"Q"), Server(b"TCZI")]);
    assert!(ledger.waiting_for_client() && !ledger.idle_in_transaction());
    let (ledger, _) = play(&[Client(b"Q"), Server(b"CZT")]);
    assert!(ledger.idle_in_transaction(), "a transaction block");
    // Parse, Bind, Execute, Flush: answered, the batch still open.
    let (ledger, _) = play(&[Client(b"PBEH"), Server(b"12C")]);
    assert!(ledger.waiting_for_client() && ledger.idle_in_transaction());
    let (ledger, _) = play(&[Client(b"PBEH"), Server(b"12")]);
    assert!(!ledger.waiting_for_client(), "the Execute runs");
    // A failed Parse: the server skips to a Sync the client has not sent.
    let (ledger, _) = play(&[Client(b"PH"), Server(b"E")]);
    assert!(ledger.idle_in_transaction());
    // COPY FROM STDIN waits for data, but is not an idle transaction.
    let (ledger, _) = play(&[Client(b"Q"), Server(b"G")]);
    assert!(ledger.waiting_for_client() && !ledger.idle_in_transaction());
    let (ledger, _) = play(&[Client(b"Qdc"), Server(b"G")]);
    assert!(!ledger.waiting_for_client(), "the COPY is being finished");
}

#[test]
fn runs_keep_their_order_in_place_spilled_and_back_again() {
    let kinds = [
        InFlight::Query,
        InFlight::Parse,
        InFlight::Bind,
        InFlight::Execute,
        InFlight::Sync,
    ];
    let mut runs = Runs::default();
    let mut model = std::collections::VecDeque::new();
    // A deterministic walk of pushes, merges into the last run and pops,
    // through the ring's wrap and the spill, against a plain queue.
    let mut state = 7u32;
    for step in 0..2000u32 {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        // Phases of growth (two pushes in three) and of draining (one).
        let roll = (state >> 16) % 3;
        let pushes = if (step / 150) % 2 == 0 {
            roll != 0
        } else {
            roll == 0
        };
        if pushes {
            let kind = kinds[(state >> 8) as usize % kinds.len()];
            match (runs.back_mut(), model.back_mut()) {
                (Some(last), Some(expected)) if last.0 == kind => {
                    last.1 += 1;
                    *expected = (kind, last.1);
                }
                _ => {
                    runs.push_back((kind, 1));
                    model.push_back((kind, 1));
                }
            }
        } else if let Some(front) = runs.front_mut() {
            assert_eq!(Some(&*front), model.front(), "step {step}");
            runs.pop_front();
            model.pop_front();
        }
        assert_eq!(runs.len(), model.len(), "step {step}");
        assert_eq!(runs.back_mut().map(|run| *run), model.back().copied());
    }
    while let Some(front) = runs.front_mut() {
        assert_eq!(Some(&*front), model.front());
        runs.pop_front();
        model.pop_front();
    }
    assert!(runs.is_empty() && model.is_empty());
}
