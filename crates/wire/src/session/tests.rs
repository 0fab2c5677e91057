//! Phase tests: an in-process [`Proxy`] in front of the sandbox's real
//! Postgres, clients over `tokio::io::duplex` (the settled-transport path
//! the WebSocket uses), tokens from the sandbox's local issuer. No binary.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use authgres_jwt::{ProviderConfig, Verifier};
use authgres_sandbox::{Cluster, Issuer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

use super::*;
use crate::config::Policy;
use crate::config::ProxyConfig;
use crate::config::{CleartextTokens, PoolLimits, RoleConfig};
use crate::identity::ClaimsKey;
use crate::proto::framer::tests::message;
use crate::transport::UpstreamTls;
use crate::upstream::UpstreamConfig;

const PASSWORD: &str = "phase-test-password";
const PEER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);

struct Harness {
    cluster: Cluster,
    issuer: Issuer,
    proxy: Arc<Proxy>,
}

/// A database `app` with the auth schema, the role `authenticated` and a
/// claims key, and a proxy in front of it.
async fn harness(mode: PoolMode, pool_size: usize) -> Harness {
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("join")
        .expect("cluster");
    let admin = cluster.admin("postgres").await.expect("admin");
    admin
        .batch_execute("create database app")
        .await
        .expect("database");
    admin
        .batch_execute(&format!(
            "create role authenticated login password '{PASSWORD}'"
        ))
        .await
        .expect("role");
    let key = ClaimsKey::from_bytes([7; 32]);
    let (ipad, opad) = key.pads();
    let app = cluster.admin("app").await.expect("admin app");
    app.batch_execute(include_str!("../../../../sql/auth.sql"))
        .await
        .expect("auth schema");
    app.execute(
        "insert into auth.claims_keys (ipad, opad) values ($1, $2)",
        &[&&ipad[..], &&opad[..]],
    )
    .await
    .expect("claims key");
    let issuer = Issuer::start().await.expect("issuer");
    let provider = ProviderConfig::new(
        "sandbox",
        issuer.issuer(),
        &issuer.jwks_url(),
        &["authenticated"],
    );
    let verifier = Arc::new(Verifier::new(vec![provider]).expect("verifier"));
    let config = proxy_config(&cluster, mode, pool_size);
    let settings = Settings {
        config,
        verifier,
        claims_key: key,
        tls: None,
    };
    let proxy = Arc::new(Proxy::new(
        settings,
        crate::metrics::Metrics::unregistered(),
    ));
    Harness {
        cluster,
        issuer,
        proxy,
    }
}

/// The proxy's settings for `harness`: the role `authenticated` with a
/// token, the database `app`, `mode` and `pool_size`.
fn proxy_config(cluster: &Cluster, mode: PoolMode, pool_size: usize) -> ProxyConfig {
    let role = RoleConfig {
        password: Some(PASSWORD.to_owned()),
        requires_token: true,
        login: crate::config::TokenLogin::Password,
    };
    ProxyConfig {
        upstream: UpstreamConfig {
            host: cluster.host().to_owned(),
            port: cluster.port(),
            connect_timeout: Duration::from_secs(5),
            tls: UpstreamTls::Disable,
            tcp_keepalive: None,
        },
        admission: Policy {
            roles: HashMap::from([("authenticated".to_owned(), role)]),
            databases: vec!["app".to_owned()],
            routes: HashMap::new(),
            cleartext_tokens: CleartextTokens::LoopbackOnly,
            tls_offered: true,
        },
        auth_timeout: Duration::from_secs(5),
        proxy_protocol_from: Default::default(),
        connections: crate::config::ConnectionLimits {
            max_connections: 100,
            max_unauthenticated: 100,
            max_unauthenticated_per_source: 100,
        },
        client_limits: crate::config::ClientLimits::default(),
        tcp_keepalive: None,
        enforce_token_expiry: false,
        pool_mode: mode,
        pool_mode_by_database: HashMap::new(),
        pool_limits: PoolLimits {
            max_per_key: pool_size,
            checkout_timeout: Duration::from_secs(2),
            internal_query_timeout: Duration::from_secs(2),
            ..PoolLimits::default()
        },
        cluster: crate::config::ClusterConfig::default(),
        console: None,
        audit: None,
        usage: crate::usage::UsageConfig::default(),
        identity_limits: crate::limits::LimitTable::default(),
    }
}

/// A proxy session on one end of an in-memory pipe; the other end is the
/// client's.
fn pipe(harness: &Harness) -> DuplexStream {
    let (client, proxy_side) = tokio::io::duplex(64 * 1024);
    serve(harness, proxy_side);
    client
}

/// Serves a session on `stream` as a settled (WebSocket) transport.
fn serve<S: ClientIo + 'static>(harness: &Harness, stream: S) {
    let proxy = Arc::clone(&harness.proxy);
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let entry = proxy.budget().enter(PEER.ip()).expect("room");
        let ticket = entry.admit(deadline).await.expect("room");
        let client = proxy.clients().register(PEER, Transport::WebSocket);
        proxy
            .serve_settled(stream, PEER, None, false, ticket, client)
            .await;
    });
}

