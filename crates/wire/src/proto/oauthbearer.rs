//! Sans-IO SASL OAUTHBEARER ([RFC 7628]), the mechanism Postgres 18's
//! libpq logs in with when given `oauth_issuer` and `oauth_client_id`.
//!
//! The exchange, as `src/backend/libpq/auth-oauth.c` runs it:
//!
//! 1. the server offers the mechanism (AuthenticationSASL);
//! 2. the client answers `n,,\x01auth=Bearer <token>\x01\x01`
//!    ([`parse_client_first`]), or `n,,\x01auth=\x01\x01` when it has no
//!    token yet and asks where to get one;
//! 3. a good token ends in AuthenticationOk. Otherwise the server sends
//!    [`challenge`], a JSON document naming the issuer's discovery URL and
//!    the scope to ask for; the client acknowledges with a lone `\x01`
//!    ([`is_acknowledgement`]) and the server fails the login. libpq then
//!    fetches a token (its device flow, or an application's hook) and
//!    connects again.
//!
//! [RFC 7628]: https://www.rfc-editor.org/rfc/rfc7628

/// The mechanism's name in AuthenticationSASL and SASLInitialResponse.
pub const MECHANISM: &str = "OAUTHBEARER";

/// The separator between the message's key/value pairs (RFC 7628 `kvsep`).
const KVSEP: u8 = 0x01;

/// What a client's first message carries.
#[derive(Debug, PartialEq, Eq)]
pub enum ClientFirst<'a> {
    /// A bearer token, to verify as a password token would be.
    Bearer(&'a str),
    /// An empty `auth`: the client asks where to get a token.
    Discovery,
    /// An `auth` value that is not a bearer token (another scheme, or
    /// characters a token cannot have): answered like a bad token.
    Unusable,
}

/// Why a client's OAUTHBEARER message could not be read: a protocol
/// violation, not a failed login.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed OAUTHBEARER message: {0}")]
pub struct Malformed(pub &'static str);

/// Parses the client's first message (RFC 7628 section 3.1).
pub fn parse_client_first(message: &[u8]) -> Result<ClientFirst<'_>, Malformed> {
    let rest = match message {
        [b'n' | b'y', b',', rest @ ..] => rest,
        [b'p', b'=', ..] => {
            return Err(Malformed("channel binding is not supported"));
        }
        _ => return Err(Malformed("bad GS2 header")),
    };
    let rest = match rest {
        [b',', rest @ ..] => rest,
        _ => return Err(Malformed("an authorization identity is not supported")),
    };
    let Some((&KVSEP, mut pairs)) = rest.split_first() else {
        return Err(Malformed("no key/value separator after the GS2 header"));
    };
    let mut auth = None;
    loop {
        let Some(end) = pairs.iter().position(|&b| b == KVSEP) else {
            return Err(Malformed("unterminated key/value pair"));
        };
        let (pair, after) = pairs.split_at(end);
        let after = after.get(1..).unwrap_or_default();
        if pair.is_empty() {
            // The empty pair ends the message; nothing may follow it.
            if !after.is_empty() {
                return Err(Malformed("data after the end of the message"));
            }
            break;
        }
        let Some(eq) = pair.iter().position(|&b| b == b'=') else {
            return Err(Malformed("key/value pair without '='"));
        };
        let (key, value) = pair.split_at(eq);
        let value = value.get(1..).unwrap_or_default();
        if key.is_empty() || !key.iter().all(u8::is_ascii_alphabetic) {
            return Err(Malformed("bad key"));
        }
        if !value
            .iter()
            .all(|&b| matches!(b, 0x21..=0x7e | b' ' | b'\t' | b'\r' | b'\n'))
        {
            return Err(Malformed("bad value"));
        }
        if key == b"auth" {
            if auth.is_some() {
                return Err(Malformed("more than one auth value"));
            }
            auth = Some(value);
        }
        // Other keys (host, port) are allowed and ignored, as Postgres does.
        pairs = after;
    }
    let auth = auth.ok_or(Malformed("no auth value"))?;
    Ok(bearer_token(auth))
}

