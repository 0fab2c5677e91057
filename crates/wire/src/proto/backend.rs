//! Sans-IO encoding of the messages authgres itself sends to clients: during
//! the handshake, authentication requests, replayed ParameterStatus, the
//! proxy's own BackendKeyData, ReadyForQuery and ErrorResponse; and the
//! console's result sets (RowDescription, DataRow, CommandComplete) and
//! errors.
//!
//! Formats: <https://www.postgresql.org/docs/current/protocol-message-formats.html>.
//! Encoding uses `pgwire`'s message types; every function appends to the
//! caller's buffer.

use bytes::{BufMut as _, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::response::{
    CommandComplete, ErrorResponse, NoticeResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};

use crate::error::SqlState;

fn encode(message: &impl Message, buf: &mut BytesMut) {
    // Every message built here is small and well-formed (bounded strings we
    // produce ourselves), so encoding cannot fail on length limits; if it
    // ever did, sending nothing makes the client see a closed connection
    // rather than a malformed message.
    if let Err(error) = message.encode(buf) {
        tracing::error!(%error, "could not encode a backend message");
    }
}

/// AuthenticationCleartextPassword: the JWT travels as the password.
pub fn ask_cleartext_password(buf: &mut BytesMut) {
    encode(&Authentication::CleartextPassword, buf);
}

/// AuthenticationSASL offering exactly `mechanism`.
pub fn ask_sasl(mechanism: &str, buf: &mut BytesMut) {
    encode(&Authentication::SASL(vec![mechanism.to_owned()]), buf);
}

/// AuthenticationSASLContinue carrying `data`.
pub fn sasl_continue(data: Vec<u8>, buf: &mut BytesMut) {
    encode(&Authentication::SASLContinue(data.into()), buf);
}

/// AuthenticationOk.
pub fn authentication_ok(buf: &mut BytesMut) {
    encode(&Authentication::Ok, buf);
}

/// ParameterStatus, replayed from the upstream login.
pub fn parameter_status(name: &str, value: &str, buf: &mut BytesMut) {
    encode(
        &ParameterStatus::new(name.to_owned(), value.to_owned()),
        buf,
    );
}

/// BackendKeyData carrying the proxy's own cancel key, never the upstream's.
pub fn backend_key_data(pid: i32, key: [u8; 4], buf: &mut BytesMut) {
    encode(
        &BackendKeyData::new(pid, SecretKey::I32(i32::from_be_bytes(key))),
        buf,
    );
}

/// ReadyForQuery in the idle state: the client may start.
pub fn ready_for_query_idle(buf: &mut BytesMut) {
    encode(&ReadyForQuery::new(TransactionStatus::Idle), buf);
}

/// The protocol version code of 3.0, as NegotiateProtocolVersion carries
/// it: the whole code, which libpq 18 requires (a bare minor version of 0
/// reads to it as a downgrade to before 3.0).
const PROTOCOL_3_0: i32 = 3 << 16;

/// NegotiateProtocolVersion: we speak 3.0 and none of the `_pq_` options.
pub fn negotiate_protocol_version(unsupported_options: Vec<String>, buf: &mut BytesMut) {
    encode(
        &NegotiateProtocolVersion::new(PROTOCOL_3_0, unsupported_options),
        buf,
    );
}

/// A FATAL ErrorResponse; the connection is closed right after it.
pub fn fatal_error(code: SqlState, message: &str, hint: Option<&str>, buf: &mut BytesMut) {
    let mut fields = vec![
        (b'S', "FATAL".to_owned()),
        (b'V', "FATAL".to_owned()),
        (b'C', code.code().to_owned()),
        (b'M', message.to_owned()),
    ];
    if let Some(hint) = hint {
        fields.push((b'H', hint.to_owned()));
    }
    encode(&ErrorResponse::new(fields), buf);
}

/// An ErrorResponse at severity ERROR: the statement failed, the
/// connection goes on.
pub fn error(code: SqlState, message: &str, buf: &mut BytesMut) {
    error_hinted(code, message, None, buf);
}

/// [`error`] with a hint.
pub fn error_hinted(code: SqlState, message: &str, hint: Option<&str>, buf: &mut BytesMut) {
    let mut fields = vec![
        (b'S', "ERROR".to_owned()),
        (b'V', "ERROR".to_owned()),
        (b'C', code.code().to_owned()),
        (b'M', message.to_owned()),
    ];
    if let Some(hint) = hint {
        fields.push((b'H', hint.to_owned()));
    }
    encode(&ErrorResponse::new(fields), buf);
}

/// A NoticeResponse at severity NOTICE.
pub fn notice(message: &str, buf: &mut BytesMut) {
    let fields = vec![
        (b'S', "NOTICE".to_owned()),
        (b'V', "NOTICE".to_owned()),
        (b'C', "00000".to_owned()),
        (b'M', message.to_owned()),
    ];
    encode(&NoticeResponse::new(fields), buf);
}

/// The type of a result column: Postgres's type oid and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// `text`.
    Text,
    /// `bigint`.
    BigInt,
}

