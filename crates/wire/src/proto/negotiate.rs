//! Sans-IO transport negotiation: what the proxy answers to each packet a
//! client sends before its StartupMessage.
//!
//! A client may ask for TLS (SSLRequest), which the proxy grants when it
//! has a certificate and the transport is plain TCP, or for GSSAPI
//! encryption (GSSENCRequest), which it always declines; each at most once,
//! as Postgres allows. Bytes that arrive after either request and before
//! the answer are refused: a man in the middle could have injected them
//! (CVE-2021-23214). The negotiation ends with a StartupMessage, a
//! CancelRequest, or a refusal.
//! See <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-SSL>.

use std::collections::BTreeMap;

use super::startup::StartupPacket;

/// The answer byte refusing an SSLRequest or GSSENCRequest.
pub const REFUSE_ENCRYPTION: u8 = b'N';
/// The answer byte accepting an SSLRequest.
pub const ACCEPT_SSL: u8 = b'S';

/// What the client asked for in its StartupMessage.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Startup {
    /// The protocol minor version asked for (the major is always 3).
    pub minor_version: u16,
    /// Startup parameters: `user`, `database`, `options`, ...
    pub parameters: BTreeMap<String, String>,
}

/// What to do after a packet.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Send this answer byte, then read the next packet.
    Answer(u8),
    /// Send [`ACCEPT_SSL`] and run the TLS handshake, then read the next
    /// packet over TLS.
    StartTls,
    /// The client opens a session.
    Startup(Startup),
    /// The client asks to cancel the query of another session; the
    /// connection ends after it.
    Cancel {
        /// The process id from the client's BackendKeyData.
        pid: i32,
        /// The secret key from the client's BackendKeyData.
        key: Vec<u8>,
    },
}

/// Why a negotiation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationRefusal {
    /// Bytes arrived after an encryption request, before its answer.
    #[error("received unencrypted data after an encryption request")]
    DataBeforeEncryption,
    /// An SSLRequest or GSSENCRequest arrived a second time, or over TLS.
    #[error("unexpected encryption request")]
    RepeatedEncryptionRequest,
}

/// The state of one client's negotiation.
#[derive(Debug)]
pub struct Negotiation {
    /// A TLS handshake can follow an SSLRequest.
    tls_offered: bool,
    /// The transport is already encrypted (TLS, direct or negotiated, or a
    /// secure WebSocket).
    encrypted: bool,
    ssl_requested: bool,
    gss_requested: bool,
}

impl Negotiation {
    /// A negotiation on a transport that is `encrypted` already, or can be
    /// upgraded to TLS when `tls_offered`.
    pub fn new(tls_offered: bool, encrypted: bool) -> Self {
        Self {
            tls_offered: tls_offered && !encrypted,
            encrypted,
            ssl_requested: false,
            gss_requested: false,
        }
    }

    /// The answer to `packet`; `more_buffered` tells whether bytes follow
    /// it that the client sent without waiting for the answer.
    pub fn packet(
        &mut self,
        packet: StartupPacket,
        more_buffered: bool,
    ) -> Result<Next, NegotiationRefusal> {
        match packet {
            StartupPacket::SslRequest => {
                if self.ssl_requested || self.encrypted {
                    return Err(NegotiationRefusal::RepeatedEncryptionRequest);
                }
                self.ssl_requested = true;
                if more_buffered {
                    return Err(NegotiationRefusal::DataBeforeEncryption);
                }
                Ok(if self.tls_offered {
                    Next::StartTls
                } else {
                    Next::Answer(REFUSE_ENCRYPTION)
                })
            }
            StartupPacket::GssEncRequest => {
                if self.gss_requested || self.encrypted {
                    return Err(NegotiationRefusal::RepeatedEncryptionRequest);
                }
                self.gss_requested = true;
                if more_buffered {
                    return Err(NegotiationRefusal::DataBeforeEncryption);
                }
                Ok(Next::Answer(REFUSE_ENCRYPTION))
            }
            StartupPacket::CancelRequest { pid, key } => Ok(Next::Cancel { pid, key }),
            StartupPacket::Startup {
                minor_version,
                parameters,
            } => Ok(Next::Startup(Startup {
                minor_version,
                parameters,
            })),
        }
    }

    /// The TLS handshake after [`Next::StartTls`] succeeded.
    pub fn tls_started(&mut self) {
        self.encrypted = true;
        self.tls_offered = false;
    }

    /// Whether the transport is encrypted.
    pub fn encrypted(&self) -> bool {
        self.encrypted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup() -> StartupPacket {
        StartupPacket::Startup {
            minor_version: 0,
            parameters: BTreeMap::from([("user".into(), "authenticated".into())]),
        }
    }

    #[test]
    fn ssl_is_granted_once_when_offered_then_the_startup_opens_the_session() {
        let mut negotiation = Negotiation::new(true, false);
        assert_eq!(
            negotiation.packet(StartupPacket::SslRequest, false),
            Ok(Next::StartTls)
        );
        negotiation.tls_started();
        assert!(negotiation.encrypted());
        assert_eq!(
            negotiation.packet(StartupPacket::SslRequest, false),
            Err(NegotiationRefusal::RepeatedEncryptionRequest)
        );
        let mut negotiation = Negotiation::new(true, false);
        assert_eq!(
            negotiation.packet(StartupPacket::SslRequest, false),
            Ok(Next::StartTls)
        );
        negotiation.tls_started();
        assert!(matches!(
            negotiation.packet(startup(), false),
            Ok(Next::Startup(_))
        ));
    }

    #[test]
    fn without_a_certificate_or_over_a_settled_transport_ssl_is_declined() {
        let mut negotiation = Negotiation::new(false, false);
        assert_eq!(
            negotiation.packet(StartupPacket::SslRequest, false),
            Ok(Next::Answer(REFUSE_ENCRYPTION))
        );
        assert_eq!(
            negotiation.packet(StartupPacket::GssEncRequest, false),
            Ok(Next::Answer(REFUSE_ENCRYPTION))
        );
        assert!(matches!(
            negotiation.packet(startup(), true),
            Ok(Next::Startup(_))
        ));
        let mut secure_websocket = Negotiation::new(true, true);
        assert_eq!(
            secure_websocket.packet(StartupPacket::SslRequest, false),
            Err(NegotiationRefusal::RepeatedEncryptionRequest)
        );
    }

    #[test]
    fn bytes_sent_before_the_answer_are_refused() {
        for packet in [StartupPacket::SslRequest, StartupPacket::GssEncRequest] {
            assert_eq!(
                Negotiation::new(true, false).packet(packet, true),
                Err(NegotiationRefusal::DataBeforeEncryption)
            );
        }
    }

    #[test]
    fn each_request_only_once_and_cancel_ends_the_negotiation() {
        let mut negotiation = Negotiation::new(false, false);
        for _ in 0..2 {
            let _ = negotiation.packet(StartupPacket::GssEncRequest, false);
        }
        assert_eq!(
            negotiation.packet(StartupPacket::GssEncRequest, false),
            Err(NegotiationRefusal::RepeatedEncryptionRequest)
        );
        let cancel = StartupPacket::CancelRequest {
            pid: 7,
            key: vec![0, 0, 0, 9],
        };
        assert_eq!(
            Negotiation::new(true, false).packet(cancel, false),
            Ok(Next::Cancel {
                pid: 7,
                key: vec![0, 0, 0, 9]
            })
        );
    }
}
