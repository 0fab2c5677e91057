//! The upstream login machine fed arbitrary server messages: it never
//! panics, and it is ready only after an AuthenticationOk.

#![no_main]

use authgres_wire::internals::{UpstreamLogin, Step};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut login = UpstreamLogin::new("authenticated", Some("secret"), 2, "fuzz-nonce".into());
    let mut out = BytesMut::new();
    let mut rest = data;
    let mut authenticated = false;
    // Messages as (tag, one length byte, body).
    while let [tag, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (body, tail) = tail.split_at(len);
        rest = tail;
        authenticated |= *tag == b'R' && body.starts_with(&[0, 0, 0, 0]);
        match login.message(*tag, body, &mut out) {
            Ok(Step::Continue) => {}
            Ok(Step::Ready) => {
                assert!(authenticated, "ready without AuthenticationOk");
                let established = login.established();
                assert!(established.cancel_key.len() <= 256);
                return;
            }
            Err(_) => return,
        }
    }
});
