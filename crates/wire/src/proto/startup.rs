//! Sans-IO parsing of what a client sends before it is authenticated.
//!
//! Implements the untyped startup packets (StartupMessage, SSLRequest,
//! GSSENCRequest, CancelRequest) and the PasswordMessage of the
//! [Postgres frontend/backend protocol](https://www.postgresql.org/docs/current/protocol-message-formats.html).
//! Functions take a buffer and return `Ok(None)` when more bytes are needed;
//! they never touch a socket.

use std::collections::BTreeMap;

use bytes::{Buf, BytesMut};

/// Largest startup-phase packet accepted, in bytes. Postgres itself refuses
/// larger ones (`MAX_STARTUP_PACKET_LENGTH` in `pqcomm.h`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// Largest PasswordMessage accepted, in bytes. The password is a JWT, and
/// tokens with custom claims (org memberships, metadata) run to several KB.
pub const MAX_PASSWORD_MESSAGE: usize = 64 * 1024;

/// Request code of an SSLRequest.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
/// Request code of a GSSENCRequest.
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
/// Request code of a CancelRequest.
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// Longest cancel key a CancelRequest may carry (protocol 3.2 allows up to
/// 256 bytes; 3.0 keys are 4).
pub const MAX_CANCEL_KEY: usize = 256;
/// Protocol major version 3, the only one Postgres speaks since 7.4.
const PROTOCOL_MAJOR_3: u16 = 3;
/// Message tag of a PasswordMessage.
const PASSWORD_TAG: u8 = b'p';

/// A packet a client may send before its StartupMessage is accepted.
#[derive(Debug, PartialEq, Eq)]
pub enum StartupPacket {
    /// The client asks to switch to TLS.
    SslRequest,
    /// The client asks for GSSAPI encryption (always refused).
    GssEncRequest,
    /// The client asks to cancel a query running on another connection.
    CancelRequest {
        /// Process id the client was given in BackendKeyData.
        pid: i32,
        /// Secret key the client was given in BackendKeyData (4 bytes in
        /// protocol 3.0, up to [`MAX_CANCEL_KEY`] in 3.2).
        key: Vec<u8>,
    },
    /// The StartupMessage proper.
    Startup {
        /// Minor protocol version the client asked for (major is always 3).
        minor_version: u16,
        /// Startup parameters (`user`, `database`, `options`, ...).
        parameters: BTreeMap<String, String>,
    },
}

/// Why a client's bytes could not be understood.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// A length field outside the allowed range.
    #[error("{what} of {len} bytes is outside the allowed range (at most {max})")]
    BadLength {
        /// Which packet.
        what: &'static str,
        /// The length the client announced.
        len: usize,
        /// The largest length accepted.
        max: usize,
    },
    /// An unknown request code or protocol version.
    #[error("unsupported frontend protocol {major}.{minor}: this server supports 3.0")]
    UnsupportedProtocol {
        /// Major version (upper 16 bits of the code).
        major: u16,
        /// Minor version (lower 16 bits of the code).
        minor: u16,
    },
    /// Any other malformed packet.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// A message other than the one the protocol calls for.
    #[error("expected a password message, got message type {0:?}")]
    UnexpectedMessage(char),
    /// A PROXY protocol header, from a peer not trusted to send one.
    #[error(
        "a PROXY protocol header from an address not in the listener's proxy_protocol_from \
         (only the load balancers listed there may send one)"
    )]
    ProxyHeader,
}

