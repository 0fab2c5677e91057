//! Sans-IO parsing of the PROXY protocol version 2 header a load balancer
//! (HAProxy's `send-proxy-v2`, AWS NLB, ...) puts in front of a TCP
//! connection to say where the client really connects from.
//!
//! ```text
//! signature (12)  ver/cmd (1)  family/transport (1)  length (2, BE)  addresses, then TLVs (length)
//! \r\n\r\n\0\r\nQUIT\n  0x21 PROXY   0x11 TCP/IPv4                    src, dst, sport, dport
//!                       0x20 LOCAL   0x21 TCP/IPv6
//! ```
//!
//! [`parse`] takes the bytes read so far and says how many it needs in all
//! ([`Parsed::Incomplete`]), so a reader takes exactly the header off the
//! socket and leaves what follows (an SSLRequest, a TLS ClientHello) for
//! the next phase. It refuses as soon as the bytes seen cannot start a
//! valid header, so a peer that sends something else is turned away
//! without waiting for bytes that would change nothing. Version 1 (text)
//! is refused, by name. TLVs are skipped unread.
//!
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>,
//! section 2.2.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12 bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The fixed part: signature, version and command, family and transport,
/// length.
pub const FIXED_LEN: usize = 16;

/// Largest address-and-TLV block accepted, in bytes. HAProxy's own TLVs
/// (ALPN, authority, unique id, SSL details) fit in a few hundred; the
/// format allows 65,535, which a peer could use to make us hold that much
/// per connection for nothing.
pub const MAX_PAYLOAD: usize = 2048;

/// What a version 1 header starts with.
const V1_PREFIX: &[u8; 5] = b"PROXY";
/// The version, in the high nibble of byte 13.
const VERSION_2: u8 = 0x2;
/// Commands, in the low nibble of byte 13.
const COMMAND_LOCAL: u8 = 0x0;
const COMMAND_PROXY: u8 = 0x1;
/// Family and transport (byte 14) of TCP over IPv4 and IPv6.
const TCP_OVER_IPV4: u8 = 0x11;
const TCP_OVER_IPV6: u8 = 0x21;
/// The address blocks of those families: source and destination address,
/// then source and destination port.
const IPV4_ADDRESSES: usize = 4 + 4 + 2 + 2;
const IPV6_ADDRESSES: usize = 16 + 16 + 2 + 2;

/// A complete header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The balancer speaks for itself (a health check): the connection's
    /// own endpoints stand.
    Local,
    /// A client's connection relayed.
    Proxy {
        /// Where the client connects from (IPv4-mapped IPv6 addresses are
        /// given as IPv4).
        source: SocketAddr,
        /// The address the client connected to, on the balancer.
        destination: SocketAddr,
    },
}

/// What the bytes so far amount to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed: `total` in all, counted from the first.
    Incomplete {
        /// Bytes the header (or the part of it that tells more) takes.
        total: usize,
    },
    /// A header of `len` bytes; anything after them is the client's.
    Complete {
        /// The header.
        header: Header,
        /// Its length in bytes.
        len: usize,
    },
}

/// Why the bytes are not a header we accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The bytes do not start with the version 2 signature.
    #[error("no PROXY protocol v2 header (the connection does not start with its signature)")]
    Missing,
    /// A version 1 (text) header, which is not supported.
    #[error("a PROXY protocol v1 (text) header: only v2 is supported (HAProxy: send-proxy-v2)")]
    Version1,
    /// The signature, then a version other than 2.
    #[error("PROXY protocol version {0} is not supported (only 2)")]
    Version(u8),
    /// A command other than LOCAL or PROXY.
    #[error("unknown PROXY protocol command {0:#x}")]
    Command(u8),
    /// A PROXY command for something other than TCP over IPv4 or IPv6:
    /// there is no client address to take.
    #[error(
        "PROXY protocol family/transport {0:#04x} is not TCP over IPv4 or IPv6: no client address"
    )]
    Family(u8),
    /// The length leaves no room for the family's addresses.
    #[error("PROXY protocol header of {len} bytes is too short for its addresses ({needed})")]
    TooShort {
        /// The announced length.
        len: usize,
        /// The family's address block.
        needed: usize,
    },
    /// The length is over [`MAX_PAYLOAD`].
    #[error("PROXY protocol header of {len} bytes is over the limit of {max}")]
    TooLong {
        /// The announced length.
        len: usize,
        /// [`MAX_PAYLOAD`].
        max: usize,
    },
}

