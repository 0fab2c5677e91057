//! Connections relayed by a load balancer that speaks the PROXY protocol
//! (v2): where the client really connects from.
//!
//! Behind a TCP balancer every connection comes from the balancer's
//! address, so per-address limits, logs, `/clients` and the rule that
//! tokens travel in cleartext only from loopback would all see the
//! balancer. A listener's `proxy_protocol_from` names the peers trusted to
//! say otherwise: a connection from one of them must begin with a version
//! 2 header, read here under a deadline before anything else (TLS, the
//! SSLRequest, HTTP), and the header's source address becomes the client's
//! address for everything after. A LOCAL header (a health check) keeps the
//! peer's own address. Nothing is guessed: a trusted peer that sends no
//! header is refused, and a header from any other peer is refused by the
//! protocol that follows (it is not a Postgres packet, nor HTTP).
//!
//! Trust is the whole point and the whole risk: a trusted peer can claim
//! any client address, loopback included.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout_at};

use crate::proto::proxy_header::{self, FIXED_LEN, Header, HeaderError, Parsed};

/// Headers one listener reads at once. Reading one takes a round trip at
/// most (balancers send it with the connection), and only trusted peers
/// get this far, so the cap is generous: it is there so a misbehaving
/// balancer cannot make the proxy hold sockets without limit before the
/// connection budget (which needs the client's address) sees them.
pub const MAX_HEADER_READS: usize = 1024;

/// An address or CIDR block (`10.0.0.0/8`, `192.0.2.7`, `2001:db8::/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressBlock(IpNet);

/// Why a string is not an [`AddressBlock`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadAddressBlock(String);

impl FromStr for AddressBlock {
    type Err = BadAddressBlock;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if let Ok(address) = text.parse::<IpAddr>() {
            return Ok(Self(IpNet::from(address.to_canonical())));
        }
        let net = text.parse::<IpNet>().map_err(|_| {
            BadAddressBlock(format!(
                "{text:?} is not an IP address or CIDR block (e.g. \"10.0.0.0/8\", \"192.0.2.7\")"
            ))
        })?;
        if net.trunc() != net {
            return Err(BadAddressBlock(format!(
                "{text:?} has bits set past its prefix: did you mean \"{}\"?",
                net.trunc()
            )));
        }
        Ok(Self(net))
    }
}

impl fmt::Display for AddressBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl AddressBlock {
    fn contains(&self, address: IpAddr) -> bool {
        self.0.contains(&address.to_canonical())
    }
}

/// The peers whose connections must begin with a PROXY protocol v2
/// header (a listener's `proxy_protocol_from`); empty trusts nobody.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyProtocolFrom(Vec<AddressBlock>);

impl ProxyProtocolFrom {
    /// Trusts the peers in `blocks`.
    pub fn new(blocks: Vec<AddressBlock>) -> Self {
        Self(blocks)
    }

    /// Whether connections from `peer` must begin with a header.
    pub fn contains(&self, peer: IpAddr) -> bool {
        self.0.iter().any(|block| block.contains(peer))
    }

    /// The blocks trusted, as configured.
    pub fn blocks(&self) -> &[AddressBlock] {
        &self.0
    }
}

/// Why a trusted peer's connection was refused before its first byte of
/// Postgres or HTTP.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderRefusal {
    /// What it sent is not a header we accept (or no header at all).
    #[error("the peer is in proxy_protocol_from, so it must send a PROXY protocol v2 header: {0}")]
    Header(#[from] HeaderError),
    /// The header did not arrive whole in time.
    #[error(
        "the peer is in proxy_protocol_from and sent no whole PROXY protocol v2 header within {0:?}"
    )]
    Timeout(Duration),
    /// The peer closed before the header ended.
    #[error("the peer closed the connection inside its PROXY protocol header")]
    Closed,
    /// Reading failed.
    #[error("reading the PROXY protocol header: {0}")]
    Io(io::Error),
    /// [`MAX_HEADER_READS`] headers are being read already.
    #[error("too many connections sending a PROXY protocol header at once")]
    Busy,
}

/// The PROXY headers being read on one listener.
#[derive(Debug)]
pub struct HeaderReads {
    /// Places for [`MAX_HEADER_READS`] at once.
    reading: Arc<Semaphore>,
}

impl Default for HeaderReads {
    fn default() -> Self {
        Self {
            reading: Arc::new(Semaphore::new(MAX_HEADER_READS)),
        }
    }
}