/// Reads an `auth` value: `Bearer <b64token>` (RFC 6750 section 2.1).
fn bearer_token(auth: &[u8]) -> ClientFirst<'_> {
    if auth.is_empty() {
        return ClientFirst::Discovery;
    }
    const SCHEME: &[u8] = b"bearer ";
    let Some((scheme, token)) = auth.split_at_checked(SCHEME.len()) else {
        return ClientFirst::Unusable;
    };
    if !scheme.eq_ignore_ascii_case(SCHEME) {
        return ClientFirst::Unusable;
    }
    // RFC 6750: one or more spaces, nothing else, before the token.
    let start = token.iter().position(|&b| b != b' ').unwrap_or(token.len());
    let token = token.get(start..).unwrap_or_default();
    let body_end = token
        .iter()
        .position(|&b| !(b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)))
        .unwrap_or(token.len());
    let padded = token.get(body_end..).unwrap_or_default();
    if body_end == 0 || !padded.iter().all(|&b| b == b'=') {
        return ClientFirst::Unusable;
    }
    // Every byte is ASCII, checked above.
    std::str::from_utf8(token).map_or(ClientFirst::Unusable, ClientFirst::Bearer)
}

/// The error challenge sent in AuthenticationSASLContinue when a login
/// has no usable token: where the client gets one (the issuer's OpenID
/// discovery document) and with which scope.
pub fn challenge(discovery_url: &str, scope: &str) -> Vec<u8> {
    let mut document = serde_json::Map::new();
    document.insert("status".into(), "invalid_token".into());
    document.insert("openid-configuration".into(), discovery_url.into());
    if !scope.is_empty() {
        document.insert("scope".into(), scope.into());
    }
    serde_json::Value::Object(document).to_string().into_bytes()
}

/// Whether `message` is the client's acknowledgement of a [`challenge`]:
/// a lone `kvsep`.
pub fn is_acknowledgement(message: &[u8]) -> bool {
    message == [KVSEP]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_messages() {
        assert_eq!(
            parse_client_first(b"n,,\x01auth=Bearer abc.DEF-_~+/==\x01\x01"),
            Ok(ClientFirst::Bearer("abc.DEF-_~+/=="))
        );
        assert_eq!(
            parse_client_first(b"n,,\x01auth=\x01\x01"),
            Ok(ClientFirst::Discovery)
        );
        assert_eq!(
            parse_client_first(b"y,,\x01host=db\x01port=5432\x01auth=bearer   t\x01\x01"),
            Ok(ClientFirst::Bearer("t"))
        );
    }

    #[test]
    fn other_schemes_and_characters_are_unusable_tokens() {
        for auth in [
            &b"Basic dXNlcjpwYXNz"[..],
            b"Bearer",
            b"Bearer ",
            b"Bearer a b",
            b"Bearer a=b",
            b"Bearer\ttoken",
            b"Bearer \ttoken",
            b"Bearer \r\ntoken",
        ] {
            let mut message = b"n,,\x01auth=".to_vec();
            message.extend_from_slice(auth);
            message.extend_from_slice(b"\x01\x01");
            assert_eq!(
                parse_client_first(&message),
                Ok(ClientFirst::Unusable),
                "{:?}",
                String::from_utf8_lossy(auth)
            );
        }
        // A byte no value may hold breaks the message itself.
        assert!(parse_client_first(b"n,,\x01auth=Bearer \xff\x01\x01").is_err());
    }

    #[test]
    fn malformed_messages() {
        for message in [
            &b""[..],
            b"n",
            b"n,,",
            b"p=tls-server-end-point,,\x01auth=Bearer t\x01\x01",
            b"n,a=someone,\x01auth=Bearer t\x01\x01",
            b"x,,\x01auth=Bearer t\x01\x01",
            b"n,,\x01auth=Bearer t\x01",
            b"n,,\x01auth=Bearer t",
            b"n,,\x01auth=Bearer t\x01\x01extra",
            b"n,,\x01\x01",
            b"n,,\x01noequals\x01\x01",
            b"n,,\x01=v\x01\x01",
            b"n,,\x01k3y=v\x01\x01",
            b"n,,\x01auth=Bearer t\x01auth=Bearer u\x01\x01",
            b"n,,\x01auth=Bearer \x00\x01\x01",
        ] {
            assert!(
                parse_client_first(message).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(message)
            );
        }
    }

    #[test]
    fn challenge_is_the_document_libpq_reads() {
        let text = challenge(
            "https://id.example/.well-known/openid-configuration",
            "openid",
        );
        let value: serde_json::Value = serde_json::from_slice(&text).expect("JSON");
        assert_eq!(value["status"], "invalid_token");
        assert_eq!(
            value["openid-configuration"],
            "https://id.example/.well-known/openid-configuration"
        );
        assert_eq!(value["scope"], "openid");
        let value: serde_json::Value =
            serde_json::from_slice(&challenge("https://x/", "")).expect("JSON");
        assert!(value.get("scope").is_none());
        assert!(is_acknowledgement(b"\x01"));
        assert!(!is_acknowledgement(b"\x01\x01"));
    }
}
