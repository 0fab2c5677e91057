//! POST /sql through the real binary, at the protocol level: what a request
//! leaves behind never reaches the next one on the pooled connection, the
//! limits answer 413 and 507, typed rendering, CORS, and auth failures.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::time::{Duration, Instant};

use common::Stack;
use serde_json::{Value, json};

struct Http<'a> {
    stack: &'a Stack,
    client: reqwest::Client,
}

impl<'a> Http<'a> {
    fn new(stack: &'a Stack) -> Self {
        Self {
            stack,
            client: reqwest::Client::new(),
        }
    }

    async fn post(
        &self,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: Value,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .post(self.stack.http_url())
            .header(
                "Neon-Connection-String",
                format!(
                    "postgresql://authenticated@127.0.0.1:{}/{}",
                    self.stack.port,
                    common::DATABASE
                ),
            )
            .json(&body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn query(&self, token: &str, query: &str) -> Value {
        let (status, body) = self
            .post(
                Some(token),
                &[
                    ("Neon-Array-Mode", "true"),
                    ("Neon-Raw-Text-Output", "true"),
                ],
                json!({"query": query}),
            )
            .await;
        assert_eq!(status, 200, "{query}: {body}");
        body
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nothing_a_request_leaves_reaches_the_next_request() {
    let stack = Stack::start().await;
    let http = Http::new(&stack);
    let alice = stack.issuer.token("user_alice");
    let bob = stack.issuer.token("user_bob");
    // Alice leaves everything she can in the session, at session level.
    let leftovers = http
        .query(
            &alice,
            "select set_config('search_path', 'pg_temp', false), \
             set_config('authgres.claims', current_setting('authgres.claims'), false), \
             set_config('authgres.signature', current_setting('authgres.signature'), false), \
             set_config('application_name', 'alice-was-here', false), \
             pg_advisory_lock(42), auth.user_id()",
        )
        .await;
    assert_eq!(leftovers["rows"][0][5], "user_alice");
    http.query(&alice, "create temp table alice_temp (x int)")
        .await;
    http.query(&alice, "prepare alice_stmt as select 1").await;
    http.query(&alice, "listen alice_channel").await;
    // Bob, many times over the same pooled connections.
    for _ in 0..10 {
        let seen = http
            .query(
                &bob,
                "select auth.user_id(), current_setting('search_path'), current_setting('application_name'), \
                 (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()), \
                 to_regclass('pg_temp.alice_temp') is null, \
                 (select count(*) from pg_prepared_statements), \
                 (select count(*) from pg_listening_channels())",
            )
            .await;
        let row = &seen["rows"][0];
        assert_eq!(row[0], "user_bob", "{seen}");
        assert_ne!(row[1], "pg_temp");
        assert_ne!(row[2], "alice-was-here");
        assert_eq!(row[3], "0", "advisory lock leaked");
        assert_eq!(row[4], "t", "temp table leaked");
        assert_eq!(row[5], "0", "prepared statement leaked");
        assert_eq!(row[6], "0", "LISTEN leaked");
    }
    // An anonymous request on a connection Alice used has no identity.
    let (status, body) = http
        .client
        .post(stack.http_url())
        .header(
            "Neon-Connection-String",
            format!(
                "postgresql://anonymous@127.0.0.1:{}/{}",
                stack.port,
                common::DATABASE
            ),
        )
        .json(&json!({"query": "select auth.user_id() as me"}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), r))
        .expect("anonymous");
    assert_eq!(status, 200);
    let body: Value = body.json().await.expect("json");
    assert_eq!(body["rows"][0]["me"], Value::Null);
}

/// What a request sees of its session: the signature attached (which
/// changes with every reset: a new generation, a new signature), who it
/// is, and what an earlier request may have left. Its own text names no
/// temporary schema: a request that does is reset after it.
const SESSION: &str = "select current_setting('authgres.signature'), auth.user_id(), \
     current_setting('application_name'), coalesce(current_setting('app.x', true), ''), \
     (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()), \
     not exists (select from pg_class where relnamespace = pg_my_temp_schema()), \
     pg_backend_pid()";

#[tokio::test(flavor = "multi_thread")]
async fn a_tokens_requests_share_its_session_until_one_may_have_changed_it() {
    let stack = Stack::start_with(common::Options {
        http_extra: "pool_size = 1",
        ..Default::default()
    })
    .await;
    let http = Http::new(&stack);
    let alice = stack.issuer.token("user_alice");
    let bob = stack.issuer.token("user_bob");
    let session = |body: &Value| -> Vec<String> {
        let row = body["rows"][0].as_array().cloned().unwrap_or_default();
        row.iter()
            .map(|v| v.as_str().unwrap_or_default().to_owned())
            .collect()
    };
    let first = session(&http.query(&alice, SESSION).await);
    assert_eq!(first[1], "user_alice");
    assert_eq!(first[3..6], ["", "0", "t"]);
    let again = session(&http.query(&alice, SESSION).await);
    assert_eq!(
        again, first,
        "the same token's next request takes the session as it is: no reset, no attach"
    );
    // After a request that may have left something in its session, the
    // next one starts from a reset: a new signature, nothing left.
    let mut before = again;
    for (statement, status) in [
        ("set application_name = 'x'", 200),
        ("select set_config('app.x', '1', false)", 200),
        ("select pg_advisory_lock(7)", 200),
        ("select 1 as one into temp t", 200),
        ("create temp table t (x int)", 200),
        ("create table pg_temp.t as select 1 as x", 200),
        // Names spelled with Unicode escapes: `set_config`, `pg_temp`.
        (r#"select U&"set\005Fconfig"('app.x', '2', false)"#, 200),
        (r#"create table U&"pg\005Ftemp".u as select 1 as x"#, 200),
        ("select 1/0", 400),
        ("begin", 200),
    ] {
        let (got, body) = http
            .post(Some(&alice), &[], json!({"query": statement}))
            .await;
        assert_eq!(got, status, "{statement}: {body}");
        let after = session(&http.query(&alice, SESSION).await);
        assert_ne!(after[0], before[0], "no reset after {statement}");
        assert_eq!(after[1], "user_alice", "after {statement}");
        assert_eq!(after[2..6], first[2..6], "left by {statement}");
        assert_eq!(after[6], before[6], "one pooled connection");
        before = after;
    }
    // Another identity takes the connection only after a reset, and so
    // does Alice after it.
    let bobs = session(&http.query(&bob, SESSION).await);
    assert_eq!(bobs[1], "user_bob");
    assert_ne!(bobs[0], before[0]);
    let alices = session(&http.query(&alice, SESSION).await);
    assert_eq!(alices[1], "user_alice");
    assert_ne!(alices[0], bobs[0]);
    assert_ne!(alices[0], before[0]);
}

/// One keep-alive connection whose requests change tokens: each request
/// is who its own token says. The proxy remembers a connection's last
/// token to skip hashing it again; a forged or different token on the
/// same connection must not be taken for it.
#[tokio::test(flavor = "multi_thread")]
async fn each_request_on_one_connection_is_who_its_own_token_says() {
    use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
    let stack = Stack::start().await;
    let alice = stack.issuer.token("user_alice");
    let bob = stack.issuer.token("user_bob");
    let (signed, signature) = alice.rsplit_once('.').expect("three parts");
    let flipped = if signature.starts_with('A') { "B" } else { "A" };
    let forged = format!("{signed}.{flipped}{}", &signature[1..]);
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
        .await
        .expect("connect");
    let mut tcp = tokio::io::BufReader::new(tcp);
    let mut ask = async |token: &str| -> (u16, String) {
        let body = r#"{"query": "select auth.user_id()"}"#;
        let request = format!(
            "POST /sql HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {token}\r\n\
             neon-connection-string: postgresql://authenticated@127.0.0.1/{}\r\n\
             neon-array-mode: true\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}",
            common::DATABASE,
            body.len()
        );
        let answer = async {
            tcp.get_mut().write_all(request.as_bytes()).await?;
            let (mut status, mut length) = (0, 0);
            loop {
                let mut line = String::new();
                if tcp.read_line(&mut line).await? == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                let line = line.trim_end().to_ascii_lowercase();
                if let Some(rest) = line.strip_prefix("http/1.1 ") {
                    status = rest[..3].parse().unwrap_or(0);
                } else if let Some(rest) = line.strip_prefix("content-length: ") {
                    length = rest.parse().unwrap_or(0);
                } else if line.is_empty() {
                    break;
                }
            }
            let mut body = vec![0; length];
            tcp.read_exact(&mut body).await?;
            Ok::<_, std::io::Error>((status, String::from_utf8_lossy(&body).into_owned()))
        };
        (tokio::time::timeout(Duration::from_secs(20), answer))
            .await
            .expect("an answer within 20 s")
            .expect("the same connection answers")
    };
    let user = |answer: (u16, String)| -> String {
        assert_eq!(answer.0, 200, "{}", answer.1);
        let body: Value = serde_json::from_str(&answer.1).expect("json");
        body["rows"][0][0].as_str().expect("a user id").to_owned()
    };
    assert_eq!(user(ask(&alice).await), "user_alice");
    assert_eq!(user(ask(&alice).await), "user_alice");
    assert_eq!(user(ask(&bob).await), "user_bob");
    let (status, body) = ask(&forged).await;
    assert!(status == 400 && body.contains("28P01"), "{status} {body}");
    assert_eq!(user(ask(&alice).await), "user_alice");
    let (status, body) = ask(&forged).await;
    assert!(status == 400 && body.contains("28P01"), "{status} {body}");
    assert_eq!(user(ask(&bob).await), "user_bob");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_or_failed_transaction_is_rolled_back_before_reuse() {
    let stack = Stack::start().await;
    let http = Http::new(&stack);
    let alice = stack.issuer.token("user_alice");
    http.query(&alice, "begin").await;
    let (status, _) = http
        .post(Some(&alice), &[], json!({"queries": [{"query": "insert into todos (task) values ('x')"}, {"query": "select 1/0"}]}))
        .await;
    assert_eq!(status, 400);
    let seen = http
        .query(&alice, "select current_setting('transaction_isolation'), (select count(*) from todos), pg_current_xact_id_if_assigned() is null")
        .await;
    assert_eq!(
        seen["rows"][0][1], "0",
        "the failed batch's insert survived"
    );
    assert_eq!(seen["rows"][0][2], "t");
}

#[tokio::test(flavor = "multi_thread")]
async fn typed_rendering_without_raw_text_output() {
    let stack = Stack::start().await;
    let http = Http::new(&stack);
    let (status, body) = http
        .post(
            Some(&stack.issuer.token("user_alice")),
            &[],
            json!({"query": "select true as b, 7::int2 as s, 42 as i, 1.5::float8 as f, 'NaN'::float4 as nan, \
                    9007199254740993::int8 as big, 12.50::numeric as num, '{\"k\": [1]}'::jsonb as j, \
                    array[1,null,3] as a, array['x,y', null] as ta, null::text as n, $1::text as p",
                   "params": [123]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["rows"][0],
        json!({"b": true, "s": 7, "i": 42, "f": 1.5, "nan": "NaN", "big": "9007199254740993",
               "num": "12.50", "j": {"k": [1]}, "a": [1, null, 3], "ta": ["x,y", null], "n": null, "p": "123"})
    );
    assert_eq!(body["rowAsArray"], false);
    assert_eq!(body["command"], "SELECT");
    assert_eq!(body["rowCount"], 1);
    // Rows without columns are rows all the same.
    let body = http
        .query(
            &stack.issuer.token("user_alice"),
            "select from generate_series(1, 3)",
        )
        .await;
    assert_eq!(body["rows"], json!([[], [], []]), "{body}");
    assert_eq!(body["rowCount"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_auth_failures_and_cors() {
    let stack = Stack::start().await;
    let http = Http::new(&stack);
    let alice = stack.issuer.token("user_alice");
    // 413: a request body over 10 MiB. Raw HTTP, writing and reading at
    // once: the server answers before it has read the whole body, and a
    // client that only reads after writing would see the close instead.
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
            .await
            .expect("connect");
        let (mut read, mut write) = tcp.into_split();
        let body = format!(
            r#"{{"query": "select $1", "params": ["{}"]}}"#,
            "x".repeat(11 * 1024 * 1024)
        );
        let request = format!(
            "POST /sql HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {alice}\r\n\
             neon-connection-string: postgresql://authenticated@127.0.0.1/app\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let writer = tokio::spawn(async move {
            let _ = write.write_all(request.as_bytes()).await;
        });
        let mut head = vec![0u8; 12];
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            read.read_exact(&mut head),
        )
        .await
        .expect("an answer within 20 s")
        .expect("read");
        assert_eq!(&head, b"HTTP/1.1 413", "{}", String::from_utf8_lossy(&head));
        writer.abort();
    }
    // 507: a response over 10 MiB.
    let (status, body) = http
        .post(
            Some(&alice),
            &[],
            json!({"query": "select repeat('x', 1024*1024) from generate_series(1, 12)"}),
        )
        .await;
    assert_eq!(status, 507, "{body}");
    // The connection that hit the limit is still fine for the next request.
    assert_eq!(
        http.query(&alice, "select auth.user_id()").await["rows"][0][0],
        "user_alice"
    );
    // 400 (as Neon answers, so the driver keeps the SQLSTATE) without a
    // token or with a bad one.
    let (status, body) = http.post(None, &[], json!({"query": "select 1"})).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("28000")),
        "{body}"
    );
    let (status, body) = http
        .post(Some("garbage"), &[], json!({"query": "select 1"}))
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("28P01")),
        "{body}"
    );
    // CORS preflight and headers on answers.
    let preflight = http
        .client
        .request(reqwest::Method::OPTIONS, stack.http_url())
        .send()
        .await
        .expect("preflight");
    assert_eq!(preflight.status().as_u16(), 204);
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    assert_eq!(
        preflight.headers()["access-control-allow-methods"],
        "POST, OPTIONS"
    );
    let allowed = preflight.headers()["access-control-allow-headers"]
        .to_str()
        .expect("ascii");
    for header in [
        "Authorization",
        "Neon-Connection-String",
        "Neon-Batch-Isolation-Level",
    ] {
        assert!(allowed.contains(header), "{allowed}");
    }
    let answer = http
        .client
        .post(stack.http_url())
        .body("{}")
        .send()
        .await
        .expect("post");
    assert_eq!(answer.headers()["access-control-allow-origin"], "*");
    // Another method on /sql is refused with what it allows; another path
    // is not found. Both carry the CORS headers too.
    let other = http.client.get(stack.http_url()).send().await.expect("get");
    assert_eq!(other.status().as_u16(), 405);
    assert_eq!(other.headers()["allow"], "POST,OPTIONS");
    assert_eq!(other.headers()["access-control-allow-origin"], "*");
    let missing = http
        .client
        .post(stack.http_url().replace("/sql", "/nowhere"))
        .body("{}")
        .send()
        .await
        .expect("post elsewhere");
    assert_eq!(missing.status().as_u16(), 404);
    assert_eq!(missing.headers()["access-control-allow-origin"], "*");
}

#[tokio::test(flavor = "multi_thread")]
async fn https_with_the_wire_listeners_certificate() {
    let stack = Stack::start_with(common::Options {
        http_tls: true,
        ..Default::default()
    })
    .await;
    let ca = reqwest::Certificate::from_pem(stack.ca_pem.as_bytes()).expect("CA");
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .expect("client");
    let url = format!("https://localhost:{}/sql", stack.http_port);
    let response = client
        .post(&url)
        .bearer_auth(stack.issuer.token("user_alice"))
        .header(
            "Neon-Connection-String",
            format!(
                "postgresql://authenticated@localhost:{}/{}",
                stack.port,
                common::DATABASE
            ),
        )
        .json(&json!({"query": "select auth.user_id() as me"}))
        .send()
        .await
        .expect("HTTPS request");
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["rows"][0]["me"], "user_alice");
    // Plain HTTP on the HTTPS port gets no answer.
    let plain = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/sql", stack.http_port))
        .body("{}")
        .send()
        .await;
    assert!(plain.is_err() || !plain.expect("response").status().is_success());
}

/// Backends of the sandbox cluster running `select pg_sleep(<seconds>)`, as
/// the superuser sees them.
async fn sleeping(admin: &tokio_postgres::Client, seconds: u32) -> i64 {
    admin
        .query_one(
            "select count(*) from pg_stat_activity where state = 'active' and query like $1",
            &[&format!("select pg_sleep({seconds})%")],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Waits up to `wait` for `seconds`-long sleepers to number `count`.
async fn until_sleeping(admin: &tokio_postgres::Client, seconds: u32, count: i64, wait: Duration) {
    let started = Instant::now();
    loop {
        let now = sleeping(admin, seconds).await;
        if now == count {
            return;
        }
        assert!(
            started.elapsed() < wait,
            "{now} backends still run pg_sleep({seconds}) after {wait:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 21: a request's own statements get `[http] statement_timeout`, not
/// the proxy's internal deadline (5 s); a statement over it, or one whose
/// client hung up, is cancelled on the server, and its connection is proven
/// idle before anyone uses it again.
#[tokio::test(flavor = "multi_thread")]
async fn statements_run_to_their_own_timeout_and_abandoned_ones_are_cancelled() {
    use tokio::io::AsyncWriteExt as _;
    let stack = Stack::start_with(common::Options {
        http_extra: "statement_timeout = \"12s\"",
        ..Default::default()
    })
    .await;
    let admin = stack.cluster.admin(common::DATABASE).await.expect("admin");
    let http = Http::new(&stack);
    let alice = stack.issuer.token("user_alice");

    // A client that hangs up while its statement runs, with or without
    // keep-alive.
    for (seconds, connection) in [(61, "keep-alive"), (62, "close")] {
        let body = format!(r#"{{"query": "select pg_sleep({seconds})"}}"#);
        let request = format!(
            "POST /sql HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {alice}\r\n\
             neon-connection-string: postgresql://authenticated@127.0.0.1:{}/{}\r\n\
             content-type: application/json\r\nconnection: {connection}\r\n\
             content-length: {}\r\n\r\n{body}",
            stack.port,
            common::DATABASE,
            body.len()
        );
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
            .await
            .expect("connect");
        tcp.write_all(request.as_bytes()).await.expect("request");
        until_sleeping(&admin, seconds, 1, Duration::from_secs(5)).await;
        drop(tcp);
        until_sleeping(&admin, seconds, 0, Duration::from_secs(3)).await;
    }

    // Nine seconds is within the limit; sixty is not.
    let started = Instant::now();
    let ((nine, _), (over, error), ()) = tokio::join!(
        http.post(Some(&alice), &[], json!({"query": "select pg_sleep(9)"})),
        http.post(Some(&alice), &[], json!({"query": "select pg_sleep(60)"})),
        async {
            until_sleeping(&admin, 60, 1, Duration::from_secs(5)).await;
        }
    );
    assert_eq!(nine, 200);
    assert_eq!(
        (over, error["code"].as_str()),
        (400, Some("57014")),
        "{error}"
    );
    let waited = started.elapsed();
    assert!(
        (Duration::from_secs(12)..Duration::from_secs(16)).contains(&waited),
        "answered after {waited:?}"
    );
    until_sleeping(&admin, 60, 0, Duration::from_secs(2)).await;
    // The pool still serves, on connections proven idle.
    for _ in 0..3 {
        assert_eq!(
            http.query(&alice, "select auth.user_id()").await["rows"][0][0],
            "user_alice"
        );
    }
}
