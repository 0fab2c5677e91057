//! Sans-IO: the proxy's own login to the upstream server as a role, from
//! its StartupMessage to the first ReadyForQuery
//! ([flow](https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-START-UP)).
//!
//! [`UpstreamLogin::message`] takes each server message (tag and body) and says
//! what to send back; the caller moves the bytes. It answers cleartext,
//! MD5 and SCRAM-SHA-256 password requests with the proxy's credential for
//! the role (SCRAM's nonce is passed in, so tests replay exchanges byte for
//! byte) and collects ParameterStatus and BackendKeyData. A server that
//! skips SCRAM's final proof, or asks for a method the proxy does not
//! speak, is refused.

use bytes::{BufMut as _, BytesMut};
use postgres_protocol::message::frontend;

use super::scram::{SCRAM_SHA_256, ScramClient, ScramError};
use super::server_error::ServerError;

/// Protocol major version 3, in the top half of the version code.
const PROTOCOL_3: i32 = 3 << 16;

/// Why a login failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// The server refused the login (wrong password, no such database,
    /// too many connections, ...).
    #[error("the server refused the login: {0}")]
    Refused(ServerError),
    /// The server asked for a method the proxy does not speak.
    #[error("the server asked for unsupported authentication ({0})")]
    UnsupportedAuth(&'static str),
    /// The server asked for a password and the proxy has none for the role.
    #[error("the server asked for a password, and none is configured for the role")]
    NoPassword,
    /// The SCRAM exchange failed.
    #[error(transparent)]
    Scram(#[from] ScramError),
    /// The server sent something out of the protocol.
    #[error("unexpected server message during login: {0}")]
    Protocol(&'static str),
}

/// What to do after a server message.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Read the next message (anything to send is in the output buffer).
    Continue,
    /// The login is complete: the server is ready for queries.
    Ready,
}

/// What the server told the proxy during login.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Established {
    /// ParameterStatus values, in the order sent.
    pub parameters: Vec<(String, String)>,
    /// The backend's process id.
    pub pid: i32,
    /// The backend's cancel key (4 bytes in protocol 3.0, up to 256 in 3.2).
    pub cancel_key: Vec<u8>,
    /// The protocol minor version in use.
    pub minor_version: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Authenticating,
    /// SCRAM sent its proof; the server's signature must come next.
    AwaitingScramFinal,
    /// SCRAM verified: only AuthenticationOk may follow.
    ScramVerified,
    Authenticated,
}

/// One login in progress.
pub struct UpstreamLogin {
    password: Option<String>,
    user: String,
    scram_nonce: String,
    scram: Option<ScramClient>,
    phase: Phase,
    established: Established,
}

