//! The client side of SCRAM-SHA-256
//! ([RFC 5802](https://www.rfc-editor.org/rfc/rfc5802),
//! [RFC 7677](https://www.rfc-editor.org/rfc/rfc7677)) without channel
//! binding, as Postgres runs it: the proxy proves it knows the role's
//! password without sending it, and checks that the server knows the
//! verifier, so a server that does not cannot impersonate the database.
//!
//! Sans-IO with the nonce passed in, so tests replay a recorded exchange
//! byte for byte (the RFC 7677 example below).

use aws_lc_rs::{constant_time, digest, hmac, pbkdf2};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// The SASL mechanism name.
pub(crate) const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// GS2 header: no channel binding, no authorization identity.
const GS2_HEADER: &str = "n,,";
/// Most PBKDF2 iterations accepted from a server (Postgres uses 4096 by
/// default): a hostile server must not make a login burn seconds of CPU.
const MAX_ITERATIONS: u32 = 1_000_000;
/// Length of a SHA-256 output.
const KEY_LEN: usize = 32;

/// What the server said that does not fit SCRAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    /// The server's message is not well-formed.
    #[error("malformed SCRAM message from the server: {0}")]
    Malformed(&'static str),
    /// The server's nonce does not extend ours.
    #[error("the server's SCRAM nonce does not extend the client's")]
    Nonce,
    /// The server reported an error instead of its signature.
    #[error("the server refused the SCRAM proof")]
    ServerError,
    /// The server's signature is wrong: it does not know the verifier.
    #[error("the server's SCRAM signature is invalid")]
    BadServerSignature,
}

/// A SCRAM-SHA-256 exchange in progress.
pub(crate) struct ScramClient {
    /// The password after SASLprep.
    password: Vec<u8>,
    /// `n=<user>,r=<client nonce>`.
    client_first_bare: String,
    client_nonce: String,
    /// The signature the server must send, once the proof is computed.
    expected_server_signature: Option<[u8; KEY_LEN]>,
}

impl ScramClient {
    /// Starts an exchange for `password` with `client_nonce` (printable,
    /// no commas). Postgres takes the user from the startup packet, so it
    /// is sent empty: `user` is there for the RFC's test vector.
    pub(crate) fn new(user: &str, password: &str, client_nonce: String) -> Self {
        // RFC 7677 asks for SASLprep; a password it cannot prepare is used
        // as is, as Postgres does.
        let password = stringprep::saslprep(password)
            .map(|prepared| prepared.into_owned().into_bytes())
            .unwrap_or_else(|_| password.as_bytes().to_vec());
        Self {
            password,
            client_first_bare: format!("n={user},r={client_nonce}"),
            client_nonce,
            expected_server_signature: None,
        }
    }

    /// The client-first-message.
    pub(crate) fn client_first(&self) -> Vec<u8> {
        format!("{GS2_HEADER}{}", self.client_first_bare).into_bytes()
    }

