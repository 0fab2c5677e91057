//! Two identity providers in front of one database (issue 21 item 5): a
//! `sub` is unique only among its own issuer's users, so the identity the
//! proxy signs must carry the issuer, or the operator must say the two
//! providers name the same people. Through the real binary, against a real
//! Postgres, with tokens from two local issuers, each with its own keys.

#![allow(clippy::expect_used, reason = "test code: a panic is a failing test")]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use authgres_sandbox::Issuer;
use common::{RawClient, Stack, user_id};
use serde_json::{Value, json};

const SUB: &str = "user_same";

/// A second `[[providers]]` for `issuer`, serving `authenticated`, with
/// `extra` lines.
fn second_provider(issuer: &Issuer, extra: &str) -> String {
    format!(
        "\n[[providers]]\nname = \"other\"\nissuer = \"{}\"\njwks_url = \"{}\"\n\
         roles = [\"authenticated\"]\n{extra}",
        issuer.issuer(),
        issuer.jwks_url()
    )
}

/// The stack's proxy restarted with its provider given `first` lines and a
/// second provider for `other` given `second` lines (the sandbox provider's
/// table is the file's last).
fn two_providers(stack: &mut Stack, other: &Issuer, first: &str, second: &str) {
    stack.edit_config(|text| format!("{text}{first}{}", second_provider(other, second)));
    stack.restart_proxy();
}

/// `auth.user_id()`, `auth.issuer()` and the todos visible, as one row.
const WHO: &str = "select auth.user_id() as me, auth.issuer() as iss, \
                   (select count(*) from todos)::int as todos";

/// What [`WHO`] says over the wire.
async fn who(client: &tokio_postgres::Client) -> (Option<String>, Option<String>, i32) {
    let row = client.query_one(WHO, &[]).await.expect("who");
    (row.get(0), row.get(1), row.get(2))
}

/// What [`WHO`] says over `/sql` for `token`.
async fn who_over_sql(stack: &Stack, token: &str) -> Value {
    let response = reqwest::Client::new()
        .post(stack.http_url())
        .header(
            "Neon-Connection-String",
            format!(
                "postgresql://authenticated@127.0.0.1:{}/{}",
                stack.port,
                common::DATABASE
            ),
        )
        .bearer_auth(token)
        .json(&json!({ "query": WHO }))
        .send()
        .await
        .expect("POST /sql");
    let status = response.status().as_u16();
    let body: Value = response.json().await.expect("json");
    assert_eq!(status, 200, "{body}");
    body["rows"][0].clone()
}

/// `auth.user_id()` and `auth.issuer()` of a `person` login over
/// OAUTHBEARER with `token`.
async fn who_over_oauthbearer(stack: &Stack, token: &str) -> String {
    let mut raw = RawClient::connect(stack.port).await;
    raw.send_startup(&[("user", "person"), ("database", common::DATABASE)])
        .await;
    raw.read_message().await.expect("AuthenticationSASL");
    let mut buf = bytes::BytesMut::new();
    let first = format!("n,,\x01auth=Bearer {token}\x01\x01");
    postgres_protocol::message::frontend::sasl_initial_response(
        "OAUTHBEARER",
        first.as_bytes(),
        &mut buf,
    )
    .expect("encode");
    raw.send(&buf).await;
    raw.read_until(b'Z').await;
    raw.send(&common::message(
        b'Q',
        b"select auth.user_id() || ' ' || auth.issuer()\0",
    ))
    .await;
    loop {
        let (tag, body) = raw.read_message().await.expect("a reply");
        match tag {
            b'D' => return String::from_utf8_lossy(&body[6..]).into_owned(),
            b'E' => panic!("{:?}", common::error_fields(&body)),
            _ => {}
        }
    }
}

