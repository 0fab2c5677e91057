//! Issue 25 item 5: the audit log through the real binary. Two users with
//! their own `sub`, `jti` and tenant, and an anonymous client, run
//! transactions over TCP, TLS, WebSocket and `/sql`; every line of the log
//! is parsed as JSON and must say who ran what: one line per transaction,
//! the token's identity, rows and SQLSTATE, and no statement text unless
//! configured (then with no literal in it). Without `[audit]` nothing is
//! written.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]
#![allow(missing_docs)]

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use authgres_sandbox::TokenSpec;
use common::{DATABASE, Options, Stack};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A token for `sub` with its own `jti` and tenant (`org_id`).
fn token(stack: &Stack, sub: &str, jti: &str, org: &str) -> String {
    stack.issuer.mint(
        &TokenSpec::new(sub)
            .claim("jti", json!(jti))
            .claim("org_id", json!(org)),
    )
}

/// Restarts the stack's proxy with the provider's tenant claim and `extra`
/// sections (`[audit]`, `[metrics]`) appended.
fn configure(stack: &mut Stack, extra: &str) {
    stack.edit_config(|text| {
        let text = text.replace(
            "roles = [\"authenticated\", \"person\"]\n",
            "roles = [\"authenticated\", \"person\"]\ntenant_claim = \"$.org_id\"\n",
        );
        format!("{text}{extra}")
    });
    stack.restart_proxy();
}

fn audit_path(stack: &Stack) -> PathBuf {
    stack.dir.path().join("audit.log")
}

/// The log's lines, parsed, once there are at least `count` (10 s at most).
async fn lines(stack: &Stack, count: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(audit_path(stack)).unwrap_or_default();
        let parsed: Vec<Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
            .collect();
        if parsed.len() >= count {
            return parsed;
        }
        assert!(
            Instant::now() < deadline,
            "{} lines of {count}:\n{text}",
            parsed.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `/sql` request as `authenticated`: status and body.
async fn sql(stack: &Stack, token: &str, query: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(stack.http_url())
        .bearer_auth(token)
        .header(
            "Neon-Connection-String",
            format!("postgresql://authenticated@127.0.0.1/{DATABASE}"),
        )
        .json(&json!({ "query": query }))
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// A Postgres message: tag, length, body.
fn message(tag: Option<u8>, body: &[u8]) -> Vec<u8> {
    let mut out: Vec<u8> = tag.into_iter().collect();
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A client WebSocket frame (binary), masked with zeros.
fn ws_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x82];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n <= 0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(payload);
    frame
}

/// A Postgres session over the WebSocket transport (`/v2`), by hand.
struct WebSocket {
    tcp: tokio::net::TcpStream,
    /// Postgres bytes received and not yet read.
    received: Vec<u8>,
}

impl WebSocket {
    async fn login(stack: &Stack, token: &str) -> Self {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
            .await
            .expect("connect");
        tcp.write_all(
            b"GET /v2 HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
              sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("upgrade");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(tcp.read_u8().await.expect("101"));
        }
        assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
        let mut startup = 196_608u32.to_be_bytes().to_vec();
        startup
            .extend_from_slice(format!("user\0authenticated\0database\0{DATABASE}\0\0").as_bytes());
        let mut socket = Self {
            tcp,
            received: Vec::new(),
        };
        socket.send(&message(None, &startup)).await;
        socket.until(b'R').await;
        socket
            .send(&message(Some(b'p'), format!("{token}\0").as_bytes()))
            .await;
        socket.until(b'Z').await;
        socket
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(&ws_frame(bytes)).await.expect("send");
    }

    /// Reads messages until one tagged `tag`; returns the tags seen.
    async fn until(&mut self, tag: u8) -> Vec<u8> {
        let mut tags = Vec::new();
        loop {
            while self.received.len() >= 5 {
                let length =
                    u32::from_be_bytes(self.received[1..5].try_into().expect("4 bytes")) as usize;
                if self.received.len() < 1 + length {
                    break;
                }
                let seen = self.received[0];
                self.received.drain(..1 + length);
                tags.push(seen);
                if seen == tag {
                    return tags;
                }
            }
            let mut head = [0u8; 2];
            self.tcp.read_exact(&mut head).await.expect("frame");
            let length = match head[1] & 0x7f {
                126 => u64::from(self.tcp.read_u16().await.expect("length")),
                127 => self.tcp.read_u64().await.expect("length"),
                n => u64::from(n),
            };
            let mut payload = vec![0u8; length as usize];
            self.tcp.read_exact(&mut payload).await.expect("payload");
            if head[0] & 0x0f == 0x2 {
                self.received.extend_from_slice(&payload);
            }
        }
    }

    async fn query(&mut self, sql: &str) -> Vec<u8> {
        self.send(&message(Some(b'Q'), format!("{sql}\0").as_bytes()))
            .await;
        self.until(b'Z').await
    }
}

/// The lines of `transport` by `sub` (`None`: anonymous).
fn of<'a>(lines: &'a [Value], transport: &str, sub: Option<&str>) -> Vec<&'a Value> {
    let sub = sub.map_or(Value::Null, Value::from);
    lines
        .iter()
        .filter(|l| l["transport"] == transport && l["sub"] == sub)
        .collect()
}

