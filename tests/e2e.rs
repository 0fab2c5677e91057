//! End to end through the real binary: psql and tokio-postgres log in with
//! tokens from the sandbox issuer and see only their own rows; bad tokens,
//! forbidden roles and silent clients are refused; the identity survives the
//! basic attempts to rewrite it; cancel reaches the upstream backend.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::time::{Duration, SystemTime};

use authgres_sandbox::{KeyKind, Signer, TokenSpec};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{RawClient, Stack, stdout, user_id};
use serde_json::json;
use tokio_postgres::error::SqlState;

#[tokio::test(flavor = "multi_thread")]
async fn psql_users_see_only_their_own_rows() {
    let stack = Stack::start().await;
    let alice = stack.issuer.token("user_alice");
    let bob = stack.issuer.token("user_bob");

    let out = stack.psql(
        "authenticated",
        Some(&alice),
        &[
            "insert into todos (task) values ('alice one'), ('alice two')",
            "select auth.user_id()",
        ],
    );
    assert_eq!(stdout(&out), "INSERT 0 2\nuser_alice");
    let out = stack.psql(
        "authenticated",
        Some(&bob),
        &[
            "insert into todos (task) values ('bob one')",
            "select auth.user_id()",
        ],
    );
    assert_eq!(stdout(&out), "INSERT 0 1\nuser_bob");

    let out = stack.psql(
        "authenticated",
        Some(&alice),
        &["select string_agg(user_id || ':' || task, ',' order by id) from todos"],
    );
    assert_eq!(stdout(&out), "user_alice:alice one,user_alice:alice two");
    let out = stack.psql(
        "authenticated",
        Some(&bob),
        &["select string_agg(user_id || ':' || task, ',' order by id) from todos"],
    );
    assert_eq!(stdout(&out), "user_bob:bob one");

    // RLS refuses a row written in someone else's name.
    let out = stack.psql(
        "authenticated",
        Some(&bob),
        &["insert into todos (user_id, task) values ('user_alice', 'forged')"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("row-level security"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokio_postgres_connects_plain_with_tls_and_with_direct_tls() {
    let stack = Stack::start().await;
    let token = stack
        .issuer
        .mint(&TokenSpec::new("user_es").key(KeyKind::Ec));
    let who = |client: tokio_postgres::Client| async move {
        let row = client
            .query_one("select auth.user_id(), current_user::text", &[])
            .await
            .expect("query");
        (row.get::<_, String>(0), row.get::<_, String>(1))
    };
    let expected = ("user_es".to_owned(), "authenticated".to_owned());

    let plain = stack.connect("authenticated", &token).await.expect("plain");
    assert_eq!(who(plain).await, expected);
    let tls = stack
        .connect_tls("authenticated", &token, "sslmode=require")
        .await
        .expect("sslmode=require");
    assert_eq!(who(tls).await, expected);
    let direct = stack
        .connect_tls(
            "authenticated",
            &token,
            "sslmode=require sslnegotiation=direct",
        )
        .await
        .expect("direct TLS");
    assert_eq!(who(direct).await, expected);
    let eddsa = stack
        .issuer
        .mint(&TokenSpec::new("user_ed").key(KeyKind::Ed25519));
    let client = stack.connect("authenticated", &eddsa).await.expect("EdDSA");
    assert_eq!(who(client).await.0, "user_ed");
}

/// Every token here must be refused with 28P01, after which the proxy closes
/// the connection.
#[tokio::test(flavor = "multi_thread")]
async fn bad_tokens_are_refused_with_28p01_and_the_connection_closes() {
    let stack = Stack::start().await;
    let issuer = &stack.issuer;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);

    let impostor = Signer::generate(issuer.issuer()).expect("keys");
    let stranger = Signer::generate("https://evil.example.com").expect("keys");
    let claims = |sub: &str| json!({"sub": sub, "iss": issuer.issuer(), "exp": now_secs() + 3600, "iat": now_secs()});
    let b64 = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());

    let valid = issuer.token("user_alice");
    let mut parts: Vec<&str> = valid.split('.').collect();
    let changed_payload = b64(&claims("user_bob"));
    parts[1] = &changed_payload;
    let changed_sub = parts.join(".");

    let signing_input = format!(
        "{}.{}",
        b64(&json!({"alg": "HS256", "typ": "JWT"})),
        b64(&claims("user_alice"))
    );
    let hmac_key = aws_lc_rs::hmac::Key::new(
        aws_lc_rs::hmac::HMAC_SHA256,
        &issuer.signer().rsa_public_der(),
    );
    let confused = format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(aws_lc_rs::hmac::sign(&hmac_key, signing_input.as_bytes()))
    );

    let cases: Vec<(&str, String)> = vec![
        (
            "wrong signature",
            impostor.mint(&TokenSpec::new("user_alice")),
        ),
        (
            "expired",
            issuer.mint(
                &TokenSpec::new("user_alice")
                    .issued_at(now - 2 * hour)
                    .ttl(hour),
            ),
        ),
        (
            "not yet valid",
            issuer.mint(&TokenSpec::new("user_alice").issued_at(now + hour)),
        ),
        ("wrong issuer", stranger.mint(&TokenSpec::new("user_alice"))),
        (
            "unknown kid",
            issuer.signer().sign_raw(
                &json!({"alg": "RS256", "kid": "rotated-away", "typ": "JWT"}),
                &claims("user_alice"),
                KeyKind::Rsa,
            ),
        ),
        (
            "alg fits another key",
            issuer.signer().sign_raw(
                &json!({"alg": "ES256", "kid": "rsa-1", "typ": "JWT"}),
                &claims("user_alice"),
                KeyKind::Ec,
            ),
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(&json!({"alg": "none"})),
                b64(&claims("user_alice"))
            ),
        ),
        ("HS256 with the public key", confused),
        ("changed sub", changed_sub),
        (
            "no exp",
            issuer.signer().sign_raw(
                &json!({"alg": "RS256", "kid": "rsa-1"}),
                &json!({"sub": "user_alice", "iss": issuer.issuer()}),
                KeyKind::Rsa,
            ),
        ),
        ("garbage", "not-a-jwt".to_owned()),
        ("three garbage parts", "a.b.c".to_owned()),
    ];
    for (name, token) in cases {
        let mut raw = RawClient::connect(stack.port).await;
        raw.send_startup(&[("user", "authenticated"), ("database", common::DATABASE)])
            .await;
        let (tag, body) = raw.read_message().await.expect("password request");
        assert_eq!(
            (tag, &body[..]),
            (b'R', &[0, 0, 0, 3][..]),
            "{name}: cleartext password request"
        );
        raw.send_password(&token).await;
        let (code, message) = raw.expect_error().await;
        assert_eq!(code, "28P01", "{name}: {message}");
        assert!(
            !message.contains(&token),
            "{name}: the token leaked into the message"
        );
        assert!(
            raw.closed_within(Duration::from_secs(3)).await,
            "{name}: connection left open"
        );
    }

    // The same through a driver: the error surfaces as invalid_password.
    let expired = issuer.mint(
        &TokenSpec::new("user_alice")
            .issued_at(now - 2 * hour)
            .ttl(hour),
    );
    let error = stack
        .connect("authenticated", &expired)
        .await
        .expect_err("refused");
    assert_eq!(error.code(), Some(&SqlState::INVALID_PASSWORD), "{error}");
    assert!(
        !stack.log().contains(&expired),
        "the token leaked into the log"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn role_the_provider_may_not_use_and_unknown_roles_get_28000() {
    let stack = Stack::start().await;
    let token = stack.issuer.token("user_alice");
    for role in ["reporting", "postgres", "nobody"] {
        let error = stack.connect(role, &token).await.expect_err("refused");
        assert_eq!(
            error.code(),
            Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
            "{role}: {error}"
        );
    }
    let error = stack
        .connect("authenticated", "")
        .await
        .expect_err("refused");
    assert_eq!(
        error.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_sends_the_password_is_dropped() {
    let stack = Stack::start().await; // auth_timeout = 2s
    let mut raw = RawClient::connect(stack.port).await;
    raw.send_startup(&[("user", "authenticated"), ("database", common::DATABASE)])
        .await;
    let (tag, _) = raw.read_message().await.expect("password request");
    assert_eq!(tag, b'R');
    let (code, _) = raw.expect_error().await;
    assert_eq!(code, "08P01");
    assert!(raw.closed_within(Duration::from_secs(5)).await);

    // A client that sends nothing at all is dropped too.
    let mut silent = RawClient::connect(stack.port).await;
    assert!(silent.closed_within(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_after_sslrequest_is_refused() {
    let stack = Stack::start().await;
    let mut raw = RawClient::connect(stack.port).await;
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut buf);
    postgres_protocol::message::frontend::startup_message(
        [("user", "authenticated"), ("database", common::DATABASE)],
        &mut buf,
    )
    .expect("encode");
    use tokio::io::AsyncWriteExt as _;
    raw.stream.write_all(&buf).await.expect("write");
    let (code, message) = raw.expect_error().await;
    assert_eq!(code, "08P01", "{message}");
    assert!(raw.closed_within(Duration::from_secs(3)).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn identity_settings_cannot_be_rewritten_reset_or_replayed() {
    let stack = Stack::start().await;
    let alice = stack.login("user_alice").await;
    let bob = stack.login("user_bob").await;
    let captured = alice
        .query_one(
            "select current_setting('authgres.claims'), current_setting('authgres.signature')",
            &[],
        )
        .await
        .expect("read own settings");
    let (claims, signature): (String, String) = (captured.get(0), captured.get(1));
    assert!(claims.contains("user_alice"));

    // Replaying Alice's pair on Bob's backend does not make Bob Alice.
    bob.query(
        "select set_config('authgres.claims', $1, false), set_config('authgres.signature', $2, false)",
        &[&claims, &signature],
    )
    .await
    .expect("set_config");
    assert_eq!(user_id(&bob).await, None);

    // Writing claims by hand fails closed.
    let forged = claims.replace("user_alice", "user_bob");
    for statement in [
        format!("set authgres.claims = '{forged}'"),
        format!("select set_config('authgres.claims', '{forged}', false)"),
        "reset all".to_owned(),
        "discard all".to_owned(),
        "reset authgres.signature".to_owned(),
    ] {
        let client = stack.login("user_carol").await;
        assert_eq!(user_id(&client).await.as_deref(), Some("user_carol"));
        client.batch_execute(&statement).await.expect(&statement);
        let now = user_id(&client).await;
        assert_ne!(now.as_deref(), Some("user_bob"), "{statement}");
        assert_ne!(now.as_deref(), Some("user_alice"), "{statement}");
    }

    // SET LOCAL inside a transaction: forged for the transaction (NULL),
    // and back to Carol's own identity afterwards.
    let mut carol = stack.login("user_carol").await;
    let tx = carol.transaction().await.expect("begin");
    tx.batch_execute(&format!("set local authgres.claims = '{forged}'"))
        .await
        .expect("set local");
    let inside: Option<String> = tx
        .query_one("select auth.user_id()", &[])
        .await
        .expect("inside")
        .get(0);
    assert_eq!(inside, None);
    tx.commit().await.expect("commit");
    assert_eq!(user_id(&carol).await.as_deref(), Some("user_carol"));

    // Calling begin_session again only invalidates one's own identity.
    carol
        .batch_execute("select auth.begin_session()")
        .await
        .expect("begin_session");
    assert_eq!(user_id(&carol).await, None);

    // Alice herself is untouched by all of the above.
    assert_eq!(user_id(&alice).await.as_deref(), Some("user_alice"));
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_options_cannot_set_identity_or_role() {
    let stack = Stack::start().await;
    let token = stack.issuer.token("user_alice");
    for options in [
        "options='-c authgres.claims={}'",
        "options='-c role=postgres'",
        "options='-c session_authorization=postgres'",
    ] {
        let (client, connection) = match tokio_postgres::connect(
            &stack.conninfo(
                "authenticated",
                &token,
                &format!("sslmode=disable {options}"),
            ),
            tokio_postgres::NoTls,
        )
        .await
        {
            Ok(pair) => pair,
            Err(error) => {
                assert_eq!(
                    error.code(),
                    Some(&SqlState::INSUFFICIENT_PRIVILEGE),
                    "{options}: {error}"
                );
                continue;
            }
        };
        drop((client, connection));
        panic!("{options} was accepted");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_logs_in_without_a_token_and_has_no_identity() {
    let stack = Stack::start().await;
    let out = stack.psql(
        "anonymous",
        None,
        &[
            "select coalesce(auth.user_id(), 'null'), current_user",
            "select count(*) from todos",
        ],
    );
    assert_eq!(stdout(&out), "null|anonymous\n0");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_request_reaches_the_upstream_backend() {
    let stack = Stack::start().await;
    let client = stack.login("user_alice").await;
    let cancel = client.cancel_token();
    let started = std::time::Instant::now();
    let sleeper = tokio::spawn(async move { client.batch_execute("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel request sent");
    let result = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("query ended after cancel")
        .expect("join");
    let error = result.expect_err("cancelled");
    assert_eq!(error.code(), Some(&SqlState::QUERY_CANCELED), "{error}");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread")]
async fn cleartext_tokens_can_be_refused_entirely() {
    let stack = Stack::start_with(common::Options {
        cleartext_tokens: "refuse",
        ..Default::default()
    })
    .await;
    let token = stack.issuer.token("user_alice");
    let error = stack
        .connect("authenticated", &token)
        .await
        .expect_err("refused");
    assert_eq!(
        error.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{error}"
    );
    let client = stack
        .connect_tls("authenticated", &token, "sslmode=require")
        .await
        .expect("TLS is accepted");
    client.simple_query("select 1").await.expect("query");
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_tls_verify_full_encrypts_the_upstream_leg() {
    let stack = Stack::start_with(common::Options {
        upstream_tls: Some(true),
        ..Default::default()
    })
    .await;
    let client = stack.login("user_alice").await;
    assert_eq!(
        common::user_id(&client).await.as_deref(),
        Some("user_alice")
    );
    // pg_stat_ssl is closed to the login roles (it shows other sessions of
    // the same role); the operator reads it.
    let pid = common::backend_pid(&client).await;
    let ssl: bool = stack
        .cluster
        .admin(common::DATABASE)
        .await
        .expect("admin")
        .query_one("select ssl from pg_stat_ssl where pid = $1", &[&pid])
        .await
        .expect("query")
        .get(0);
    assert!(ssl, "upstream leg is not TLS");
}

#[tokio::test(flavor = "multi_thread")]
async fn upstream_certificate_from_an_unknown_ca_is_refused() {
    let stack = Stack::start_with(common::Options {
        upstream_tls: Some(false),
        ..Default::default()
    })
    .await;
    let error = stack
        .connect("authenticated", &stack.issuer.token("user_alice"))
        .await
        .expect_err("refused");
    assert_eq!(
        error.code(),
        Some(&SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
        "{error}"
    );
    assert!(stack.log().contains("upstream TLS"), "{}", stack.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn terminating_the_upstream_backend_closes_the_client() {
    let stack = Stack::start().await;
    let mut raw = RawClient::connect(stack.port).await;
    raw.send_startup(&[
        ("user", "authenticated"),
        ("database", common::DATABASE),
        ("application_name", "victim"),
    ])
    .await;
    raw.read_message().await.expect("password request");
    raw.send_password(&stack.issuer.token("user_alice")).await;
    loop {
        let (tag, _) = raw.read_message().await.expect("handshake");
        if tag == b'Z' {
            break;
        }
    }
    let admin = stack.cluster.admin(common::DATABASE).await.expect("admin");
    let terminated = admin
        .query_one(
            "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity \
             where application_name = 'victim') t",
            &[],
        )
        .await
        .expect("terminate")
        .get::<_, i64>(0);
    assert_eq!(terminated, 1);
    let (code, _) = raw.expect_error().await;
    assert_eq!(code, "57P01", "admin_shutdown relayed");
    assert!(raw.closed_within(Duration::from_secs(5)).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn gssenc_is_declined_and_direct_tls_needs_alpn() {
    let stack = Stack::start().await;
    // GSSENCRequest gets 'N' and the startup continues in the clear.
    let mut raw = RawClient::connect(stack.port).await;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    raw.stream
        .write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
        .await
        .expect("write");
    let mut answer = [0u8; 1];
    raw.stream.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"N");
    raw.send_startup(&[("user", "anonymous"), ("database", common::DATABASE)])
        .await;
    let (tag, _) = raw.read_message().await.expect("AuthenticationOk");
    assert_eq!(tag, b'R');

    // Direct TLS without ALPN "postgresql" is dropped before startup.
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.port))
        .await
        .expect("connect");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(stack.ca_pem.as_bytes()) {
        roots.add(cert.expect("pem")).expect("add");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    if let Ok(mut tls) = connector.connect(name, tcp).await {
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [("user", "anonymous"), ("database", common::DATABASE)],
            &mut buf,
        )
        .expect("encode");
        let _ = tls.write_all(&buf).await;
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a direct TLS client without ALPN got an answer"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_sends_the_password_without_waiting_for_the_request() {
    let stack = Stack::start().await;
    let mut raw = RawClient::connect(stack.port).await;
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "authenticated"), ("database", common::DATABASE)],
        &mut buf,
    )
    .expect("encode");
    postgres_protocol::message::frontend::password_message(
        stack.issuer.token("user_alice").as_bytes(),
        &mut buf,
    )
    .expect("encode");
    postgres_protocol::message::frontend::query("select auth.user_id()", &mut buf).expect("encode");
    use tokio::io::AsyncWriteExt as _;
    raw.stream.write_all(&buf).await.expect("one write");
    let mut tags = Vec::new();
    let mut user = None;
    loop {
        let (tag, body) = raw.read_message().await.expect("message");
        tags.push(tag);
        if tag == b'D' {
            user = Some(String::from_utf8_lossy(&body[6..]).into_owned());
        }
        if tag == b'Z' && tags.contains(&b'C') {
            break;
        }
    }
    assert_eq!(tags[0], b'R', "the password is still asked for");
    assert_eq!(user.as_deref(), Some("user_alice"), "{tags:?}");
}
