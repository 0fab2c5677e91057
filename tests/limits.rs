//! What a client may hold before and after it authenticates (issue 13):
//! one connection budget for every listener, a per-source share for the
//! unauthenticated, bounded buffering and deadlines before authentication,
//! rate-limited refusal logs, and the timeouts a pooler is expected to
//! have. All through the real binary; each failed before its fix.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::time::{Duration, Instant};

use common::{RawClient, Stack, message, user_id};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn stack(listen_extra: &'static str, upstream_extra: &'static str) -> Stack {
    Stack::start_with(common::Options {
        listen_extra,
        upstream_extra,
        auth_timeout: "10s",
        ..Default::default()
    })
    .await
}

/// Sends a raw HTTP request and returns the status code of the answer (0
/// when the connection closes without one).
async fn http_status(port: u16, request: &str) -> u16 {
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    tcp.write_all(request.as_bytes()).await.expect("write");
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut answer))
        .await
        .expect("an answer within 10s")
        .unwrap_or(0);
    String::from_utf8_lossy(&answer[..n])
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

fn sql_request(stack: &Stack, token: &str) -> String {
    let body = r#"{"query": "select auth.user_id()"}"#;
    format!(
        "POST /sql HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\
         neon-connection-string: postgresql://authenticated@127.0.0.1:{}/{}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        stack.port,
        common::DATABASE,
        body.len()
    )
}

const WEBSOCKET_UPGRADE: &str = "GET /v2 HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\n\
     connection: Upgrade\r\nsec-websocket-version: 13\r\n\
     sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn websocket_and_http_clients_count_against_max_connections() {
    let stack = stack("max_connections = 3", "").await;
    let mut held = Vec::new();
    for sub in ["user_a", "user_b", "user_c"] {
        held.push(stack.login(sub).await);
    }
    let token = stack.issuer.token("user_alice");
    assert_eq!(
        http_status(stack.http_port, &sql_request(&stack, &token)).await,
        503
    );
    assert_eq!(http_status(stack.http_port, WEBSOCKET_UPGRADE).await, 503);
    held.pop();
    // The place frees once the session has returned its backend.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = 0;
    while status != 200 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        status = http_status(stack.http_port, &sql_request(&stack, &token)).await;
    }
    assert_eq!(status, 200);
    assert_eq!(http_status(stack.http_port, WEBSOCKET_UPGRADE).await, 101);
}

