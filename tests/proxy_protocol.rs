//! PROXY protocol v2 from trusted load balancers (issue 21, item 4.1):
//! behind a TCP balancer the client's address was the balancer's, for
//! per-address limits, `/clients`, logs and the loopback rule for
//! cleartext tokens. Here 127.0.0.2 plays the balancer (trusted), and its
//! headers claim other loopback or documentation addresses; 127.0.0.1 is
//! an untrusted client. All through the real binary and a real Postgres;
//! each test fails without the change (the setting did not exist).

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use authgres_wire::internals::proxy_header;
use common::{DATABASE, RawClient, Stack};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The balancer's address, trusted in both listeners' `proxy_protocol_from`.
const BALANCER: [u8; 4] = [127, 0, 0, 2];

async fn stack(listen_extra: &'static str, auth_timeout: &'static str) -> Stack {
    Stack::start_with(common::Options {
        listen_extra,
        auth_timeout,
        http_extra: "proxy_protocol_from = [\"127.0.0.2/32\"]\n",
        ..Default::default()
    })
    .await
}

/// The header a balancer sends for a client at `source`.
fn header(source: &str, port: u16) -> Vec<u8> {
    let source: SocketAddr = source.parse().expect("address");
    let mut out = Vec::new();
    proxy_header::encode(Some((source, ([127, 0, 0, 1], port).into())), b"", &mut out);
    out
}

/// A connection from the balancer to `port` that began with a header for
/// a client at `source`.
async fn relayed(port: u16, source: &str) -> RawClient {
    let mut raw = RawClient::connect_from(port, BALANCER).await;
    raw.send(&header(source, port)).await;
    raw
}

/// Sends a startup packet for `user` and, if given, the token.
async fn start_login(raw: &mut RawClient, user: &str, token: Option<&str>) {
    raw.send_startup(&[("user", user), ("database", DATABASE)])
        .await;
    if let Some(token) = token {
        raw.send_password(token).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_relayed_client_has_its_own_address_for_limits_clients_and_logs() {
    let stack = stack(
        "proxy_protocol_from = [\"127.0.0.2\"]\nmax_unauthenticated_per_source = 2\n",
        "5s",
    )
    .await;
    // Two idle connections from one client fill its share...
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(relayed(stack.port, "127.0.0.3:40000").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so a third from it waits...
    let mut third = relayed(stack.port, "127.0.0.3:40001").await;
    start_login(&mut third, "anonymous", None).await;
    // ...while another client behind the same balancer logs in at once,
    // not when the idle ones time out (auth_timeout, 5s).
    let started = Instant::now();
    let mut other = relayed(stack.port, "127.0.0.4:40002").await;
    let token = stack.issuer.token("user_relayed");
    start_login(&mut other, "authenticated", Some(&token)).await;
    other.read_until(b'Z').await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "login took {:?}",
        started.elapsed()
    );
    let mut byte = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), third.stream.read(&mut byte))
            .await
            .is_err(),
        "the third connection of a full source waits for a place"
    );

    // /clients and the log name the client, not the balancer.
    let (status, clients) = stack.admin_get("/clients").await;
    assert_eq!(status, 200, "{clients}");
    assert!(clients.contains("\"127.0.0.4:40002\""), "{clients}");
    assert!(clients.contains("\"127.0.0.3:40000\""), "{clients}");
    assert!(!clients.contains("127.0.0.2:"), "{clients}");
    stack.wait_log("peer=127.0.0.4:40002 via=127.0.0.2").await;

    // A LOCAL header (a health check) keeps the balancer's own address.
    let mut check = RawClient::connect_from(stack.port, BALANCER).await;
    let mut local = Vec::new();
    proxy_header::encode(None, b"", &mut local);
    check.send(&local).await;
    start_login(&mut check, "anonymous", None).await;
    check.read_until(b'Z').await;
    let (_, clients) = stack.admin_get("/clients").await;
    assert!(clients.contains("\"127.0.0.2:"), "{clients}");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread")]