/// Appends a StartupMessage for `user` and `database` with `parameters`,
/// asking for protocol 3.`minor_version`.
pub fn startup_message(
    user: &str,
    database: &str,
    parameters: &[(String, String)],
    minor_version: u16,
    out: &mut BytesMut,
) {
    let start = out.len();
    out.put_i32(0);
    out.put_i32(PROTOCOL_3 | i32::from(minor_version));
    let pairs = [("user", user), ("database", database)]
        .into_iter()
        .chain(parameters.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    for (name, value) in pairs {
        // Strings from the client's startup packet hold no NUL: it ends them.
        for text in [name, value] {
            out.put_slice(text.as_bytes());
            out.put_u8(0);
        }
    }
    out.put_u8(0);
    let length = i32::try_from(out.len() - start).unwrap_or(i32::MAX);
    if let Some(field) = out.get_mut(start..start + 4) {
        field.copy_from_slice(&length.to_be_bytes());
    }
}

impl UpstreamLogin {
    /// A login as `user` with `password` (`None`: trust) that asked for
    /// protocol 3.`minor_version`, using `scram_nonce` if the server asks
    /// for SCRAM.
    pub fn new(
        user: &str,
        password: Option<&str>,
        minor_version: u16,
        scram_nonce: String,
    ) -> Self {
        Self {
            password: password.map(str::to_owned),
            user: user.to_owned(),
            scram_nonce,
            scram: None,
            phase: Phase::Authenticating,
            established: Established {
                minor_version,
                ..Established::default()
            },
        }
    }

    /// Takes one server message; appends any answer to `out`.
    pub fn message(
        &mut self,
        tag: u8,
        body: &[u8],
        out: &mut BytesMut,
    ) -> Result<Step, LoginError> {
        match (self.phase, tag) {
            (_, b'E') => Err(LoginError::Refused(ServerError::parse(body))),
            (_, b'N') => Ok(Step::Continue),
            (Phase::Authenticated, _) => self.after_authentication(tag, body),
            (_, b'R') => self.authentication(body, out),
            (_, b'v') => self.negotiated(body).map(|()| Step::Continue),
            _ => Err(LoginError::Protocol(
                "a message before authentication ended",
            )),
        }
    }

    /// What the server told the proxy; complete once [`Step::Ready`].
    pub fn established(self) -> Established {
        self.established
    }

    fn password(&self) -> Result<&str, LoginError> {
        self.password.as_deref().ok_or(LoginError::NoPassword)
    }

    fn authentication(&mut self, body: &[u8], out: &mut BytesMut) -> Result<Step, LoginError> {
        let (code, data) = take_i32(body).ok_or(LoginError::Protocol("short authentication"))?;
        match (self.phase, code) {
            (Phase::Authenticating | Phase::ScramVerified, 0) => {
                if self.phase == Phase::Authenticating && self.scram.is_some() {
                    return Err(LoginError::Protocol(
                        "SCRAM ended without the server's proof",
                    ));
                }
                self.phase = Phase::Authenticated;
            }
            (Phase::Authenticating, 3) => {
                frontend::password_message(self.password()?.as_bytes(), out)
                    .map_err(|_| LoginError::Protocol("the password cannot be sent"))?;
            }
            (Phase::Authenticating, 5) => {
                let salt: [u8; 4] = data
                    .try_into()
                    .map_err(|_| LoginError::Protocol("MD5 salt"))?;
                let hash = postgres_protocol::authentication::md5_hash(
                    self.user.as_bytes(),
                    self.password()?.as_bytes(),
                    salt,
                );
                frontend::password_message(hash.as_bytes(), out)
                    .map_err(|_| LoginError::Protocol("the password cannot be sent"))?;
            }
            (Phase::Authenticating, 10) if self.scram.is_none() => {
                let offered = data
                    .split(|&b| b == 0)
                    .any(|mechanism| mechanism == SCRAM_SHA_256.as_bytes());
                if !offered {
                    return Err(LoginError::UnsupportedAuth("SASL without SCRAM-SHA-256"));
                }
                let scram = ScramClient::new("", self.password()?, self.scram_nonce.clone());
                frontend::sasl_initial_response(SCRAM_SHA_256, &scram.client_first(), out)
                    .map_err(|_| LoginError::Protocol("the SCRAM message cannot be sent"))?;
                self.scram = Some(scram);
            }
            (Phase::Authenticating, 11) => {
                let scram = self
                    .scram
                    .as_mut()
                    .ok_or(LoginError::Protocol("SASL continue before SASL"))?;
                let answer = scram.client_final(data)?;
                frontend::sasl_response(&answer, out)
                    .map_err(|_| LoginError::Protocol("the SCRAM message cannot be sent"))?;
                self.phase = Phase::AwaitingScramFinal;
            }
            (Phase::AwaitingScramFinal, 12) => {
                let scram = self
                    .scram
                    .as_ref()
                    .ok_or(LoginError::Protocol("SASL final before SASL"))?;
                scram.verify_server_final(data)?;
                self.phase = Phase::ScramVerified;
            }
            (Phase::AwaitingScramFinal, 0) => {
                return Err(LoginError::Protocol(
                    "SCRAM ended without the server's proof",
                ));
            }
            (_, 2 | 7 | 8 | 9) => return Err(LoginError::UnsupportedAuth("GSS/SSPI/Kerberos")),
            _ => {
                return Err(LoginError::Protocol(
                    "an authentication request out of order",
                ));
            }
        }
        Ok(Step::Continue)
    }

    fn after_authentication(&mut self, tag: u8, body: &[u8]) -> Result<Step, LoginError> {
        match tag {
            b'S' => {
                let mut strings = body.split(|&b| b == 0);
                let (Some(name), Some(value)) = (strings.next(), strings.next()) else {
                    return Err(LoginError::Protocol("malformed ParameterStatus"));
                };
                let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
                self.established.parameters.push((text(name), text(value)));
            }
            b'K' => {
                let (pid, key) = take_i32(body).ok_or(LoginError::Protocol("BackendKeyData"))?;
                if !(4..=super::startup::MAX_CANCEL_KEY).contains(&key.len()) {
                    return Err(LoginError::Protocol("BackendKeyData key length"));
                }
                self.established.pid = pid;
                self.established.cancel_key = key.to_vec();
            }
            b'Z' => return Ok(Step::Ready),
            b'v' => self.negotiated(body)?,
            _ => return Err(LoginError::Protocol("a message before ReadyForQuery")),
        }
        Ok(Step::Continue)
    }

    /// NegotiateProtocolVersion: the server speaks an older minor version
    /// (sent as the full version code, or as the minor alone by older
    /// servers) and none of the options named.
    fn negotiated(&mut self, body: &[u8]) -> Result<(), LoginError> {
        let (version, _) =
            take_i32(body).ok_or(LoginError::Protocol("NegotiateProtocolVersion"))?;
        let [major_high, major_low, minor_high, minor_low] = version.to_be_bytes();
        let minor = u16::from_be_bytes([minor_high, minor_low]);
        match u16::from_be_bytes([major_high, major_low]) {
            0 | 3 if minor <= self.established.minor_version => {
                self.established.minor_version = minor;
                Ok(())
            }
            _ => Err(LoginError::Protocol("NegotiateProtocolVersion")),
        }
    }
}

/// Splits a big-endian i32 off the front of `bytes`.
fn take_i32(bytes: &[u8]) -> Option<(i32, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<4>()?;
    Some((i32::from_be_bytes(*head), rest))
}

#[cfg(test)]
mod tests;