impl HeaderReads {
    /// Reads the header a trusted `peer` begins its connection with, taking
    /// exactly its bytes off `stream`, within `timeout`; returns the
    /// client's address (`peer` itself for LOCAL).
    pub async fn client_address<S>(
        &self,
        stream: &mut S,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<SocketAddr, HeaderRefusal>
    where
        S: AsyncRead + Unpin,
    {
        let _reading = Arc::clone(&self.reading)
            .try_acquire_owned()
            .map_err(|_| HeaderRefusal::Busy)?;
        let deadline = Instant::now() + timeout;
        let header = timeout_at(deadline, read_header(stream))
            .await
            .map_err(|_| HeaderRefusal::Timeout(timeout))??;
        Ok(match header {
            Header::Local => peer,
            Header::Proxy { source, .. } => source,
        })
    }
}

/// Reads one header, never a byte past it: what follows belongs to the
/// client's protocol.
async fn read_header<S>(stream: &mut S) -> Result<Header, HeaderRefusal>
where
    S: AsyncRead + Unpin,
{
    let mut buf = vec![0; FIXED_LEN];
    let mut filled = 0;
    loop {
        let seen = buf.get(..filled).unwrap_or_default();
        let total = match proxy_header::parse(seen)? {
            Parsed::Complete { header, .. } => return Ok(header),
            Parsed::Incomplete { total } => total,
        };
        buf.resize(total, 0);
        let Some(unread) = buf.get_mut(filled..) else {
            return Err(HeaderRefusal::Closed);
        };
        match stream.read(unread).await {
            Ok(0) => return Err(HeaderRefusal::Closed),
            Ok(read) => filled += read,
            Err(error) => return Err(HeaderRefusal::Io(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt as _;

    use super::*;

    fn peer() -> SocketAddr {
        "10.0.0.5:50000".parse().expect("address")
    }

    fn header(source: &str) -> Vec<u8> {
        let source = source.parse().expect("address");
        let mut out = Vec::new();
        proxy_header::encode(Some((source, peer())), b"", &mut out);
        out
    }

    #[test]
    fn blocks_parse_from_addresses_and_cidrs_and_say_what_is_wrong() {
        let trusted = ProxyProtocolFrom::new(
            [
                "10.0.0.0/8",
                "192.0.2.7",
                "2001:db8::/32",
                "::ffff:198.51.100.1",
            ]
            .iter()
            .map(|text| text.parse().expect("valid"))
            .collect(),
        );
        for (address, expected) in [
            ("10.200.0.1", true),
            ("11.0.0.1", false),
            ("192.0.2.7", true),
            ("192.0.2.8", false),
            ("2001:db8::1", true),
            ("::ffff:10.0.0.1", true),
            ("198.51.100.1", true),
        ] {
            let address: IpAddr = address.parse().expect("address");
            assert_eq!(trusted.contains(address), expected, "{address}");
        }
        assert!(!ProxyProtocolFrom::default().contains(IpAddr::from([127, 0, 0, 1])));
        let error = "10.0.0.1/8".parse::<AddressBlock>().expect_err("host bits");
        assert!(error.0.contains("did you mean \"10.0.0.0/8\""), "{error}");
        let error = "balancer".parse::<AddressBlock>().expect_err("a name");
        assert!(
            error.0.contains("not an IP address or CIDR block"),
            "{error}"
        );
        assert!("10.0.0.0/33".parse::<AddressBlock>().is_err());
    }

    #[tokio::test]
    async fn the_header_is_taken_exactly_and_the_rest_left() {
        let (mut ours, mut theirs) = tokio::io::duplex(1024);
        let mut sent = header("192.0.2.44:1234");
        sent.extend_from_slice(b"\x00\x00\x00\x08\x04\xd2\x16\x2f");
        theirs.write_all(&sent).await.expect("write");
        let reads = HeaderReads::default();
        let client = reads
            .client_address(&mut ours, peer(), Duration::from_secs(1))
            .await
            .expect("a header");
        assert_eq!(client, "192.0.2.44:1234".parse().expect("address"));
        let mut rest = [0; 8];
        ours.read_exact(&mut rest).await.expect("the SSLRequest");
        assert_eq!(&rest, b"\x00\x00\x00\x08\x04\xd2\x16\x2f");
    }

    #[tokio::test]
    async fn local_keeps_the_peer() {
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        let mut local = Vec::new();
        proxy_header::encode(None, b"", &mut local);
        theirs.write_all(&local).await.expect("write");
        let client = HeaderReads::default()
            .client_address(&mut ours, peer(), Duration::from_secs(1))
            .await
            .expect("LOCAL");
        assert_eq!(client, peer());
    }

    #[tokio::test(start_paused = true)]
    async fn missing_partial_and_closed_headers_are_refused() {
        let reads = HeaderReads::default();
        // An SSLRequest is refused at once, not after the deadline.
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        theirs
            .write_all(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")
            .await
            .expect("write");
        let started = Instant::now();
        let refused = reads
            .client_address(&mut ours, peer(), Duration::from_secs(5))
            .await;
        assert!(matches!(
            refused,
            Err(HeaderRefusal::Header(HeaderError::Missing))
        ));
        assert_eq!(started.elapsed(), Duration::ZERO);
        // Half a header, then silence: the deadline.
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        theirs
            .write_all(&header("192.0.2.1:1")[..20])
            .await
            .expect("write");
        let refused = reads
            .client_address(&mut ours, peer(), Duration::from_secs(5))
            .await;
        assert!(matches!(refused, Err(HeaderRefusal::Timeout(_))));
        // Half a header, then EOF.
        let (mut ours, mut theirs) = tokio::io::duplex(64);
        theirs
            .write_all(&header("192.0.2.1:1")[..20])
            .await
            .expect("write");
        drop(theirs);
        let refused = reads
            .client_address(&mut ours, peer(), Duration::from_secs(5))
            .await;
        assert!(matches!(refused, Err(HeaderRefusal::Closed)));
    }

    #[tokio::test]
    async fn reads_beyond_the_cap_are_refused() {
        let reads = HeaderReads::default();
        let held = Arc::clone(&reads.reading)
            .acquire_many_owned(u32::try_from(MAX_HEADER_READS).expect("fits"))
            .await
            .expect("places");
        let (mut ours, _theirs) = tokio::io::duplex(64);
        let refused = reads
            .client_address(&mut ours, peer(), Duration::from_secs(5))
            .await;
        assert!(matches!(refused, Err(HeaderRefusal::Busy)));
        drop(held);
    }
}