/// Parses the header at the front of `buf`, which may hold less than a
/// header (then [`Parsed::Incomplete`] says how much to read) or more (the
/// bytes after [`Parsed::Complete`]'s `len` are not looked at).
pub fn parse(buf: &[u8]) -> Result<Parsed, HeaderError> {
    let seen = buf.len().min(SIGNATURE.len());
    if buf.get(..seen) != SIGNATURE.get(..seen) {
        return Err(not_v2(buf));
    }
    let Some(fixed) = buf.first_chunk::<FIXED_LEN>() else {
        return Ok(Parsed::Incomplete { total: FIXED_LEN });
    };
    let [.., version_command, family, len_high, len_low] = *fixed;
    let version = version_command >> 4;
    if version != VERSION_2 {
        return Err(HeaderError::Version(version));
    }
    let proxied = match version_command & 0x0f {
        COMMAND_LOCAL => false,
        COMMAND_PROXY => true,
        command => return Err(HeaderError::Command(command)),
    };
    let len = usize::from(u16::from_be_bytes([len_high, len_low]));
    if len > MAX_PAYLOAD {
        return Err(HeaderError::TooLong {
            len,
            max: MAX_PAYLOAD,
        });
    }
    if proxied {
        let needed = match family {
            TCP_OVER_IPV4 => IPV4_ADDRESSES,
            TCP_OVER_IPV6 => IPV6_ADDRESSES,
            other => return Err(HeaderError::Family(other)),
        };
        if len < needed {
            return Err(HeaderError::TooShort { len, needed });
        }
    }
    let total = FIXED_LEN + len;
    let Some(payload) = buf.get(FIXED_LEN..total) else {
        return Ok(Parsed::Incomplete { total });
    };
    let header = if proxied {
        addresses(family, payload).ok_or(HeaderError::Family(family))?
    } else {
        Header::Local
    };
    Ok(Parsed::Complete { header, len: total })
}

/// What bytes that are not a version 2 header are: bytes that start like
/// "PROXY" are taken for version 1 (no Postgres packet or TLS record starts
/// with "P", and HTTP's "POST" parts at the second byte).
fn not_v2(buf: &[u8]) -> HeaderError {
    let seen = buf.len().min(V1_PREFIX.len());
    if seen > 0 && buf.get(..seen) == V1_PREFIX.get(..seen) {
        HeaderError::Version1
    } else {
        HeaderError::Missing
    }
}

/// Whether `buf` may be the start of a PROXY header of either version: for
/// a listener that expects none, to say what it was sent.
pub fn looks_like_header(buf: &[u8]) -> bool {
    let seen = buf.len().min(SIGNATURE.len());
    let v1 = buf.len().min(V1_PREFIX.len());
    !buf.is_empty()
        && (buf.get(..seen) == SIGNATURE.get(..seen) || buf.get(..v1) == V1_PREFIX.get(..v1))
}

/// The source and destination of a PROXY header's address block (checked
/// long enough by the caller).
fn addresses(family: u8, payload: &[u8]) -> Option<Header> {
    let (source, destination, ports) = match family {
        TCP_OVER_IPV4 => {
            let (source, rest) = payload.split_first_chunk::<4>()?;
            let (destination, rest) = rest.split_first_chunk::<4>()?;
            let source = IpAddr::V4(Ipv4Addr::from(*source));
            (source, IpAddr::V4(Ipv4Addr::from(*destination)), rest)
        }
        TCP_OVER_IPV6 => {
            let (source, rest) = payload.split_first_chunk::<16>()?;
            let (destination, rest) = rest.split_first_chunk::<16>()?;
            let source = IpAddr::V6(Ipv6Addr::from(*source));
            (source, IpAddr::V6(Ipv6Addr::from(*destination)), rest)
        }
        _ => return None,
    };
    let [sport_high, sport_low, dport_high, dport_low] = *ports.first_chunk::<4>()?;
    Some(Header::Proxy {
        source: SocketAddr::new(
            source.to_canonical(),
            u16::from_be_bytes([sport_high, sport_low]),
        ),
        destination: SocketAddr::new(
            destination.to_canonical(),
            u16::from_be_bytes([dport_high, dport_low]),
        ),
    })
}

/// Encodes a header, as a balancer would send it: for tests and tools.
/// `None` is LOCAL; a source and destination of different families are
/// both sent as IPv6.
#[cfg(any(test, feature = "internals"))]
pub fn encode(addresses: Option<(SocketAddr, SocketAddr)>, tlvs: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&SIGNATURE);
    let Some((source, destination)) = addresses else {
        out.push((VERSION_2 << 4) | COMMAND_LOCAL);
        out.push(0x00);
        push_len(tlvs.len(), out);
        out.extend_from_slice(tlvs);
        return;
    };
    out.push((VERSION_2 << 4) | COMMAND_PROXY);
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.push(TCP_OVER_IPV4);
            push_len(IPV4_ADDRESSES + tlvs.len(), out);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (s, d) => {
            let v6 = |ip: IpAddr| match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.push(TCP_OVER_IPV6);
            push_len(IPV6_ADDRESSES + tlvs.len(), out);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out.extend_from_slice(tlvs);
}

/// The length field; a block too long for it is cut at 65,535 (tests only
/// build short ones).
#[cfg(any(test, feature = "internals"))]
fn push_len(len: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
}

#[cfg(test)]
mod tests;