/// RowDescription of text-format columns.
pub fn row_description(columns: &[(&str, ColumnType)], buf: &mut BytesMut) {
    let fields = columns
        .iter()
        .map(|&(name, kind)| {
            let (type_id, type_size) = match kind {
                ColumnType::Text => (25, -1),
                ColumnType::BigInt => (20, 8),
            };
            FieldDescription::new(name.to_owned(), 0, 0, type_id, type_size, -1, 0)
        })
        .collect();
    encode(&RowDescription::new(fields), buf);
}

/// DataRow of text values (`None`: NULL).
pub fn data_row<'a>(values: impl ExactSizeIterator<Item = Option<&'a str>>, buf: &mut BytesMut) {
    let count = i16::try_from(values.len()).unwrap_or(i16::MAX);
    let mut data = BytesMut::new();
    for value in values {
        match value {
            Some(text) => {
                data.put_i32(i32::try_from(text.len()).unwrap_or(i32::MAX));
                data.put_slice(text.as_bytes());
            }
            None => data.put_i32(-1),
        }
    }
    encode(&DataRow::new(data, count), buf);
}

/// EmptyQueryResponse: the query had no statement.
pub fn empty_query(buf: &mut BytesMut) {
    buf.extend_from_slice(&[b'I', 0, 0, 0, 4]);
}

/// CommandComplete with `tag` (`SHOW`, `PAUSE`, ...).
pub fn command_complete(tag: &str, buf: &mut BytesMut) {
    encode(&CommandComplete::new(tag.to_owned()), buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::backend::Message as Parsed;

    #[test]
    fn handshake_messages_parse_as_postgres_sends_them() {
        let mut buf = BytesMut::new();
        ask_cleartext_password(&mut buf);
        authentication_ok(&mut buf);
        parameter_status("server_version", "15.8", &mut buf);
        backend_key_data(17, (-5i32).to_be_bytes(), &mut buf);
        ready_for_query_idle(&mut buf);
        let mut seen = Vec::new();
        while let Some(message) = Parsed::parse(&mut buf).expect("well-formed") {
            seen.push(match message {
                Parsed::AuthenticationCleartextPassword => "password".to_owned(),
                Parsed::AuthenticationOk => "ok".to_owned(),
                Parsed::ParameterStatus(body) => {
                    format!(
                        "{}={}",
                        body.name().expect("name"),
                        body.value().expect("value")
                    )
                }
                Parsed::BackendKeyData(body) => {
                    format!("key {} {}", body.process_id(), body.secret_key())
                }
                Parsed::ReadyForQuery(body) => format!("ready {}", char::from(body.status())),
                _ => "other".to_owned(),
            });
        }
        assert_eq!(
            seen,
            [
                "password",
                "ok",
                "server_version=15.8",
                "key 17 -5",
                "ready I"
            ]
        );
    }

    #[test]
    fn fatal_error_carries_code_message_and_hint() {
        let mut buf = BytesMut::new();
        fatal_error(
            SqlState::InvalidPassword,
            "token expired",
            Some("get a new one"),
            &mut buf,
        );
        let Some(Parsed::ErrorResponse(body)) = Parsed::parse(&mut buf).expect("well-formed")
        else {
            panic!("expected an ErrorResponse");
        };
        use fallible_iterator::FallibleIterator;
        let fields: Vec<(u8, String)> = body
            .fields()
            .map(|f| {
                Ok((
                    f.type_(),
                    String::from_utf8_lossy(f.value_bytes()).into_owned(),
                ))
            })
            .collect()
            .expect("fields");
        assert!(fields.contains(&(b'C', "28P01".to_owned())));
        assert!(fields.contains(&(b'M', "token expired".to_owned())));
        assert!(fields.contains(&(b'H', "get a new one".to_owned())));
    }
}
