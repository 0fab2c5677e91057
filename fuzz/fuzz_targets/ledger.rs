//! The reply ledger against the reference server model: conversations the
//! fuzzer chooses (what the client sends, when the server reads and
//! answers, whether it fails or starts COPY) must never see the ledger call
//! a backend settled or idle while the server still owes a reply or is not
//! reading normally, and never see it give up without cause.

#![no_main]

use authgres_wire::internals::model;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let steps = data.len().min(4000);
    model::run(&mut model::Bytes(data), steps);
});
