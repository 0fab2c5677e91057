use super::*;

/// One side of a recorded login: what the server sends, and the bytes the
/// client must answer with (empty: nothing).
struct Exchange {
    server: (u8, Vec<u8>),
    client: Vec<u8>,
}

fn server(tag: u8, body: &[u8]) -> (u8, Vec<u8>) {
    (tag, body.to_vec())
}

fn auth(code: i32, data: &[u8]) -> (u8, Vec<u8>) {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(data);
    (b'R', body)
}

/// A frontend message: tag, length, body.
fn client(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let length = u32::try_from(body.len() + 4).expect("fits");
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// What every server sends after AuthenticationOk.
fn ready_messages() -> Vec<Exchange> {
    let mut key = 4242i32.to_be_bytes().to_vec();
    key.extend_from_slice(&(-7i32).to_be_bytes());
    [
        server(b'S', b"server_version\x0015.8\0"),
        server(b'N', b"SNOTICE\0Mhello\0\0"),
        server(b'K', &key),
        server(b'Z', b"I"),
    ]
    .into_iter()
    .map(|server| Exchange {
        server,
        client: Vec::new(),
    })
    .collect()
}

/// Replays `exchanges` through a login; returns how it ended.
fn replay(mut login: UpstreamLogin, exchanges: &[Exchange]) -> Result<Established, LoginError> {
    for (at, exchange) in exchanges.iter().enumerate() {
        let mut out = BytesMut::new();
        let (tag, body) = &exchange.server;
        let step = login.message(*tag, body, &mut out)?;
        assert_eq!(
            &out[..],
            &exchange.client[..],
            "answer to message {at} ({})",
            char::from(*tag)
        );
        if step == Step::Ready {
            assert_eq!(at, exchanges.len() - 1, "ready before the last message");
            return Ok(login.established());
        }
    }
    panic!("the login did not end");
}

fn expected_established() -> Established {
    Established {
        parameters: vec![("server_version".into(), "15.8".into())],
        pid: 4242,
        cancel_key: (-7i32).to_be_bytes().to_vec(),
        minor_version: 0,
    }
}

#[test]
fn the_startup_message_asks_for_the_version_and_carries_the_parameters() {
    let mut out = BytesMut::new();
    let parameters = [("application_name".to_owned(), "psql".to_owned())];
    startup_message("authenticated", "app", &parameters, 2, &mut out);
    let mut expected = BytesMut::new();
    expected.put_i32(0);
    expected.put_i32(196_610);
    expected.put_slice(b"user\0authenticated\0database\0app\0application_name\0psql\0\0");
    let length = i32::try_from(expected.len()).expect("fits");
    expected[..4].copy_from_slice(&length.to_be_bytes());
    assert_eq!(out, expected);
}

#[test]
fn trust_needs_no_password() {
    let mut exchanges = vec![Exchange {
        server: auth(0, b""),
        client: Vec::new(),
    }];
    exchanges.extend(ready_messages());
    let login = UpstreamLogin::new("authenticated", None, 0, String::new());
    assert_eq!(replay(login, &exchanges), Ok(expected_established()));
}

#[test]
fn cleartext_and_md5_answer_with_the_roles_password() {
    let mut exchanges = vec![
        Exchange {
            server: auth(3, b""),
            client: client(b'p', b"secret\0"),
        },
        Exchange {
            server: auth(0, b""),
            client: Vec::new(),
        },
    ];
    exchanges.extend(ready_messages());
    let login = UpstreamLogin::new("authenticated", Some("secret"), 0, String::new());
    assert_eq!(replay(login, &exchanges), Ok(expected_established()));

    // md5(md5(password + user) + salt), computed independently.
    exchanges[0] = Exchange {
        server: auth(5, &[1, 2, 3, 4]),
        client: client(b'p', b"md57ba9f730c8573e29def538b4d14e285c\0"),
    };
    let login = UpstreamLogin::new("authenticated", Some("secret"), 0, String::new());
    assert_eq!(replay(login, &exchanges), Ok(expected_established()));
}

/// A SCRAM-SHA-256 login recorded from PostgreSQL 15.18 (role
/// `authenticated`, password "secret", the client nonce below); the
/// server's nonce, salt and signature are as that server sent them, and it
/// accepted the proof.
const SCRAM_NONCE: &str = "authgres-test-nonce-0001";
const SCRAM_SERVER_FIRST: &[u8] =
    b"r=authgres-test-nonce-0001xm3zJCMd9odW6sgRutTGrY+4,s=NLrI4vEEdN0lBTntKeqHlA==,i=4096";
const SCRAM_CLIENT_FINAL: &[u8] = b"c=biws,r=authgres-test-nonce-0001xm3zJCMd9odW6sgRutTGrY+4,\
    p=wpq0Azhg+opwdWyG6iXF27aAbzE8fNF995BWWiA/1QY=";
const SCRAM_SERVER_FINAL: &[u8] = b"v=6Qb7aPld+CjHcDkHnz3rJRO3MoFTRXKO7Z5dNBvI1Kk=";

fn scram_exchanges() -> Vec<Exchange> {
    let mut initial = Vec::new();
    initial.extend_from_slice(b"SCRAM-SHA-256\0");
    let first = format!("n,,n=,r={SCRAM_NONCE}");
    initial.extend_from_slice(&i32::try_from(first.len()).expect("fits").to_be_bytes());
    initial.extend_from_slice(first.as_bytes());
    let mut exchanges = vec![
        Exchange {
            server: auth(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"),
            client: client(b'p', &initial),
        },
        Exchange {
            server: auth(11, SCRAM_SERVER_FIRST),
            client: client(b'p', SCRAM_CLIENT_FINAL),
        },
        Exchange {
            server: auth(12, SCRAM_SERVER_FINAL),
            client: Vec::new(),
        },
        Exchange {
            server: auth(0, b""),
            client: Vec::new(),
        },
    ];
    exchanges.extend(ready_messages());
    exchanges
}

#[test]
fn scram_replays_a_recorded_postgres_login_byte_for_byte() {
    let login = UpstreamLogin::new("authenticated", Some("secret"), 0, SCRAM_NONCE.into());
    assert_eq!(
        replay(login, &scram_exchanges()),
        Ok(expected_established())
    );
}

#[test]
fn a_server_that_skips_or_forges_the_scram_proof_is_refused() {
    let mut skipped = scram_exchanges();
    skipped.remove(2);
    let login = UpstreamLogin::new("authenticated", Some("secret"), 0, SCRAM_NONCE.into());
    assert_eq!(
        replay(login, &skipped),
        Err(LoginError::Protocol(
            "SCRAM ended without the server's proof"
        ))
    );
    let mut forged = scram_exchanges();
    forged[2].server = auth(12, b"v=7Qb7aPld+CjHcDkHnz3rJRO3MoFTRXKO7Z5dNBvI1Kk=");
    let login = UpstreamLogin::new("authenticated", Some("secret"), 0, SCRAM_NONCE.into());
    assert_eq!(
        replay(login, &forged),
        Err(LoginError::Scram(ScramError::BadServerSignature))
    );
    // With the wrong password the proof differs, and the real server's
    // signature does not verify.
    let mut login = UpstreamLogin::new("authenticated", Some("wrong"), 0, SCRAM_NONCE.into());
    let exchanges = scram_exchanges();
    let mut out = BytesMut::new();
    for exchange in &exchanges[..2] {
        out.clear();
        let (tag, body) = &exchange.server;
        login.message(*tag, body, &mut out).expect("continues");
    }
    assert_ne!(&out[..], &exchanges[1].client[..]);
    let (tag, body) = &exchanges[2].server;
    assert_eq!(
        login.message(*tag, body, &mut out),
        Err(LoginError::Scram(ScramError::BadServerSignature))
    );
}

#[test]
fn refusals_and_unsupported_methods_end_the_login() {
    let refused = [Exchange {
        server: server(b'E', b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"),
        client: Vec::new(),
    }];
    let login = UpstreamLogin::new("authenticated", Some("x"), 0, String::new());
    let Err(LoginError::Refused(error)) = replay(login, &refused) else {
        panic!("not refused");
    };
    assert_eq!(error.code(), "28P01");
    for (code, data) in [(7, &b""[..]), (10, b"OAUTHBEARER\0\0")] {
        let exchange = [Exchange {
            server: auth(code, data),
            client: Vec::new(),
        }];
        let login = UpstreamLogin::new("authenticated", Some("x"), 0, String::new());
        assert!(matches!(
            replay(login, &exchange),
            Err(LoginError::UnsupportedAuth(_))
        ));
    }
    let exchange = [Exchange {
        server: auth(3, b""),
        client: Vec::new(),
    }];
    let login = UpstreamLogin::new("authenticated", None, 0, String::new());
    assert_eq!(replay(login, &exchange), Err(LoginError::NoPassword));
}

#[test]
fn a_server_that_negotiates_down_and_sends_a_long_cancel_key() {
    let mut key = 99i32.to_be_bytes().to_vec();
    key.extend_from_slice(&[7u8; 32]);
    let mut negotiate = 196_608i32.to_be_bytes().to_vec();
    negotiate.extend_from_slice(&0i32.to_be_bytes());
    let exchanges: Vec<Exchange> = [
        server(b'v', &negotiate),
        auth(0, b""),
        server(b'K', &key),
        server(b'Z', b"I"),
    ]
    .into_iter()
    .map(|server| Exchange {
        server,
        client: Vec::new(),
    })
    .collect();
    let login = UpstreamLogin::new("authenticated", None, 2, String::new());
    let established = replay(login, &exchanges).expect("login");
    assert_eq!(established.minor_version, 0);
    assert_eq!(established.cancel_key, vec![7u8; 32]);
    // A server may not negotiate up.
    let up = [Exchange {
        server: server(b'v', &196_610i32.to_be_bytes()),
        client: Vec::new(),
    }];
    let login = UpstreamLogin::new("authenticated", None, 0, String::new());
    assert!(replay(login, &up).is_err());
}