/// Parses one startup-phase packet from the front of `buf`.
///
/// Returns `Ok(None)` until a whole packet is buffered; on success the packet
/// is removed from `buf` and anything after it stays there.
pub fn parse_startup_packet(buf: &mut BytesMut) -> Result<Option<StartupPacket>, FrameError> {
    let Some(&length) = buf.first_chunk::<4>() else {
        return Ok(None);
    };
    if super::proxy_header::looks_like_header(&length) {
        // A startup packet's first byte is 0: it is never this long.
        return Err(FrameError::ProxyHeader);
    }
    let len = i32::from_be_bytes(length);
    let len = usize::try_from(len).unwrap_or(0);
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(FrameError::BadLength {
            what: "startup packet",
            len,
            max: MAX_STARTUP_PACKET,
        });
    }
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    packet.advance(4);
    let code = packet.get_i32();
    let fixed = |expected: usize, what| {
        if len == expected {
            Ok(())
        } else {
            Err(FrameError::Malformed(what))
        }
    };
    match code {
        SSL_REQUEST_CODE => fixed(8, "SSLRequest").map(|()| Some(StartupPacket::SslRequest)),
        GSSENC_REQUEST_CODE => {
            fixed(8, "GSSENCRequest").map(|()| Some(StartupPacket::GssEncRequest))
        }
        CANCEL_REQUEST_CODE => {
            if !(16..=12 + MAX_CANCEL_KEY).contains(&len) {
                return Err(FrameError::Malformed("CancelRequest"));
            }
            let pid = packet.get_i32();
            let key = packet.to_vec();
            Ok(Some(StartupPacket::CancelRequest { pid, key }))
        }
        _ => {
            let [a, b, c, d] = code.to_be_bytes();
            let (major, minor) = (u16::from_be_bytes([a, b]), u16::from_be_bytes([c, d]));
            if major != PROTOCOL_MAJOR_3 {
                return Err(FrameError::UnsupportedProtocol { major, minor });
            }
            let parameters = parse_parameters(&packet)?;
            Ok(Some(StartupPacket::Startup {
                minor_version: minor,
                parameters,
            }))
        }
    }
}

/// Splits a StartupMessage body into name/value pairs: NUL-terminated
/// strings, alternating, ending with an empty name.
fn parse_parameters(body: &[u8]) -> Result<BTreeMap<String, String>, FrameError> {
    let malformed = FrameError::Malformed("StartupMessage parameters");
    let Some((&0, strings)) = body.split_last() else {
        return Err(malformed);
    };
    let mut parameters = BTreeMap::new();
    if strings.is_empty() {
        return Ok(parameters);
    }
    let Some((&0, strings)) = strings.split_last() else {
        return Err(malformed);
    };
    let mut parts = strings.split(|b| *b == 0);
    while let Some(name) = parts.next() {
        let value = parts
            .next()
            .ok_or(FrameError::Malformed("StartupMessage parameters"))?;
        let name =
            std::str::from_utf8(name).map_err(|_| FrameError::Malformed("parameter name"))?;
        let value =
            std::str::from_utf8(value).map_err(|_| FrameError::Malformed("parameter value"))?;
        if name.is_empty() {
            return Err(FrameError::Malformed("StartupMessage parameters"));
        }
        parameters.insert(name.to_owned(), value.to_owned());
    }
    Ok(parameters)
}

/// The password in the body of a PasswordMessage: a NUL-terminated
/// UTF-8 string. Errors describe only the framing, never the content.
pub fn password_text(body: &[u8]) -> Result<String, FrameError> {
    match body.split_last() {
        Some((0, text)) if !text.contains(&0) => String::from_utf8(text.to_vec())
            .map_err(|_| FrameError::Malformed("password message (not UTF-8)")),
        _ => Err(FrameError::Malformed("password message (bad terminator)")),
    }
}

/// Takes one whole `p` message (PasswordMessage, SASLInitialResponse or
/// SASLResponse: the protocol gives them one tag) from the front of `buf`
/// and returns its body; `Ok(None)` until it is all buffered.
pub fn take_password_message(buf: &mut BytesMut) -> Result<Option<BytesMut>, FrameError> {
    let Some(&[tag, a, b, c, d]) = buf.first_chunk::<5>() else {
        return Ok(None);
    };
    if tag != PASSWORD_TAG {
        return Err(FrameError::UnexpectedMessage(char::from(tag)));
    }
    let len = i32::from_be_bytes([a, b, c, d]);
    let len = usize::try_from(len).unwrap_or(0);
    if !(4..=MAX_PASSWORD_MESSAGE).contains(&len) {
        return Err(FrameError::BadLength {
            what: "password message",
            len,
            max: MAX_PASSWORD_MESSAGE,
        });
    }
    if buf.len() < len + 1 {
        buf.reserve(len + 1 - buf.len());
        return Ok(None);
    }
    let mut message = buf.split_to(len + 1);
    message.advance(5);
    Ok(Some(message))
}

