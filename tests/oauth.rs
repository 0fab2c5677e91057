//! Native OAuth login (SASL OAUTHBEARER, as Postgres 18's libpq speaks
//! it) through the real proxy, driven message by message: the stack's role
//! `person` has `login = "oauthbearer"`. A bearer token logs in exactly as
//! a password token does; a client without one is sent to the issuer's
//! discovery document; a bad token gets the same challenge and then the
//! usual refusal; anything malformed is a protocol violation.

#![allow(clippy::expect_used, reason = "test code: a panic is a failing test")]

mod common;

use std::time::Duration;

use authgres_sandbox::{KeyKind, TokenSpec};
use common::{RawClient, Stack};

const ROLE: &str = "person";

/// Connects as `person` and reads the offer: AuthenticationSASL with
/// OAUTHBEARER and nothing else.
async fn offered(stack: &Stack) -> RawClient {
    let mut raw = RawClient::connect(stack.port).await;
    raw.send_startup(&[("user", ROLE), ("database", common::DATABASE)])
        .await;
    let (tag, body) = raw.read_message().await.expect("an authentication request");
    assert_eq!(tag, b'R');
    assert_eq!(&body[..4], &10_i32.to_be_bytes(), "AuthenticationSASL");
    assert_eq!(&body[4..], b"OAUTHBEARER\0\0", "offers only OAUTHBEARER");
    raw
}

/// Sends a SASLInitialResponse.
async fn send_initial(raw: &mut RawClient, mechanism: &str, data: &[u8]) {
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::sasl_initial_response(mechanism, data, &mut buf)
        .expect("encode");
    raw.send(&buf).await;
}

/// The client's first message carrying `auth`.
fn client_first(auth: &str) -> Vec<u8> {
    format!("n,,\x01auth={auth}\x01\x01").into_bytes()
}

/// Reads the error challenge (AuthenticationSASLContinue) as JSON.
async fn challenge(raw: &mut RawClient) -> serde_json::Value {
    let (tag, body) = raw.read_message().await.expect("a challenge");
    assert_eq!(tag, b'R', "{:?}", String::from_utf8_lossy(&body));
    assert_eq!(
        &body[..4],
        &11_i32.to_be_bytes(),
        "AuthenticationSASLContinue"
    );
    serde_json::from_slice(&body[4..]).expect("the challenge is JSON")
}

/// Where the proxy sends clients: the issuer and the well-known path, as
/// Postgres 18 builds it (the sandbox's issuer has no trailing slash).
fn discovery_url(stack: &Stack) -> String {
    format!("{}/.well-known/openid-configuration", stack.issuer.issuer())
}

#[tokio::test]
async fn a_bearer_token_logs_in_with_its_identity() {
    let stack = Stack::start().await;
    let mut raw = offered(&stack).await;
    let token = stack.issuer.token("user_oauth");
    send_initial(
        &mut raw,
        "OAUTHBEARER",
        &client_first(&format!("Bearer {token}")),
    )
    .await;
    let (tag, body) = raw.read_message().await.expect("AuthenticationOk");
    assert_eq!((tag, &body[..]), (b'R', &0_i32.to_be_bytes()[..]));
    let tags = raw.read_until(b'Z').await;
    assert!(tags.contains(&b'K'), "a cancel key: {tags:?}");
    raw.send(&common::message(
        b'Q',
        b"select auth.user_id(), current_user\0",
    ))
    .await;
    let (tag, row) = loop {
        let (tag, body) = raw.read_message().await.expect("a reply");
        if tag == b'D' || tag == b'E' {
            break (tag, body);
        }
    };
    assert_eq!(tag, b'D', "{:?}", common::error_fields(&row));
    let text = String::from_utf8_lossy(&row);
    assert!(text.contains("user_oauth"), "{text}");
    assert!(text.contains(ROLE), "{text}");
}

#[tokio::test]
async fn a_client_without_a_token_is_sent_to_the_issuer() {
    let stack = Stack::start().await;
    let mut raw = offered(&stack).await;
    send_initial(&mut raw, "OAUTHBEARER", &client_first("")).await;
    let document = challenge(&mut raw).await;
    assert_eq!(document["status"], "invalid_token");
    assert_eq!(document["openid-configuration"], discovery_url(&stack));
    assert_eq!(document["scope"], "openid");
    raw.send(&common::message(b'p', b"\x01")).await;
    let (code, message) = raw.expect_error().await;
    assert_eq!(code, "28000");
    assert_eq!(
        message,
        "OAuth bearer authentication failed for user \"person\""
    );
    assert!(raw.closed_within(Duration::from_secs(5)).await);
}