/// The attack's precondition: two providers, neither prefixed nor shared.
/// `check-config` and `serve` both refuse it, naming both providers, the
/// role and the two ways out.
#[tokio::test]
async fn two_providers_on_one_role_without_a_namespace_are_refused() {
    let (a, b) = (
        Issuer::start().await.expect("issuer a"),
        Issuer::start().await.expect("issuer b"),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = format!(
        "secrets_file = \"authgres.env\"\n[listen]\naddress = \"127.0.0.1:{}\"\n\
         [upstream]\nhost = \"127.0.0.1\"\nport = {}\n\
         [[providers]]\nname = \"first\"\nissuer = \"{}\"\njwks_url = \"{}\"\n{}",
        common::free_port(),
        common::free_port(),
        a.issuer(),
        a.jwks_url(),
        second_provider(&b, ""),
    );
    std::fs::write(dir.path().join("proxy.toml"), config).expect("config");
    std::fs::write(
        dir.path().join("authgres.env"),
        format!(
            "AUTHGRES_CLAIMS_KEY={}\nAUTHGRES_AUTHENTICATED_PASSWORD=x\n",
            "ab".repeat(32)
        ),
    )
    .expect("secrets");
    let expect_refusal = |what: &str, text: &str| {
        for expected in [
            "providers \"first\" (line 7, column 1) and \"other\" (line 12, column 1)",
            "would give different people the same auth.user_id()",
            "both serve role \"authenticated\"",
            "user_id_prefix = \"other:\"",
            "shared_user_ids = true under both",
        ] {
            assert!(text.contains(expected), "{what}: {expected:?} in {text}");
        }
    };

    let (passed, text) = common::check_config(&dir.path().join("proxy.toml"));
    assert!(!passed, "check-config accepted it: {text}");
    expect_refusal("check-config", &text);

    let mut serve = Command::new(common::BIN)
        .args(["serve", "--config"])
        .arg(dir.path().join("proxy.toml"))
        .env_remove("AUTHGRES_CLAIMS_KEY")
        .env_remove("AUTHGRES_AUTHENTICATED_PASSWORD")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = serve.try_wait().expect("wait") {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if status.is_none() {
        let _ = serve.kill();
    }
    let output = serve.wait_with_output().expect("serve output");
    let text = String::from_utf8_lossy(&output.stderr);
    let status = status.unwrap_or_else(|| panic!("serve started with the config: {text}"));
    assert!(!status.success(), "{text}");
    expect_refusal("serve", &text);
}

/// The attack itself, closed: the same `sub` from two providers with a
/// `user_id_prefix` each is two users, over the wire, over `/sql` and over
/// OAUTHBEARER. An identity was a sub without its issuer.
#[tokio::test(flavor = "multi_thread")]
async fn the_same_sub_from_two_prefixed_providers_is_two_users() {
    let mut stack = Stack::start().await;
    let other = Issuer::start().await.expect("second issuer");
    two_providers(
        &mut stack,
        &other,
        "user_id_prefix = \"a:\"\n",
        "user_id_prefix = \"b:\"\n",
    );
    let (iss_a, iss_b) = (stack.issuer.issuer().to_owned(), other.issuer().to_owned());
    let (token_a, token_b) = (stack.issuer.token(SUB), other.token(SUB));

    let a = stack
        .connect("authenticated", &token_a)
        .await
        .expect("a logs in");
    a.execute("insert into todos (task) values ('a''s secret')", &[])
        .await
        .expect("a writes");
    let b = stack
        .connect("authenticated", &token_b)
        .await
        .expect("b logs in");
    assert_eq!(
        who(&a).await,
        (Some(format!("a:{SUB}")), Some(iss_a.clone()), 1)
    );
    assert_eq!(
        who(&b).await,
        (Some(format!("b:{SUB}")), Some(iss_b.clone()), 0),
        "b must not see a's row"
    );
    // Every reading of the identity carries the prefix; the raw claim is
    // the proxy's, signed.
    let row = b
        .query_one(
            "select auth.jwt() ->> 'sub', auth.uid() is null, \
                    (select count(*) from todos where user_id = $1)::int",
            &[&SUB],
        )
        .await
        .expect("claims");
    assert_eq!(row.get::<_, Option<String>>(0), Some(format!("b:{SUB}")));
    assert!(row.get::<_, bool>(1));
    assert_eq!(row.get::<_, i32>(2), 0);

    assert_eq!(
        who_over_sql(&stack, &token_b).await,
        json!({ "me": format!("b:{SUB}"), "iss": iss_b, "todos": 0 })
    );
    assert_eq!(
        who_over_sql(&stack, &token_a).await,
        json!({ "me": format!("a:{SUB}"), "iss": iss_a, "todos": 1 })
    );
    assert_eq!(
        who_over_oauthbearer(&stack, &token_a).await,
        format!("a:{SUB} {iss_a}")
    );

    // A provider without a prefix beside a prefixed one keeps its user
    // ids, and a token whose sub would be one of the other's is refused.
    stack.edit_config(|text| text.replace("user_id_prefix = \"a:\"\n", ""));
    stack.restart_proxy();
    assert_eq!(user_id(&stack.login(SUB).await).await.as_deref(), Some(SUB));
    let error = stack
        .connect("authenticated", &stack.issuer.token(&format!("b:{SUB}")))
        .await
        .expect_err("a sub inside another provider's prefix is refused");
    assert_eq!(
        error.as_db_error().map(|e| e.code().code()),
        Some("28P01"),
        "{error}"
    );
}

/// The opt-in: with `shared_user_ids = true` on both, the same `sub` is the
/// same user (a migration between two instances of one provider).
#[tokio::test(flavor = "multi_thread")]
async fn shared_user_ids_make_the_same_sub_one_user() {
    let mut stack = Stack::start().await;
    let other = Issuer::start().await.expect("second issuer");
    two_providers(
        &mut stack,
        &other,
        "shared_user_ids = true\n",
        "shared_user_ids = true\n",
    );
    let a = stack.login(SUB).await;
    a.execute("insert into todos (task) values ('moved with me')", &[])
        .await
        .expect("a writes");
    let b = stack
        .connect("authenticated", &other.token(SUB))
        .await
        .expect("b logs in");
    assert_eq!(
        who(&b).await,
        (Some(SUB.to_owned()), Some(other.issuer().to_owned()), 1)
    );
    assert_eq!(
        who_over_sql(&stack, &other.token(SUB)).await["me"],
        json!(SUB)
    );
}

/// One provider: no prefix, the claims SQL sees are the token's, and
/// `auth.issuer()` names it. An init-db of the previous schema version
/// upgrades in place.
#[tokio::test(flavor = "multi_thread")]
async fn a_single_provider_is_unchanged_and_the_schema_upgrades() {
    let stack = Stack::start().await;
    let token = stack.issuer.token(SUB);
    let client = stack
        .connect("authenticated", &token)
        .await
        .expect("logs in");
    let payload = token.split('.').nth(1).expect("payload");
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, payload)
            .expect("base64"),
    )
    .expect("json");
    let row = client
        .query_one("select auth.jwt()::text", &[])
        .await
        .expect("jwt");
    let seen: Value = serde_json::from_str(&row.get::<_, String>(0)).expect("jwt json");
    assert_eq!(seen, claims, "the token's claims, untouched");
    assert_eq!(
        who(&client).await,
        (
            Some(SUB.to_owned()),
            Some(stack.issuer.issuer().to_owned()),
            0
        )
    );

    // The previous schema (v2) had no auth.issuer().
    let admin = stack.installer().await;
    admin
        .batch_execute("drop function auth.issuer(); update auth.schema_version set version = 2")
        .await
        .expect("back to v2");
    let out = stack.init_db(&[]);
    assert!(out.contains("upgraded from v2 to v4"), "{out}");
    let client = stack.login(SUB).await;
    assert_eq!(who(&client).await.1.as_deref(), Some(stack.issuer.issuer()));
}
