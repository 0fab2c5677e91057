//! `/sql` requests from arbitrary headers and bodies: reading the target,
//! the statements and the batch options never panics.

#![no_main]

use authgres_http::render::param_text;
use authgres_http::sql::request;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 7] = [
    "neon-connection-string",
    "authorization",
    "neon-array-mode",
    "neon-raw-text-output",
    "neon-batch-isolation-level",
    "neon-batch-read-only",
    "neon-batch-deferrable",
];

fuzz_target!(|data: &[u8]| {
    // Header values separated by 0xff, then the body.
    let mut parts = data.split(|&b| b == 0xff);
    let mut headers = HeaderMap::new();
    for name in NAMES {
        let Some(value) = parts.next() else { break };
        if let Ok(value) = HeaderValue::from_bytes(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    }
    let body: Vec<u8> = parts.flat_map(|part| part.iter().copied()).collect();
    let _ = request::target(&headers);
    if let Ok((statements, batch)) = request::statements(&headers, &body) {
        for statement in &statements {
            for param in &statement.params {
                let _ = param_text(param);
            }
        }
        if let Some(batch) = batch {
            let _ = batch.begin();
        }
    }
});