#[tokio::test(flavor = "multi_thread")]
async fn stalled_sockets_from_one_address_do_not_lock_everyone_else_out() {
    let stack = stack(
        "max_connections = 40\nmax_unauthenticated = 20\nmax_unauthenticated_per_source = 5",
        "",
    )
    .await;
    let mut stalled = Vec::new();
    for _ in 0..60 {
        stalled.push(RawClient::connect_from(stack.port, [127, 0, 0, 2]).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let mut other = RawClient::connect_from(stack.port, [127, 0, 0, 3]).await;
    other
        .send_startup(&[("user", "authenticated"), ("database", common::DATABASE)])
        .await;
    other.send_password(&stack.issuer.token("user_alice")).await;
    other.read_until(b'Z').await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "another host waited {:?}",
        started.elapsed()
    );
    drop(stalled);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// A `/proc/PID/status` field in KiB (`VmRSS:`, `VmHWM:`).
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unauthenticated_websocket_cannot_make_the_proxy_buffer_its_frames() {
    let stack = stack("", "").await;
    let before = rss_kib(stack.proxy_pid());
    let mut sockets = Vec::new();
    for _ in 0..6 {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
            .await
            .expect("connect");
        tcp.write_all(WEBSOCKET_UPGRADE.as_bytes())
            .await
            .expect("upgrade");
        let mut answer = [0u8; 256];
        let n = tcp.read(&mut answer).await.expect("101");
        assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 101"));
        // A message in fragments of 4 MiB (each frame within any frame
        // limit) that never ends, masked with zeros; its payload starts
        // like a StartupMessage.
        let chunk = vec![0u8; 4 << 20];
        for fragment in 0..2 {
            let opcode = if fragment == 0 { 0x02 } else { 0x00 };
            let mut frame = vec![opcode, 0xff];
            frame.extend_from_slice(&u64::try_from(chunk.len()).expect("fits").to_be_bytes());
            frame.extend_from_slice(&[0; 4]);
            if fragment == 0 {
                frame.extend_from_slice(&9000u32.to_be_bytes());
                frame.extend_from_slice(&chunk[4..]);
            } else {
                frame.extend_from_slice(&chunk);
            }
            // The proxy may stop reading; a full socket buffer is the
            // attacker's problem, not the proxy's memory.
            if tokio::time::timeout(Duration::from_millis(500), tcp.write_all(&frame))
                .await
                .is_err()
            {
                break;
            }
        }
        sockets.push(tcp);
    }
    let grown = rss_kib(stack.proxy_pid()).saturating_sub(before);
    assert!(grown < 16 * 1024, "the proxy grew by {grown} KiB");
}

#[tokio::test(flavor = "multi_thread")]
async fn sql_refuses_a_bad_token_before_reading_the_body() {
    let stack = stack("", "").await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
        .await
        .expect("connect");
    let head = format!(
        "POST /sql HTTP/1.1\r\nhost: x\r\nauthorization: Bearer not-a-token\r\n\
         neon-connection-string: postgresql://authenticated@127.0.0.1:{}/{}\r\n\
         content-length: 10000000\r\n\r\n",
        stack.port,
        common::DATABASE
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(&[b' '; 1024]).await.expect("some body");
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut answer))
        .await
        .expect("answered without waiting for the body")
        .expect("read");
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 400"));
}

#[tokio::test(flavor = "multi_thread")]
async fn partial_http_headers_are_cut_off() {
    let stack = Stack::start_with(common::Options {
        http_extra: "header_timeout = \"1s\"",
        ..Default::default()
    })
    .await;
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
            .await
            .expect("connect");
        tcp.write_all(b"POST /sql HTTP/1.1\r\nhost: x\r\n")
            .await
            .expect("partial");
        slow.push(tcp);
    }
    for mut tcp in slow {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
        assert!(
            read.is_ok(),
            "a connection with partial headers stayed open"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn floods_of_garbage_connections_make_few_log_lines() {
    let stack = stack("", "").await;
    for _ in 0..300 {
        let mut raw = RawClient::connect(stack.port).await;
        raw.send(b"GARBAGE!").await;
        let mut byte = [0u8; 256];
        let _ = tokio::time::timeout(Duration::from_secs(2), raw.stream.read(&mut byte)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refusals = stack.log().matches("session refused").count();
    assert!(
        (1..=30).contains(&refusals),
        "{refusals} refusal lines for 300 connections"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_idle_inside_a_transaction_is_cut_off_and_its_work_rolled_back() {
    let stack = stack(
        "idle_transaction_timeout = \"1s\"",
        "pool_size = 1\ncheckout_timeout = \"3s\"",
    )
    .await;
    let bob = stack.login("user_bob").await;
    bob.batch_execute("begin; insert into todos (task) values ('never committed')")
        .await
        .expect("begin");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let error = bob.batch_execute("commit").await.expect_err("cut off");
    assert!(
        error.to_string().contains("idle inside a transaction")
            || error.is_closed()
            || error.code() == Some(&tokio_postgres::error::SqlState::from_code("25P03")),
        "{error}"
    );
    let alice = stack.login("user_alice").await;
    assert_eq!(user_id(&alice).await.as_deref(), Some("user_alice"));
    assert_eq!(common::todos_of(&stack, "user_bob").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_its_results_is_cut_off() {
    let stack = stack(
        "client_write_timeout = \"1s\"",
        "pool_size = 1\ncheckout_timeout = \"3s\"",
    )
    .await;
    let token = stack.issuer.token("user_bob");
    let mut bob = RawClient::login(stack.port, "authenticated", Some(&token)).await;
    bob.send(&message(
        b'Q',
        b"select repeat('x', 10000) from generate_series(1, 200000)\0",
    ))
    .await;
    // Bob reads nothing. After the socket buffers fill and a second passes
    // the proxy lets his backend go.
    let started = Instant::now();
    let alice = tokio::time::timeout(Duration::from_secs(15), stack.login("user_alice"))
        .await
        .expect("alice was served");
    assert_eq!(user_id(&alice).await.as_deref(), Some("user_alice"));
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(bob);
}

/// A socket as `ss` lists it: local address, peer, keepalive seconds left.
type Socket = (String, String, Option<u64>);

#[tokio::test(flavor = "multi_thread")]
async fn client_and_upstream_sockets_probe_idle_peers() {
    let stack = stack("tcp_keepalive = \"45s\"", "").await;
    let alice = stack.login("user_alice").await;
    assert_eq!(user_id(&alice).await.as_deref(), Some("user_alice"));
    // Idle sockets show their keepalive timer (data in flight shows the
    // retransmission timer instead).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let output = std::process::Command::new("ss")
        .args(["-tnopH", "state", "established"])
        .output()
        .expect("ss (iproute2)");
    let sockets = String::from_utf8_lossy(&output.stdout);
    let proxy = format!("pid={},", stack.proxy_pid());
    // The proxy's own sockets, as (local, peer, keepalive seconds left).
    let tuned: Vec<Socket> = sockets
        .lines()
        .filter(|line| line.contains(&proxy))
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let left = line
                .split("timer:(keepalive,")
                .nth(1)
                .and_then(|rest| rest.split("sec").next())
                .and_then(|secs| secs.parse().ok());
            (fields[2].to_owned(), fields[3].to_owned(), left)
        })
        .collect();
    let probed = |side: &dyn Fn(&Socket) -> bool| {
        tuned
            .iter()
            .filter(|socket| side(socket))
            .any(|(_, _, left)| left.is_some_and(|secs| secs <= 45))
    };
    let client_port = format!(":{}", stack.port);
    let upstream_port = format!(":{}", stack.cluster.port());
    assert!(
        probed(&|(local, _, _)| local.ends_with(&client_port)),
        "no 45s keepalive on a client socket: {tuned:?}\n{sockets}"
    );
    assert!(
        probed(&|(_, peer, _)| peer.ends_with(&upstream_port)),
        "no 45s keepalive on an upstream socket: {tuned:?}"
    );
}

/// Peak resident memory of a process so far, in KiB.
fn peak_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

/// A raw `/sql` request as the anonymous role (no token) with `body`, and
/// the status of its answer (0 when the connection closes without one).
async fn anonymous_sql(ports: (u16, u16), body: &[u8], declared: usize) -> u16 {
    let (http_port, port) = ports;
    let head = format!(
        "POST /sql HTTP/1.1\r\nhost: x\r\n\
         neon-connection-string: postgresql://anonymous@127.0.0.1:{port}/{}\r\n\
         content-type: application/json\r\ncontent-length: {declared}\r\n\r\n",
        common::DATABASE,
    );
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", http_port))
        .await
        .expect("connect");
    let (mut read, mut write) = tcp.into_split();
    let mut request = head.into_bytes();
    request.extend_from_slice(body);
    // Writing and reading at once: the proxy may answer before it reads it
    // all.
    let writer = tokio::spawn(async move {
        let _ = write.write_all(&request).await;
        write
    });
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(60), read.read(&mut answer))
        .await
        .expect("an answer within 60s")
        .unwrap_or(0);
    writer.abort();
    String::from_utf8_lossy(&answer[..n])
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// Issue 21: an admitted request's body is buffered under one budget for the
/// whole proxy, whatever the role (the anonymous role needs no token, so
/// anyone is admitted), and a body declared over the limit is refused
/// before it is read.
#[tokio::test(flavor = "multi_thread")]
async fn sql_request_bodies_are_bounded_whatever_the_role() {
    let stack = stack("", "").await;
    let pid = stack.proxy_pid();
    let ports = (stack.http_port, stack.port);
    assert_eq!(
        anonymous_sql(ports, br#"{"query": "select 1"}"#, 21).await,
        200
    );

    // Sixteen bodies of almost 10 MiB (max_request_bytes) at once.
    let mut body = br#"{"query": "select 1 -- "#.to_vec();
    body.resize((10 << 20) - 64, b'x');
    body.extend_from_slice(br#""}"#);
    let body = std::sync::Arc::new(body);
    let before = peak_kib(pid);
    let requests: Vec<_> = (0..16)
        .map(|_| {
            let body = std::sync::Arc::clone(&body);
            tokio::spawn(async move { anonymous_sql(ports, &body, body.len()).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for request in requests {
        statuses.push(request.await.expect("join"));
    }
    let grown = peak_kib(pid).saturating_sub(before) / 1024;
    println!("peak memory grew by {grown} MiB");
    assert!(statuses.iter().all(|status| *status == 200), "{statuses:?}");
    // One such request peaks at about two copies of its body (19 MiB
    // measured), and the allocator keeps a freed copy in each thread's
    // arena: 50-70 MiB here, however many requests. Before the budget:
    // about 490 MiB.
    assert!(grown < 96, "the proxy's peak memory grew by {grown} MiB");

    // Declared over max_request_bytes: 413 without waiting for the body.
    let started = Instant::now();
    assert_eq!(anonymous_sql(ports, b"", 100 << 20).await, 413);
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A client WebSocket frame, masked with zeros (so the payload reads as is).
fn ws_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&[0; 4]);
    frame.extend_from_slice(payload);
    frame
}

/// The next frame the server sends: its opcode and payload.
async fn ws_read_frame(tcp: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    tcp.read_exact(&mut head).await.expect("frame header");
    let length = match head[1] & 0x7f {
        126 => u64::from(tcp.read_u16().await.expect("length")),
        127 => tcp.read_u64().await.expect("length"),
        n => u64::from(n),
    };
    let mut payload = vec![0u8; length as usize];
    tcp.read_exact(&mut payload).await.expect("payload");
    (head[0] & 0x0f, payload)
}

/// Issue 21: pongs went out only when the session wrote, so an idle
/// session never answered a ping, and each ping queued one more pong.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_websocket_session_answers_pings_and_queues_no_pongs() {
    let stack = stack("", "").await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port))
        .await
        .expect("connect");
    tcp.write_all(WEBSOCKET_UPGRADE.as_bytes())
        .await
        .expect("upgrade");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tcp.read_u8().await.expect("101"));
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    // Log in, and wait for ReadyForQuery.
    let mut startup = Vec::new();
    startup.extend_from_slice(&196_608u32.to_be_bytes());
    for part in ["user", "authenticated", "database", common::DATABASE, ""] {
        startup.extend_from_slice(part.as_bytes());
        startup.push(0);
    }
    let mut login = ((startup.len() + 4) as u32).to_be_bytes().to_vec();
    login.extend_from_slice(&startup);
    let token = stack.issuer.token("user_alice");
    login.extend_from_slice(&message(b'p', format!("{token}\0").as_bytes()));
    tcp.write_all(&ws_frame(0x2, &login)).await.expect("login");
    let mut received = Vec::new();
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (opcode, payload) = ws_read_frame(&mut tcp).await;
            assert_eq!(opcode, 0x2, "a binary frame");
            received.extend_from_slice(&payload);
            // ReadyForQuery is the last message of the login.
            if received.len() >= 6 && received[received.len() - 6] == b'Z' {
                return;
            }
        }
    });
    ready.await.expect("logged in");

    // Idle: a ping is answered within a second.
    tcp.write_all(&ws_frame(0x9, b"still there?"))
        .await
        .expect("ping");
    let answer = tokio::time::timeout(Duration::from_secs(1), ws_read_frame(&mut tcp))
        .await
        .expect("a pong within a second");
    assert_eq!(answer, (0xA, b"still there?".to_vec()));

    // 100,000 pings never read (13 MB of them): pongs do not pile up.
    let pid = stack.proxy_pid();
    let before = rss_kib(pid);
    let ping = ws_frame(0x9, &[7u8; 125]);
    let pings: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 100_000)
        .collect();
    tcp.write_all(&pings).await.expect("pings");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(grown < 4 * 1024, "the proxy grew by {grown} KiB");
}

/// Issue 21: a server message was buffered whole before
/// `max_response_bytes` applied, so one `select repeat('x', 500000000)`
/// made the proxy allocate 500 MB for one request.
#[tokio::test(flavor = "multi_thread")]
async fn one_huge_row_is_refused_before_it_is_buffered() {
    let stack = stack("", "").await;
    let pid = stack.proxy_pid();
    let ports = (stack.http_port, stack.port);
    let before = peak_kib(pid);
    let body = br#"{"query": "select repeat('x', 500000000)"}"#;
    assert_eq!(anonymous_sql(ports, body, body.len()).await, 507);
    let grown = peak_kib(pid).saturating_sub(before) / 1024;
    assert!(grown < 64, "the proxy's peak memory grew by {grown} MiB");
    // The backend that was sending it was cancelled, not left running.
    let admin = stack.cluster.admin(common::DATABASE).await.expect("admin");
    let started = Instant::now();
    loop {
        let running: i64 = admin
            .query_one(
                "select count(*) from pg_stat_activity \
                 where state = 'active' and query like 'select repeat%'",
                &[],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if running == 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(3), "still running");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        anonymous_sql(ports, br#"{"query": "select 1"}"#, 21).await,
        200
    );
}