/// tokio-postgres logged in as `sub` through the proxy.
async fn login(harness: &Harness, sub: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::Config::new()
        .user("authenticated")
        .dbname("app")
        .password(harness.issuer.token(sub))
        .connect_raw(pipe(harness), tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("{sub} logs in: {e}"));
    tokio::spawn(connection);
    client
}

async fn text(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

async fn pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_and_reset_hand_one_backend_to_the_next_client_clean() {
    let harness = harness(PoolMode::Session, 1).await;
    let alice = login(&harness, "user_alice").await;
    assert_eq!(
        text(&alice, "select auth.user_id()").await.as_deref(),
        Some("user_alice")
    );
    let backend = pid(&alice).await;
    alice
        .batch_execute(
            "set application_name = 'alice-was-here'; select setseed(0.5); \
             create temp table alice_temp (x int); prepare alice_stmt as select 1",
        )
        .await
        .expect("leave state behind");
    drop(alice);
    let bob = login(&harness, "user_bob").await;
    assert_eq!(pid(&bob).await, backend, "the one pooled backend");
    assert_eq!(
        text(&bob, "select auth.user_id()").await.as_deref(),
        Some("user_bob")
    );
    assert_ne!(
        text(&bob, "select current_setting('application_name')")
            .await
            .as_deref(),
        Some("alice-was-here")
    );
    let leftovers: i64 = bob
        .query_one(
            "select (select count(*) from pg_prepared_statements where name = 'alice_stmt') + \
             (select count(*) from pg_class where relname = 'alice_temp')",
            &[],
        )
        .await
        .expect("leftovers")
        .get(0);
    assert_eq!(leftovers, 0);
    // What random() returns first after setseed(0.5), on this server.
    let admin = harness.cluster.admin("app").await.expect("admin");
    admin
        .batch_execute("select setseed(0.5)")
        .await
        .expect("seed");
    let predicted: f64 = admin
        .query_one("select random()", &[])
        .await
        .expect("random")
        .get(0);
    let drawn: f64 = bob
        .query_one("select random()", &[])
        .await
        .expect("random")
        .get(0);
    assert_ne!(drawn, predicted, "the reset must reseed what alice seeded");
}

#[tokio::test(flavor = "multi_thread")]
async fn transaction_pooling_gives_every_transaction_its_own_clients_identity() {
    let harness = harness(PoolMode::Transaction, 1).await;
    let mut clients = Vec::new();
    for sub in ["user_a", "user_b", "user_c"] {
        clients.push((sub, login(&harness, sub).await));
    }
    let mut backends = std::collections::BTreeSet::new();
    for round in 0..3 {
        for (sub, client) in &clients {
            let me = text(client, "select auth.user_id()").await;
            assert_eq!(me.as_deref(), Some(*sub), "round {round}");
            backends.insert(pid(client).await);
        }
    }
    assert_eq!(backends.len(), 1, "one backend served all three");
}

/// A raw client through the proxy: startup and password sent, replies read
/// up to the first ReadyForQuery.
async fn raw_login(harness: &Harness, sub: &str) -> DuplexStream {
    let mut stream = pipe(harness);
    stream
        .write_all(&login_messages(harness, sub))
        .await
        .expect("write");
    read_until(&mut stream, b'Z').await;
    stream
}

/// A StartupMessage for `authenticated` on `app`, and `sub`'s token as
/// the password.
fn login_messages(harness: &Harness, sub: &str) -> bytes::BytesMut {
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "authenticated"), ("database", "app")],
        &mut out,
    )
    .expect("startup");
    postgres_protocol::message::frontend::password_message(
        harness.issuer.token(sub).as_bytes(),
        &mut out,
    )
    .expect("password");
    out
}

