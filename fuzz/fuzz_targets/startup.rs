//! Startup-phase packets from arbitrary bytes: the parser never panics,
//! consumes only whole packets, and the negotiation answers each one.

#![no_main]

use authgres_wire::internals::{Negotiation, startup};
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
    if let Ok(None) = startup::parse_password_message(&mut buf) {
        assert_eq!(buf.len(), before);
    }
});
