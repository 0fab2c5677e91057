//! The first phase of a session: reading startup-phase packets and
//! answering them as [`crate::proto::negotiate`] decides, switching to TLS
//! when it says so, until the client opens a session or asks for a cancel.
//! One loop serves TCP (where TLS can start, by SSLRequest or directly) and
//! transports whose security is settled already (WebSocket).

use std::future::Future;
use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite};
use tokio::net::TcpStream;

use super::write_flush;
use crate::error::{ProtocolViolation, SessionError};
use crate::proto::negotiate::{ACCEPT_SSL, Negotiation, Next, Startup};
use crate::proto::startup::{StartupPacket, parse_startup_packet};
use crate::transport::{ALPN_POSTGRESQL, ClientStream, TLS_HANDSHAKE_BYTE};

/// How the negotiation ended.
pub(super) enum Opened<S> {
    /// A StartupMessage: the session goes on over `stream`, with `inbox`
    /// holding what the client sent after it (a pipelined password).
    Session {
        stream: S,
        inbox: BytesMut,
        startup: Startup,
        encrypted: bool,
    },
    /// A CancelRequest for another session.
    Cancel { pid: i32, key: Vec<u8> },
    /// The client closed before asking for anything.
    Closed,
}

/// A refused negotiation, with the stream if the refusal can still be
/// written to it.
pub(super) struct Failed<S> {
    pub(super) stream: Option<S>,
    pub(super) error: SessionError,
}

impl<S> Failed<S> {
    fn new(stream: Option<S>, error: impl Into<SessionError>) -> Self {
        Self {
            stream,
            error: error.into(),
        }
    }
}

/// Negotiates over TCP: direct TLS (first byte 0x16, ALPN "postgresql"),
/// SSLRequest when `tls` is configured, or plaintext.
pub(super) async fn over_tcp(
    tcp: TcpStream,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<Opened<ClientStream>, Failed<ClientStream>> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await {
        Ok(0) => return Ok(Opened::Closed),
        Ok(_) => {}
        Err(error) => return Err(Failed::new(None, SessionError::ClientIo(error))),
    }
    if first == [TLS_HANDSHAKE_BYTE] {
        let Some(acceptor) = tls else {
            return Err(Failed::new(None, SessionError::MissingAlpn));
        };
        let stream = match acceptor.accept(tcp).await {
            Ok(tls) if tls.get_ref().1.alpn_protocol() == Some(ALPN_POSTGRESQL) => {
                ClientStream::Tls(Box::new(tls))
            }
            Ok(_) => return Err(Failed::new(None, SessionError::MissingAlpn)),
            Err(error) => return Err(Failed::new(None, SessionError::Tls(error))),
        };
        return drive(stream, Negotiation::new(false, true), None::<Never<_>>).await;
    }
    let upgrade = tls.map(|acceptor| {
        let acceptor = acceptor.clone();
        move |stream: ClientStream| async move {
            match stream {
                ClientStream::Plain(tcp) => {
                    Ok(ClientStream::Tls(Box::new(acceptor.accept(tcp).await?)))
                }
                tls @ ClientStream::Tls(_) => Ok(tls),
            }
        }
    });
    let negotiation = Negotiation::new(upgrade.is_some(), false);
    drive(ClientStream::Plain(tcp), negotiation, upgrade).await
}

/// Negotiates over a transport whose security is settled (`encrypted` or
/// not): encryption requests are declined.
pub(super) async fn settled<S>(stream: S, encrypted: bool) -> Result<Opened<S>, Failed<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    drive(stream, Negotiation::new(false, encrypted), None::<Never<S>>).await
}

/// The type of the upgrade of a transport that never switches to TLS.
type Never<S> = fn(S) -> std::future::Ready<io::Result<S>>;

async fn drive<S, U, F>(
    mut stream: S,
    mut negotiation: Negotiation,
    mut upgrade: Option<U>,
) -> Result<Opened<S>, Failed<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
    U: FnOnce(S) -> F,
    F: Future<Output = io::Result<S>>,
{
    let mut inbox = BytesMut::with_capacity(1024);
    loop {
        let packet = match read_packet(&mut stream, &mut inbox).await {
            Ok(Some(packet)) => packet,
            Ok(None) => return Ok(Opened::Closed),
            Err(error) => return Err(Failed::new(Some(stream), error)),
        };
        let next = match negotiation.packet(packet, !inbox.is_empty()) {
            Ok(next) => next,
            Err(refusal) => {
                return Err(Failed::new(Some(stream), ProtocolViolation::from(refusal)));
            }
        };
        match next {
            Next::Answer(byte) => {
                if let Err(error) = write_flush(&mut stream, &[byte]).await {
                    return Err(Failed::new(None, SessionError::ClientIo(error)));
                }
            }
            Next::StartTls => {
                let Some(upgrade) = upgrade.take() else {
                    // The negotiation offers TLS only when it can start.
                    return Err(Failed::new(None, SessionError::MissingAlpn));
                };
                if let Err(error) = write_flush(&mut stream, &[ACCEPT_SSL]).await {
                    return Err(Failed::new(None, SessionError::ClientIo(error)));
                }
                stream = match upgrade(stream).await {
                    Ok(stream) => stream,
                    Err(error) => return Err(Failed::new(None, SessionError::Tls(error))),
                };
                negotiation.tls_started();
            }
            Next::Startup(startup) => {
                return Ok(Opened::Session {
                    stream,
                    inbox,
                    startup,
                    encrypted: negotiation.encrypted(),
                });
            }
            Next::Cancel { pid, key } => return Ok(Opened::Cancel { pid, key }),
        }
    }
}

/// Reads one startup-phase packet; `Ok(None)` on a clean EOF.
async fn read_packet<S>(
    stream: &mut S,
    inbox: &mut BytesMut,
) -> Result<Option<StartupPacket>, SessionError>
where
    S: AsyncRead + Unpin,
{
    loop {
        if let Some(packet) = parse_startup_packet(inbox).map_err(ProtocolViolation::from)? {
            return Ok(Some(packet));
        }
        if stream
            .read_buf(inbox)
            .await
            .map_err(SessionError::ClientIo)?
            == 0
        {
            return Ok(None);
        }
    }
}