    /// Answers the server-first-message with the client-final-message.
    pub(crate) fn client_final(&mut self, server_first: &[u8]) -> Result<Vec<u8>, ScramError> {
        let server_first =
            std::str::from_utf8(server_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let mut parts = server_first.split(',');
        let nonce = attribute(parts.next(), 'r')?;
        let salt = attribute(parts.next(), 's')?;
        let iterations = attribute(parts.next(), 'i')?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(ScramError::Nonce);
        }
        let salt = BASE64
            .decode(salt)
            .map_err(|_| ScramError::Malformed("salt is not base64"))?;
        let iterations: u32 = iterations
            .parse()
            .ok()
            .filter(|i| (1..=MAX_ITERATIONS).contains(i))
            .ok_or(ScramError::Malformed("iteration count"))?;
        let iterations = std::num::NonZeroU32::new(iterations)
            .ok_or(ScramError::Malformed("iteration count"))?;

        let mut salted = [0u8; KEY_LEN];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            iterations,
            &salt,
            &self.password,
            &mut salted,
        );
        let salted = hmac::Key::new(hmac::HMAC_SHA256, &salted);
        let client_key = hmac::sign(&salted, b"Client Key");
        let stored_key = digest::digest(&digest::SHA256, client_key.as_ref());
        let without_proof = format!("c={},r={nonce}", BASE64.encode(GS2_HEADER));
        let auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let stored_key = hmac::Key::new(hmac::HMAC_SHA256, stored_key.as_ref());
        let client_signature = hmac::sign(&stored_key, auth_message.as_bytes());
        let mut proof = [0u8; KEY_LEN];
        for ((out, key), signature) in proof
            .iter_mut()
            .zip(client_key.as_ref())
            .zip(client_signature.as_ref())
        {
            *out = key ^ signature;
        }
        let server_key = hmac::Key::new(
            hmac::HMAC_SHA256,
            hmac::sign(&salted, b"Server Key").as_ref(),
        );
        let mut expected = [0u8; KEY_LEN];
        expected.copy_from_slice(hmac::sign(&server_key, auth_message.as_bytes()).as_ref());
        self.expected_server_signature = Some(expected);
        Ok(format!("{without_proof},p={}", BASE64.encode(proof)).into_bytes())
    }

    /// Checks the server-final-message: the server must prove it knows
    /// the verifier.
    pub(crate) fn verify_server_final(&self, server_final: &[u8]) -> Result<(), ScramError> {
        let expected = self
            .expected_server_signature
            .ok_or(ScramError::Malformed("server-final before server-first"))?;
        let text =
            std::str::from_utf8(server_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        if text.starts_with("e=") {
            return Err(ScramError::ServerError);
        }
        let signature = attribute(text.split(',').next(), 'v')?;
        let signature = BASE64
            .decode(signature)
            .map_err(|_| ScramError::Malformed("signature is not base64"))?;
        constant_time::verify_slices_are_equal(&signature, &expected)
            .map_err(|_| ScramError::BadServerSignature)
    }
}

/// The value of `name=value`.
fn attribute(part: Option<&str>, name: char) -> Result<&str, ScramError> {
    part.and_then(|part| part.strip_prefix(name))
        .and_then(|rest| rest.strip_prefix('='))
        .ok_or(ScramError::Malformed("missing attribute"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example exchange of RFC 7677, section 3.
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                                p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_client() -> ScramClient {
        ScramClient::new("user", "pencil", "rOprNGfwEbeRWgbNEkqO".into())
    }

    #[test]
    fn replays_the_rfc_7677_exchange_byte_for_byte() {
        let mut client = rfc_client();
        assert_eq!(client.client_first(), CLIENT_FIRST.as_bytes());
        let last = client.client_final(SERVER_FIRST.as_bytes()).expect("final");
        assert_eq!(String::from_utf8(last).expect("text"), CLIENT_FINAL);
        assert_eq!(client.verify_server_final(SERVER_FINAL.as_bytes()), Ok(()));
    }

    #[test]
    fn a_server_that_does_not_know_the_verifier_is_refused() {
        let mut client = rfc_client();
        client.client_final(SERVER_FIRST.as_bytes()).expect("final");
        assert_eq!(
            client.verify_server_final(b"v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="),
            Err(ScramError::BadServerSignature)
        );
        assert_eq!(
            client.verify_server_final(b"e=invalid-proof"),
            Err(ScramError::ServerError)
        );
        assert!(
            rfc_client()
                .verify_server_final(SERVER_FINAL.as_bytes())
                .is_err()
        );
    }

    #[test]
    fn malformed_or_foreign_server_messages_are_refused() {
        for server_first in [
            "r=someone-elses-nonce,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOxyz,s=***,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
            "r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4000000000",
            "s=W22ZaJ0SNY7soEsUEjb6gQ==,r=rOprNGfwEbeRWgbNEkqOxyz,i=4096",
            "garbage",
        ] {
            assert!(
                rfc_client().client_final(server_first.as_bytes()).is_err(),
                "{server_first}"
            );
        }
    }
}
