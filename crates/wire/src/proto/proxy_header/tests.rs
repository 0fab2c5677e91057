use std::net::SocketAddr;

use super::*;

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("address")
}

fn header(source: &str, destination: &str, tlvs: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode(Some((addr(source), addr(destination))), tlvs, &mut out);
    out
}

/// HAProxy 2.6's `send-proxy-v2` for a client at 127.0.0.1:40000 that
/// connected to 127.0.0.1:5000, byte for byte as seen on the wire.
const HAPROXY_IPV4: &[u8] = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c\
    \x7f\x00\x00\x01\x7f\x00\x00\x01\x9c\x40\x13\x88";

#[test]
fn an_ipv4_header_gives_the_client_address() {
    assert_eq!(
        parse(HAPROXY_IPV4),
        Ok(Parsed::Complete {
            header: Header::Proxy {
                source: addr("127.0.0.1:40000"),
                destination: addr("127.0.0.1:5000"),
            },
            len: 28,
        })
    );
    assert_eq!(
        header("127.0.0.1:40000", "127.0.0.1:5000", b""),
        HAPROXY_IPV4
    );
}

#[test]
fn an_ipv6_header_with_tlvs_is_taken_whole_and_what_follows_is_left() {
    // PP2_TYPE_ALPN "postgresql", then PP2_TYPE_NOOP.
    let tlvs = b"\x01\x00\x0apostgresql\x04\x00\x00";
    let mut bytes = header("[2001:db8::7]:5555", "[2001:db8::1]:6432", tlvs);
    let len = bytes.len();
    assert_eq!(len, FIXED_LEN + 36 + tlvs.len());
    bytes.extend_from_slice(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f]); // SSLRequest
    assert_eq!(
        parse(&bytes),
        Ok(Parsed::Complete {
            header: Header::Proxy {
                source: addr("[2001:db8::7]:5555"),
                destination: addr("[2001:db8::1]:6432"),
            },
            len,
        })
    );
}

#[test]
fn ipv4_mapped_sources_are_given_as_ipv4() {
    let bytes = header("[::ffff:192.0.2.9]:1", "[2001:db8::1]:2", b"");
    let Ok(Parsed::Complete {
        header: Header::Proxy { source, .. },
        ..
    }) = parse(&bytes)
    else {
        panic!("parsed");
    };
    assert_eq!(source, addr("192.0.2.9:1"));
}

#[test]
fn local_keeps_the_connections_own_endpoints_whatever_its_family() {
    let mut bytes = Vec::new();
    encode(None, b"", &mut bytes);
    assert_eq!(
        parse(&bytes),
        Ok(Parsed::Complete {
            header: Header::Local,
            len: 16
        })
    );
    // LOCAL with addresses (HAProxy's health checks send its own): ignored.
    let mut bytes = header("10.0.0.1:1", "10.0.0.2:2", b"");
    bytes[12] = 0x20;
    assert_eq!(
        parse(&bytes),
        Ok(Parsed::Complete {
            header: Header::Local,
            len: 28
        })
    );
}

#[test]
fn every_prefix_of_a_header_asks_for_exactly_what_is_missing() {
    let bytes = header("192.0.2.1:1000", "192.0.2.2:6432", b"\x04\x00\x01x");
    for cut in 0..bytes.len() {
        let expected = if cut < FIXED_LEN {
            FIXED_LEN
        } else {
            bytes.len()
        };
        assert_eq!(
            parse(&bytes[..cut]),
            Ok(Parsed::Incomplete { total: expected }),
            "{cut} bytes"
        );
    }
}

#[test]
fn other_first_bytes_are_refused_at_once() {
    // A Postgres SSLRequest and StartupMessage, a TLS ClientHello, HTTP.
    for bytes in [
        &b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..],
        b"\x00\x00\x00\x29\x00\x03\x00\x00user",
        b"\x16\x03\x01\x02\x00",
        b"GET / HTTP/1.1\r\n",
        b"\r\n\r\n\0\r\nQUIX\n",
        b"\r",
    ] {
        assert_eq!(
            parse(bytes).map(|_| ()),
            if bytes == b"\r" {
                Ok(())
            } else {
                Err(HeaderError::Missing)
            },
            "{bytes:?}"
        );
    }
    assert_eq!(
        parse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 6432\r\n"),
        Err(HeaderError::Version1)
    );
}

#[test]
fn bad_versions_commands_families_and_lengths_are_refused() {
    let good = header("192.0.2.1:1000", "192.0.2.2:6432", b"");
    let with = |index: usize, byte: u8| {
        let mut bytes = good.clone();
        bytes[index] = byte;
        parse(&bytes)
    };
    assert_eq!(with(12, 0x11), Err(HeaderError::Version(1)));
    assert_eq!(with(12, 0x22), Err(HeaderError::Command(2)));
    // UNSPEC, UDP over IPv4, a Unix socket: no TCP client address.
    for family in [0x00, 0x12, 0x31] {
        assert_eq!(with(13, family), Err(HeaderError::Family(family)));
    }
    assert_eq!(
        with(15, 11),
        Err(HeaderError::TooShort {
            len: 11,
            needed: 12
        })
    );
    // The limit is checked on the fixed part alone: nothing more is read.
    let mut oversized = good[..FIXED_LEN].to_vec();
    oversized[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    assert_eq!(
        parse(&oversized),
        Err(HeaderError::TooLong {
            len: 65_535,
            max: MAX_PAYLOAD
        })
    );
}

#[test]
fn what_a_listener_without_trust_recognizes() {
    assert!(looks_like_header(HAPROXY_IPV4));
    assert!(looks_like_header(b"\r\n\r\n"));
    assert!(looks_like_header(b"PROXY TCP4 "));
    assert!(looks_like_header(b"PRO"));
    assert!(!looks_like_header(b""));
    assert!(!looks_like_header(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"));
}

/// A small xorshift generator: the property test below is repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % u64::try_from(n).expect("fits")).expect("fits")
    }
}

/// Mutated and random inputs: parsing never panics, never claims more bytes
/// than it was given or the limit allows, asks for more only when it has
/// fewer, and a longer buffer never changes a verdict already given.
#[test]
fn parsing_arbitrary_bytes_keeps_its_promises() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let seeds = [
        header("192.0.2.1:1000", "192.0.2.2:6432", b""),
        header(
            "[2001:db8::7]:5555",
            "[2001:db8::1]:6432",
            b"\x04\x00\x02ab",
        ),
        HAPROXY_IPV4.to_vec(),
    ];
    for round in 0..20_000 {
        let mut bytes = if round % 4 == 0 {
            (0..rng.below(64)).map(|_| rng.byte()).collect()
        } else {
            seeds[rng.below(seeds.len())].clone()
        };
        for _ in 0..rng.below(4) {
            if !bytes.is_empty() {
                let at = rng.below(bytes.len());
                bytes[at] = rng.byte();
            }
        }
        bytes.truncate(rng.below(bytes.len() + 1));
        let verdict = parse(&bytes);
        match verdict {
            Ok(Parsed::Incomplete { total }) => {
                assert!(total > bytes.len() && total <= FIXED_LEN + MAX_PAYLOAD);
            }
            Ok(Parsed::Complete { len, .. }) => assert!(len <= bytes.len()),
            Err(_) => {}
        }
        for extra in 1..4 {
            let mut longer = bytes.clone();
            longer.extend((0..extra).map(|_| rng.byte()));
            let again = parse(&longer);
            match verdict {
                Ok(Parsed::Incomplete { .. }) => {}
                _ => assert_eq!(again, verdict, "{bytes:?} then {longer:?}"),
            }
        }
    }
}