/// Reads messages until one with `tag`; returns the tags seen.
async fn read_until(stream: &mut DuplexStream, tag: u8) -> Vec<u8> {
    let mut seen = Vec::new();
    loop {
        let mut header = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut header))
            .await
            .expect("a reply within 10s")
            .expect("read");
        let [got, a, b, c, d] = header;
        let mut body =
            vec![0u8; usize::try_from(u32::from_be_bytes([a, b, c, d]) - 4).expect("len")];
        stream.read_exact(&mut body).await.expect("body");
        seen.push(got);
        if got == tag {
            return seen;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_flush_is_refused_and_its_backend_never_returns() {
    let harness = harness(PoolMode::Session, 1).await;
    let mut attacker = raw_login(&harness, "user_b").await;
    attacker
        .write_all(&message(b'H', b"x"))
        .await
        .expect("write");
    let seen = read_until(&mut attacker, b'E').await;
    assert_eq!(seen, [b'E']);
    drop(attacker);
    // The one pooled backend is free again (closed, not leaked).
    let next = tokio::time::timeout(Duration::from_secs(10), login(&harness, "user_a"))
        .await
        .expect("the next client is served");
    assert_eq!(
        text(&next, "select auth.user_id()").await.as_deref(),
        Some("user_a")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_inside_copy_does_not_hold_the_backend() {
    let harness = harness(PoolMode::Session, 1).await;
    let admin = harness.cluster.admin("app").await.expect("admin");
    admin
        .batch_execute("create table sink (x text); grant insert on sink to authenticated")
        .await
        .expect("table");
    let mut client = raw_login(&harness, "user_b").await;
    client
        .write_all(&message(b'Q', b"copy sink from stdin\0"))
        .await
        .expect("write");
    assert_eq!(read_until(&mut client, b'G').await, [b'G']);
    client
        .write_all(&message(b'd', b"half a row"))
        .await
        .expect("write");
    drop(client);
    let next = tokio::time::timeout(Duration::from_secs(10), login(&harness, "user_a"))
        .await
        .expect("the next client is served");
    assert_eq!(
        text(&next, "select auth.user_id()").await.as_deref(),
        Some("user_a")
    );
    let rows: i64 = admin
        .query_one("select count(*) from sink", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 0, "the unfinished COPY committed nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn negotiation_declines_encryption_on_a_settled_transport_and_refuses_data_after_it() {
    let harness = harness(PoolMode::Session, 1).await;
    let mut stream = pipe(&harness);
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut out);
    stream.write_all(&out).await.expect("write");
    let mut answer = [0u8; 1];
    stream.read_exact(&mut answer).await.expect("answer");
    assert_eq!(&answer, b"N");
    // An SSLRequest with bytes behind it, before its answer: refused.
    let mut stream = pipe(&harness);
    out.extend_from_slice(b"Qinjected");
    stream.write_all(&out).await.expect("write");
    assert_eq!(read_until(&mut stream, b'E').await, [b'E']);
}

/// A client transport whose close writes a last record first, as TLS's
/// close_notify and WebSocket's Close frame do: the close waits while the
/// client reads nothing.
struct NoticeOnClose {
    inner: DuplexStream,
    notice_sent: bool,
}

impl crate::relay::ReadHint for NoticeOnClose {}

impl tokio::io::AsyncRead for NoticeOnClose {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for NoticeOnClose {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.notice_sent {
            std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_write(cx, b"\x15"))?;
            self.notice_sent = true;
        }
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Issue 21, 3: a leaving client's cancel key stayed valid while its close
/// waited on it (up to 2 s), after its backend had gone to the next
/// client: Alice's own key cancelled Bob's statement.
#[tokio::test(flavor = "multi_thread")]
async fn a_leaving_clients_cancel_key_dies_before_its_backend_serves_anyone_else() {
    let harness = harness(PoolMode::Session, 1).await;
    // A pipe that holds 64 bytes: Alice's unread results fill it.
    let (mut alice, proxy_side) = tokio::io::duplex(64);
    serve(
        &harness,
        NoticeOnClose {
            inner: proxy_side,
            notice_sent: false,
        },
    );
    alice
        .write_all(&login_messages(&harness, "user_alice"))
        .await
        .expect("write");
    let mut key = None;
    loop {
        let mut header = [0u8; 5];
        alice.read_exact(&mut header).await.expect("read");
        let [tag, a, b, c, d] = header;
        let mut body =
            vec![0u8; usize::try_from(u32::from_be_bytes([a, b, c, d]) - 4).expect("len")];
        alice.read_exact(&mut body).await.expect("body");
        match (tag, body.as_slice()) {
            (b'K', [p0, p1, p2, p3, k0, k1, k2, k3]) => {
                key = Some((
                    i32::from_be_bytes([*p0, *p1, *p2, *p3]),
                    i32::from_be_bytes([*k0, *k1, *k2, *k3]),
                ));
            }
            (b'Z', _) => break,
            _ => {}
        }
    }
    let (pid, secret) = key.expect("BackendKeyData");
    // A result larger than the pipe: the proxy holds the rest, its
    // ReadyForQuery among it. Then Terminate, and Alice reads nothing.
    alice
        .write_all(&message(b'Q', b"select repeat('x', 2000)\0"))
        .await
        .expect("query");
    tokio::time::sleep(Duration::from_millis(300)).await;
    alice
        .write_all(&message(b'X', b""))
        .await
        .expect("terminate");
    // Bob gets the one backend and runs a statement that takes a while.
    let bob = tokio::time::timeout(Duration::from_secs(5), login(&harness, "user_bob"))
        .await
        .expect("bob is served");
    let sleeping = tokio::spawn(async move { bob.batch_execute("select pg_sleep(1.5)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Alice's key, while her close still waits on her.
    let mut cancel = pipe(&harness);
    let mut out = bytes::BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(pid, secret, &mut out);
    cancel.write_all(&out).await.expect("cancel");
    let slept = sleeping.await.expect("join");
    assert!(
        slept.is_ok(),
        "Alice's key cancelled Bob's statement: {slept:?}"
    );
    drop(alice);
}
