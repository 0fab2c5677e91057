//! Startup-phase packets from arbitrary bytes: the parser never panics,
//! consumes only whole packets, and the negotiation answers each one; the
//! password and SASL (OAUTHBEARER) messages that follow parse without
//! panicking.

#![no_main]

use authgres_wire::internals::{Negotiation, oauthbearer, startup};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let mut buf = BytesMut::from(data);
    let mut negotiation = Negotiation::new(flags & 1 == 1, flags & 2 == 2);
    loop {
        let before = buf.len();
        match startup::parse_startup_packet(&mut buf) {
            Ok(Some(packet)) => {
                assert!(buf.len() < before, "a packet consumed nothing");
                if negotiation.packet(packet, !buf.is_empty()).is_err() {
                    break;
                }
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "a partial packet was consumed");
                break;
            }
            Err(_) => break,
        }
    }
    let mut buf = BytesMut::from(data);
    let before = buf.len();
    match startup::take_password_message(&mut buf) {
        Ok(None) => assert_eq!(buf.len(), before, "a partial message was consumed"),
        Ok(Some(body)) => {
            let _ = startup::password_text(&body);
            if let Ok(initial) = startup::parse_sasl_initial_response(&body) {
                let _ = oauthbearer::parse_client_first(initial.data.unwrap_or_default());
            }
            let _ = oauthbearer::parse_client_first(&body);
        }
        Err(_) => {}
    }
});