#[tokio::test]
async fn a_token_that_does_not_verify_gets_the_challenge_then_28p01() {
    let stack = Stack::start().await;
    let expired = stack.issuer.mint(
        &TokenSpec::new("user_a")
            .issued_at(std::time::SystemTime::now() - Duration::from_secs(7200))
            .ttl(Duration::from_secs(60)),
    );
    let foreign = authgres_sandbox::Signer::generate(stack.issuer.issuer())
        .expect("another signer")
        .mint(&TokenSpec::new("user_a").key(KeyKind::Rsa));
    for (token, why) in [
        (expired, "expired"),
        (foreign, "signed by a key the issuer never published"),
        ("not-a.jwt.at-all".to_owned(), "not a JWT"),
    ] {
        let mut raw = offered(&stack).await;
        send_initial(
            &mut raw,
            "OAUTHBEARER",
            &client_first(&format!("Bearer {token}")),
        )
        .await;
        let document = challenge(&mut raw).await;
        assert_eq!(
            document["openid-configuration"],
            discovery_url(&stack),
            "{why}"
        );
        raw.send(&common::message(b'p', b"\x01")).await;
        let (code, _) = raw.expect_error().await;
        assert_eq!(code, "28P01", "{why}");
        assert!(raw.closed_within(Duration::from_secs(5)).await, "{why}");
    }
    // Another scheme is no token either.
    let mut raw = offered(&stack).await;
    send_initial(&mut raw, "OAUTHBEARER", &client_first("Basic dXNlcjpwYXNz")).await;
    challenge(&mut raw).await;
    raw.send(&common::message(b'p', b"\x01")).await;
    assert_eq!(raw.expect_error().await.0, "28P01");
}

#[tokio::test]
async fn malformed_oauth_exchanges_are_protocol_violations() {
    let stack = Stack::start().await;
    let token = stack.issuer.token("user_a");
    let bearer = client_first(&format!("Bearer {token}"));
    let mut binding = b"p=tls-server-end-point,,\x01auth=Bearer ".to_vec();
    binding.extend_from_slice(token.as_bytes());
    binding.extend_from_slice(b"\x01\x01");
    let mut authzid = b"n,a=someone_else,\x01auth=Bearer ".to_vec();
    authzid.extend_from_slice(token.as_bytes());
    authzid.extend_from_slice(b"\x01\x01");
    for (mechanism, data, why) in [
        (
            "SCRAM-SHA-256",
            &bearer[..],
            "a mechanism that was not offered",
        ),
        ("OAUTHBEARER", &binding[..], "channel binding"),
        ("OAUTHBEARER", &authzid[..], "an authorization identity"),
        (
            "OAUTHBEARER",
            &bearer[..bearer.len() - 1],
            "no closing separator",
        ),
    ] {
        let mut raw = offered(&stack).await;
        send_initial(&mut raw, mechanism, data).await;
        let (code, message) = raw.expect_error().await;
        assert_eq!(code, "08P01", "{why}: {message}");
        assert!(raw.closed_within(Duration::from_secs(5)).await, "{why}");
    }
    // A challenge answered with anything but the lone separator.
    let mut raw = offered(&stack).await;
    send_initial(&mut raw, "OAUTHBEARER", &client_first("")).await;
    challenge(&mut raw).await;
    raw.send(&common::message(b'p', &bearer)).await;
    assert_eq!(raw.expect_error().await.0, "08P01");
}

#[tokio::test]
async fn password_roles_are_still_asked_for_a_password() {
    let stack = Stack::start().await;
    let mut raw = RawClient::connect(stack.port).await;
    raw.send_startup(&[("user", "authenticated"), ("database", common::DATABASE)])
        .await;
    let (tag, body) = raw.read_message().await.expect("an authentication request");
    assert_eq!(
        (tag, &body[..]),
        (b'R', &3_i32.to_be_bytes()[..]),
        "cleartext"
    );
}

#[tokio::test]
async fn the_first_message_may_follow_an_empty_challenge() {
    let stack = Stack::start().await;
    let mut raw = offered(&stack).await;
    // A SASLInitialResponse without data (length -1), as RFC 4422 allows.
    let mut body = b"OAUTHBEARER\0".to_vec();
    body.extend_from_slice(&(-1_i32).to_be_bytes());
    raw.send(&common::message(b'p', &body)).await;
    let (tag, body) = raw.read_message().await.expect("an empty challenge");
    assert_eq!((tag, &body[..]), (b'R', &11_i32.to_be_bytes()[..]));
    let token = stack.issuer.token("user_late");
    raw.send(&common::message(
        b'p',
        &client_first(&format!("Bearer {token}")),
    ))
    .await;
    let (tag, body) = raw.read_message().await.expect("AuthenticationOk");
    assert_eq!((tag, &body[..]), (b'R', &0_i32.to_be_bytes()[..]));
}