/// A SASLInitialResponse: the mechanism the client chose and its first
/// message (`None` when the client sent none, length -1).
#[derive(Debug, PartialEq, Eq)]
pub struct SaslInitialResponse<'a> {
    /// The mechanism's name, e.g. `OAUTHBEARER`.
    pub mechanism: &'a str,
    /// The client's first message.
    pub data: Option<&'a [u8]>,
}

/// Parses the body of a SASLInitialResponse (see [`take_password_message`]).
pub fn parse_sasl_initial_response(body: &[u8]) -> Result<SaslInitialResponse<'_>, FrameError> {
    let malformed = || FrameError::Malformed("SASLInitialResponse");
    let end = body.iter().position(|&b| b == 0).ok_or_else(malformed)?;
    let (name, rest) = body.split_at(end);
    let mechanism = std::str::from_utf8(name).map_err(|_| malformed())?;
    let rest = rest.get(1..).ok_or_else(malformed)?;
    let Some((len, data)) = rest.split_first_chunk::<4>() else {
        return Err(malformed());
    };
    let data = match i32::from_be_bytes(*len) {
        -1 if data.is_empty() => None,
        len if usize::try_from(len).is_ok_and(|len| len == data.len()) => Some(data),
        _ => return Err(malformed()),
    };
    Ok(SaslInitialResponse { mechanism, data })
}