async fn headers_are_required_from_trusted_peers_and_refused_from_others() {
    let stack = stack(
        "proxy_protocol_from = [\"127.0.0.2/32\", \"10.0.0.0/8\"]\n",
        "2s",
    )
    .await;

    // An untrusted client that sends a header: named for what it is.
    let mut untrusted = RawClient::connect(stack.port).await;
    untrusted.send(&header("192.0.2.1:1000", stack.port)).await;
    let (code, message) = untrusted.expect_error().await;
    assert_eq!(code, "08P01");
    assert!(
        message.contains("PROXY protocol header from an address not in"),
        "{message}"
    );

    // The trusted balancer without a header: refused at once, and logged.
    let started = Instant::now();
    let mut bare = RawClient::connect_from(stack.port, BALANCER).await;
    start_login(&mut bare, "anonymous", None).await;
    let (code, message) = bare.expect_error().await;
    assert_eq!(code, "08P01");
    assert!(
        message.contains("must send a PROXY protocol v2 header"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    stack.wait_log("no PROXY protocol v2 header").await;

    // Half a header, then nothing: refused at the deadline (auth_timeout).
    let mut truncated = RawClient::connect_from(stack.port, BALANCER).await;
    truncated
        .send(&header("192.0.2.1:1000", stack.port)[..20])
        .await;
    let started = Instant::now();
    let (code, message) = truncated.expect_error().await;
    assert_eq!(code, "08P01");
    assert!(message.contains("within 2s"), "{message}");
    assert!(started.elapsed() >= Duration::from_millis(1500));

    // An oversized header: refused on its fixed part, without reading on.
    let mut oversized = RawClient::connect_from(stack.port, BALANCER).await;
    let mut bytes = header("192.0.2.1:1000", stack.port)[..16].to_vec();
    bytes[14..16].copy_from_slice(&u16::MAX.to_be_bytes());
    oversized.send(&bytes).await;
    let (code, message) = oversized.expect_error().await;
    assert_eq!(code, "08P01");
    assert!(message.contains("over the limit"), "{message}");

    // Version 1 is refused by name.
    let mut v1 = RawClient::connect_from(stack.port, BALANCER).await;
    v1.send(b"PROXY TCP4 192.0.2.1 127.0.0.1 1000 6432\r\n")
        .await;
    let (_, message) = v1.expect_error().await;
    assert!(message.contains("v1 (text)"), "{message}");

    // The cleartext rule sees the header's address: a remote client's
    // token over plaintext is refused, though the balancer is loopback.
    let token = stack.issuer.token("user_remote");
    let mut remote = relayed(stack.port, "192.0.2.9:1000").await;
    start_login(&mut remote, "authenticated", Some(&token)).await;
    let (code, message) = remote.expect_error().await;
    assert_eq!(code, "28000");
    assert!(
        message.contains("must use TLS from non-loopback addresses"),
        "{message}"
    );
    // A loopback client relayed by a loopback balancer may.
    let mut local = relayed(stack.port, "127.0.0.9:1000").await;
    start_login(&mut local, "authenticated", Some(&token)).await;
    local.read_until(b'Z').await;
}

/// Sends `request` on `stream` and reads the answer's head and what came.
async fn http_exchange(stream: &mut tokio::net::TcpStream, request: &[u8]) -> String {
    stream.write_all(request).await.expect("write");
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(read)) => answer.extend_from_slice(&buf[..read]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_http_listener_takes_headers_from_its_own_trusted_peers() {
    let stack = stack("", "2s").await;
    let port = stack.http_port;
    const GET: &[u8] = b"GET /v2 HTTP/1.1\r\nhost: authgres\r\n\r\n";

    let mut relayed = RawClient::connect_from(port, BALANCER).await.stream;
    relayed
        .write_all(&header("127.0.0.6:41000", port))
        .await
        .expect("header");
    let answer = http_exchange(&mut relayed, GET).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("expected a WebSocket upgrade"), "{answer}");
    let (_, clients) = stack.admin_get("/clients").await;
    assert!(clients.contains("\"127.0.0.6:41000\""), "{clients}");

    let mut bare = RawClient::connect_from(port, BALANCER).await.stream;
    let answer = http_exchange(&mut bare, GET).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("proxy_protocol_from"), "{answer}");

    // The wire listener trusts nobody here: 127.0.0.2 is a plain client.
    let mut plain = RawClient::connect_from(stack.port, BALANCER).await;
    start_login(&mut plain, "anonymous", None).await;
    plain.read_until(b'Z').await;
}

#[tokio::test(flavor = "multi_thread")]
async fn proxy_protocol_from_is_reloaded_for_new_connections() {
    let stack = stack("", "2s").await;
    let mut before = RawClient::connect_from(stack.port, BALANCER).await;
    start_login(&mut before, "anonymous", None).await;
    before.read_until(b'Z').await;

    stack.edit_config(|text| {
        text.replacen(
            "[listen]\n",
            "[listen]\nproxy_protocol_from = [\"127.0.0.2\"]\n",
            1,
        )
    });
    let (status, body) = stack.admin_post("/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"needs_restart\":[]"), "{body}");

    // New connections from the balancer need a header now...
    let mut bare = RawClient::connect_from(stack.port, BALANCER).await;
    start_login(&mut bare, "anonymous", None).await;
    let (_, message) = bare.expect_error().await;
    assert!(
        message.contains("must send a PROXY protocol v2 header"),
        "{message}"
    );
    let mut with = relayed(stack.port, "127.0.0.7:1000").await;
    start_login(&mut with, "anonymous", None).await;
    with.read_until(b'Z').await;
    // ...and the session it already had goes on.
    before.send(&common::message(b'Q', b"select 1\0")).await;
    before.read_until(b'Z').await;
}