/// Rows and SQLSTATE of each line.
fn outcomes(lines: &[&Value]) -> Vec<(u64, Option<String>)> {
    lines
        .iter()
        .map(|l| {
            let rows = l["rows"].as_u64().expect("rows");
            (rows, l["sqlstate"].as_str().map(str::to_owned))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_transport_writes_one_line_per_transaction_with_the_tokens_identity() {
    let mut stack = Stack::start().await;
    configure(
        &mut stack,
        "[audit]\noutput = \"audit.log\"\n[metrics]\ntenants = [\"org_a\"]\n",
    );
    let alice = token(&stack, "user_alice", "jti-alice", "org_a");
    let bob = token(&stack, "user_bob", "jti-bob", "org_b");

    // TCP: an autocommit insert, a transaction block of three queries, a
    // failing statement.
    let tcp = stack.connect("authenticated", &alice).await.expect("alice");
    tcp.simple_query("insert into todos (task) values ('alice-secret-1'), ('alice-secret-2')")
        .await
        .expect("insert");
    for statement in ["begin", "select * from todos", "commit"] {
        tcp.simple_query(statement).await.expect(statement);
    }
    let error = tcp
        .simple_query("select * from no_such_table")
        .await
        .expect_err("no such table");
    assert_eq!(error.code().map(|c| c.code()), Some("42P01"));
    drop(tcp);

    // TLS, WebSocket and /sql.
    let tls = stack
        .connect_tls("authenticated", &bob, "sslmode=require")
        .await
        .expect("bob over TLS");
    tls.simple_query("select 1 from generate_series(1, 3)")
        .await
        .expect("select");
    drop(tls);
    let mut ws = WebSocket::login(&stack, &bob).await;
    let tags = ws.query("select 42").await;
    assert_eq!(tags, b"TDCZ");
    let tags = ws.query("select * from no_such_table").await;
    assert_eq!(tags, b"EZ");
    let (status, body) = sql(&stack, &alice, "select * from todos").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = sql(&stack, &alice, "select * from no_such_table").await;
    assert_eq!(status, 400, "{body}");

    // An anonymous client.
    let anonymous = stack.connect("anonymous", "").await.expect("anonymous");
    anonymous.simple_query("select 1").await.expect("select");

    let all = lines(&stack, 9).await;
    let tcp_lines = of(&all, "tcp", Some("user_alice"));
    assert_eq!(
        outcomes(&tcp_lines),
        [(2, None), (2, None), (0, Some("42P01".into()))],
        "{all:#?}"
    );
    assert_eq!(
        outcomes(&of(&all, "tls", Some("user_bob"))),
        [(3, None)],
        "{all:#?}"
    );
    assert_eq!(
        outcomes(&of(&all, "websocket", Some("user_bob"))),
        [(1, None), (0, Some("42P01".into()))],
        "{all:#?}"
    );
    assert_eq!(
        outcomes(&of(&all, "http", Some("user_alice"))),
        [(2, None), (0, Some("42P01".into()))],
        "{all:#?}"
    );
    let anonymous_lines = of(&all, "tcp", None);
    assert_eq!(outcomes(&anonymous_lines), [(1, None)], "{all:#?}");
    assert_eq!(all.len(), 9, "one line per transaction: {all:#?}");

    for line in &all {
        let identified = line["sub"] != Value::Null;
        let (jti, tenant) = match line["sub"].as_str() {
            Some("user_alice") => ("jti-alice", "org_a"),
            _ => ("jti-bob", "org_b"),
        };
        if identified {
            assert_eq!(line["iss"], stack.issuer.issuer(), "{line}");
            assert_eq!(line["jti"], jti, "{line}");
            assert_eq!(line["tenant"], tenant, "{line}");
            assert_eq!(line["provider"], "sandbox", "{line}");
            assert_eq!(line["user_id"], line["sub"], "{line}");
            assert_eq!(line["role"], "authenticated", "{line}");
        } else {
            for field in ["iss", "jti", "tenant", "provider", "user_id"] {
                assert_eq!(line[field], Value::Null, "{field}: {line}");
            }
            assert_eq!(line["role"], "anonymous", "{line}");
        }
        assert_eq!(line["database"], DATABASE, "{line}");
        let client = line["client"].as_str().expect("client");
        assert!(client.starts_with("127.0.0.1:"), "{line}");
        assert!(line["duration_us"].as_u64().is_some(), "{line}");
        let time = line["time"].as_str().expect("time");
        assert!(
            humantime::parse_rfc3339(time).is_ok() && time.ends_with('Z'),
            "{line}"
        );
        assert!(
            line.get("statements").is_none(),
            "statement text is off: {line}"
        );
    }
    let text = std::fs::read_to_string(audit_path(&stack)).expect("log");
    assert!(!text.contains("secret") && !text.contains("no_such_table"));
    let mode = std::fs::metadata(audit_path(&stack))
        .expect("log")
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    // Only the named tenant has series; the audit counted what it wrote.
    let metrics = stack.metrics().await;
    let org_a = metrics["authgres_tenant_transactions_total{tenant=\"org_a\"}"];
    assert_eq!(org_a, 5.0, "alice's TCP and /sql transactions");
    assert!(!metrics.keys().any(|k| k.contains("org_b")));
    assert_eq!(metrics["authgres_audit_lines_total"], 9.0);
    assert_eq!(metrics["authgres_audit_dropped_total"], 0.0);

    // Item 4: the tenants' listing counts both, series or not.
    let (status, body) = stack.admin_get("/tenants").await;
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).expect("JSON");
    let count = |tenant: &str| {
        listed["tenants"]
            .as_array()
            .expect("a list")
            .iter()
            .find(|t| t["tenant"] == tenant)
            .map(|t| t["transactions"].clone())
    };
    assert_eq!(count("org_a"), Some(json!(5)), "{body}");
    assert_eq!(count("org_b"), Some(json!(3)), "{body}");

    // logrotate: the file moves away, SIGHUP opens a new one.
    let rotated = stack.dir.path().join("audit.log.1");
    std::fs::rename(audit_path(&stack), &rotated).expect("rotate");
    stack.signal(nix::sys::signal::Signal::SIGHUP);
    stack.wait_log("configuration reloaded").await;
    let client = stack.connect("authenticated", &alice).await.expect("alice");
    client.simple_query("select 1").await.expect("select");
    let after = lines(&stack, 1).await;
    assert_eq!(after.len(), 1, "{after:#?}");
    assert_eq!(after[0]["jti"], "jti-alice");
    let old = std::fs::read_to_string(&rotated).expect("rotated log");
    assert_eq!(old.lines().count(), 9);
}

#[tokio::test(flavor = "multi_thread")]
async fn normalized_statements_per_statement_leak_no_literal_and_sigterm_flushes() {
    let mut stack = Stack::start_with(Options {
        upstream_extra: "pool_mode = \"transaction\"",
        ..Options::default()
    })
    .await;
    configure(
        &mut stack,
        "[audit]\nper = \"statement\"\nstatements = \"normalized\"\noutput = \"audit.log\"\n",
    );
    let alice = token(&stack, "user_alice", "jti-alice", "org_a");
    let client = stack.connect("authenticated", &alice).await.expect("alice");
    for statement in [
        "begin",
        "insert into todos (task) values ('alice-secret') /* comment-secret */",
        "select task, 42 from todos where task = E'alice-\\'secret'",
        "commit",
    ] {
        client.simple_query(statement).await.expect(statement);
    }
    // Extended protocol: the statement's text, never its parameters.
    let rows = client
        .query("select $1::text as echoed", &[&"param-secret"])
        .await
        .expect("query");
    assert_eq!(rows.len(), 1);
    drop(client);
    let (status, body) = sql(&stack, &alice, "select 'http-secret', 7").await;
    assert_eq!(status, 200, "{body}");

    // A clean SIGTERM writes every queued line before the process exits.
    stack.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(stack.wait_exit(Duration::from_secs(20)).is_some(), "exits");
    let text = std::fs::read_to_string(audit_path(&stack)).expect("log");
    let all: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    for secret in ["secret", "param", "comment"] {
        assert!(!text.contains(secret), "{secret} leaked:\n{text}");
    }
    let statements: Vec<&Value> = all.iter().map(|l| &l["statements"]).collect();
    let tcp: Vec<&Value> = all
        .iter()
        .filter(|l| l["transport"] == "tcp")
        .map(|l| &l["statements"])
        .collect();
    assert_eq!(
        tcp[..4],
        [
            &json!(["begin"]),
            &json!(["insert into todos (task) values (?)"]),
            &json!(["select task, ? from todos where task = ?"]),
            &json!(["commit"]),
        ],
        "{statements:#?}"
    );
    // The prepare cycle carries the text; the execute cycle, none.
    assert!(
        tcp[4..].contains(&&json!(["select $1::text as echoed"])),
        "{statements:#?}"
    );
    let http: Vec<&Value> = all.iter().filter(|l| l["transport"] == "http").collect();
    assert_eq!(http.len(), 1, "{all:#?}");
    assert_eq!(http[0]["statements"], json!(["select ?, ?"]));
    assert_eq!(http[0]["rows"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_audit_nothing_is_written_and_nothing_counted() {
    let stack = Stack::start().await;
    let client = stack.login("user_alice").await;
    client
        .simple_query("select 1")
        .await
        .expect("select works as before");
    drop(client);
    let metrics = stack.metrics().await;
    assert_eq!(metrics["authgres_audit_lines_total"], 0.0);
    assert_eq!(metrics["authgres_audit_dropped_total"], 0.0);
    assert!(!audit_path(&stack).exists());
    assert!(std::fs::read_dir(stack.dir.path()).expect("dir").all(|e| {
        !e.expect("entry")
            .file_name()
            .to_string_lossy()
            .contains("audit")
    }));
}