/// A CancelRequest for backend `pid` with cancel `key` (4 bytes in
/// protocol 3.0, longer in 3.2).
pub fn cancel_request(pid: i32, key: &[u8]) -> Vec<u8> {
    let length = i32::try_from(12 + key.len()).unwrap_or(i32::MAX);
    let mut out = Vec::with_capacity(12 + key.len());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(key);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut as _;

    fn startup_bytes(params: &[(&str, &str)]) -> BytesMut {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(params.iter().copied(), &mut buf)
            .expect("encodable");
        buf
    }

    #[test]
    fn startup_parses_parameters_and_keeps_trailing_bytes() {
        let mut buf = startup_bytes(&[("user", "authenticated"), ("database", "app")]);
        buf.put_slice(b"p-next");
        let packet = parse_startup_packet(&mut buf)
            .expect("valid")
            .expect("complete");
        let StartupPacket::Startup {
            minor_version,
            parameters,
        } = packet
        else {
            panic!("expected startup, got {packet:?}");
        };
        assert_eq!(minor_version, 0);
        assert_eq!(parameters["user"], "authenticated");
        assert_eq!(parameters["database"], "app");
        assert_eq!(&buf[..], b"p-next");
    }

    #[test]
    fn startup_waits_for_whole_packet() {
        let full = startup_bytes(&[("user", "u")]);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(parse_startup_packet(&mut part), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn special_requests() {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut buf);
        postgres_protocol::message::frontend::cancel_request(7, 42, &mut buf);
        buf.put_i32(8);
        buf.put_i32(GSSENC_REQUEST_CODE);
        assert_eq!(
            parse_startup_packet(&mut buf),
            Ok(Some(StartupPacket::SslRequest))
        );
        assert_eq!(
            parse_startup_packet(&mut buf),
            Ok(Some(StartupPacket::CancelRequest {
                pid: 7,
                key: 42i32.to_be_bytes().to_vec()
            }))
        );
        assert_eq!(
            parse_startup_packet(&mut buf),
            Ok(Some(StartupPacket::GssEncRequest))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn cancel_requests_round_trip_with_short_and_long_keys() {
        for key in [vec![1, 2, 3, 4], vec![9; 32]] {
            let mut buf = BytesMut::from(&cancel_request(77, &key)[..]);
            assert_eq!(
                parse_startup_packet(&mut buf),
                Ok(Some(StartupPacket::CancelRequest { pid: 77, key }))
            );
        }
        let mut short = BytesMut::from(&cancel_request(77, &[1, 2])[..]);
        assert!(parse_startup_packet(&mut short).is_err());
    }

    #[test]
    fn oversize_and_undersize_lengths_are_refused() {
        for len in [-1i32, 0, 7, 10_001, i32::MAX] {
            let mut buf = BytesMut::new();
            buf.put_i32(len);
            buf.put_i32(196_608);
            assert!(
                matches!(
                    parse_startup_packet(&mut buf),
                    Err(FrameError::BadLength { .. })
                ),
                "len {len}"
            );
        }
    }

    #[test]
    fn proxy_headers_are_named_not_taken_for_a_length() {
        for sent in [
            &b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c"[..],
            b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
        ] {
            let mut buf = BytesMut::from(sent);
            assert_eq!(parse_startup_packet(&mut buf), Err(FrameError::ProxyHeader));
        }
    }

    #[test]
    fn startup_parameters_must_be_well_formed() {
        for body in [&b"user\0"[..], b"user\0x\0", b"user\0x", b"\0x\0\0"] {
            let mut buf = BytesMut::new();
            buf.put_i32(8 + i32::try_from(body.len()).expect("short"));
            buf.put_i32(196_608);
            buf.put_slice(body);
            assert!(
                matches!(
                    parse_startup_packet(&mut buf),
                    Err(FrameError::Malformed(_))
                ),
                "{body:?}"
            );
        }
    }

    #[test]
    fn other_protocol_versions_are_refused() {
        let mut buf = BytesMut::new();
        buf.put_i32(9);
        buf.put_i32(2 << 16);
        buf.put_u8(0);
        assert_eq!(
            parse_startup_packet(&mut buf),
            Err(FrameError::UnsupportedProtocol { major: 2, minor: 0 })
        );
    }

    #[test]
    fn password_message_round_trip_allows_large_tokens() {
        let token = "x".repeat(20_000);
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::password_message(token.as_bytes(), &mut buf)
            .expect("encodable");
        buf.put_u8(b'Q');
        let body = take_password_message(&mut buf)
            .expect("framed")
            .expect("whole");
        assert_eq!(password_text(&body), Ok(token));
        assert_eq!(&buf[..], b"Q");
    }

    #[test]
    fn password_message_limits() {
        let mut buf = BytesMut::new();
        buf.put_u8(b'p');
        buf.put_i32(i32::try_from(MAX_PASSWORD_MESSAGE + 1).expect("fits"));
        assert!(matches!(
            take_password_message(&mut buf),
            Err(FrameError::BadLength { .. })
        ));

        let mut buf = BytesMut::from(&b"Q\0\0\0\x05\0"[..]);
        assert_eq!(
            take_password_message(&mut buf),
            Err(FrameError::UnexpectedMessage('Q'))
        );

        let mut buf = BytesMut::from(&b"p\0\0\0\x07a\0b"[..]);
        let body = take_password_message(&mut buf)
            .expect("framed")
            .expect("whole");
        assert!(matches!(
            password_text(&body),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn sasl_initial_response() {
        let mut buf = BytesMut::new();
        postgres_protocol::message::frontend::sasl_initial_response(
            "OAUTHBEARER",
            b"n,,\x01auth=\x01\x01",
            &mut buf,
        )
        .expect("encodable");
        let body = take_password_message(&mut buf)
            .expect("framed")
            .expect("whole");
        assert_eq!(
            parse_sasl_initial_response(&body),
            Ok(SaslInitialResponse {
                mechanism: "OAUTHBEARER",
                data: Some(b"n,,\x01auth=\x01\x01"),
            })
        );
        let none = b"OAUTHBEARER\0\xff\xff\xff\xff";
        assert_eq!(parse_sasl_initial_response(none).map(|r| r.data), Ok(None));
        for bad in [
            &b"OAUTHBEARER"[..],
            b"OAUTHBEARER\0\0\0",
            b"OAUTHBEARER\0\0\0\0\x05abc",
            b"OAUTHBEARER\0\xff\xff\xff\xffx",
            b"\xff\0\0\0\0\0",
        ] {
            assert!(parse_sasl_initial_response(bad).is_err(), "{bad:?}");
        }
    }
}
