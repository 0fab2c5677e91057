//! The proxy's own work in a login and in steady relaying, without the
//! network: startup parse → password request → password parse → token check
//! → the AuthenticationOk..ReadyForQuery replies; and bytes through the
//! relay between two in-memory pipes.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::SystemTime;

use authgres_jwt::{ProviderConfig, Verifier};
use authgres_sandbox::Issuer;
use authgres_wire::internals::{Relay, backend, startup as frontend};
use bytes::{BufMut, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn handshake(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let issuer = runtime.block_on(Issuer::start()).expect("issuer");
    let verifier = Verifier::new(vec![ProviderConfig::new(
        "bench",
        issuer.issuer(),
        &issuer.jwks_url(),
        &["authenticated"],
    )])
    .expect("verifier");
    let token = issuer.token("user_bench");
    runtime
        .block_on(verifier.verify(&token, "authenticated", SystemTime::now()))
        .expect("warm");
    let mut client_bytes = BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [
            ("user", "authenticated"),
            ("database", "app"),
            ("application_name", "bench"),
        ],
        &mut client_bytes,
    )
    .expect("startup");
    postgres_protocol::message::frontend::password_message(token.as_bytes(), &mut client_bytes)
        .expect("password");
    let parameters: Vec<(String, String)> = [
        ("server_version", "15.8"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", "bench"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect();

    c.bench_function("handshake/startup_to_ready_cached_token", |b| {
        b.to_async(&runtime).iter(|| async {
            let mut input = client_bytes.clone();
            let packet = frontend::parse_startup_packet(&mut input)
                .expect("valid")
                .expect("complete");
            let mut out = BytesMut::with_capacity(512);
            backend::ask_cleartext_password(&mut out);
            let message = frontend::take_password_message(&mut input)
                .expect("valid")
                .expect("complete");
            let password = frontend::password_text(&message).expect("valid");
            let identity = verifier
                .verify(&password, "authenticated", SystemTime::now())
                .await
                .expect("verified");
            backend::authentication_ok(&mut out);
            for (name, value) in &parameters {
                backend::parameter_status(name, value, &mut out);
            }
            backend::backend_key_data(1234, 5678i32.to_be_bytes(), &mut out);
            backend::ready_for_query_idle(&mut out);
            black_box((packet, identity, out));
        })
    });
}

fn relay_throughput(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // A result stream: DataRow messages of ~100 bytes, as a wide SELECT sends.
    let mut chunk = BytesMut::new();
    while chunk.len() < 64 * 1024 {
        chunk.put_u8(b'D');
        chunk.put_i32(4 + 2 + 4 + 90);
        chunk.put_i16(1);
        chunk.put_i32(90);
        chunk.put_slice(&[b'x'; 90]);
    }
    let chunk = chunk.freeze();
    let total: usize = 32 * 1024 * 1024;
    let rounds = total / chunk.len();
    let mut group = c.benchmark_group("relay");
    group.throughput(Throughput::Bytes((rounds * chunk.len()) as u64));
    group.sample_size(20);
    group.bench_function("upstream_to_client_32MiB", |b| {
        b.to_async(&runtime).iter(|| {
            let chunk = chunk.clone();
            let expected = rounds * chunk.len();
            async move {
                let (client, mut client_peer) = tokio::io::duplex(256 * 1024);
                let (upstream, mut upstream_peer) = tokio::io::duplex(256 * 1024);
                let relay = tokio::spawn(async move {
                    let (mut client, mut upstream) = (client, upstream);
                    Relay::new(None, tokio::time::Instant::now())
                        .run(&mut client, &mut upstream)
                        .await
                });
                let writer = tokio::spawn(async move {
                    for _ in 0..rounds {
                        upstream_peer.write_all(&chunk).await.expect("write");
                    }
                    upstream_peer
                });
                let mut received = 0;
                let mut buf = vec![0u8; 256 * 1024];
                while received < expected {
                    received += client_peer.read(&mut buf).await.expect("read");
                }
                drop(writer.await.expect("writer"));
                drop(client_peer);
                let _ = relay.await;
            }
        })
    });
    group.finish();
}

criterion_group!(benches, handshake, relay_throughput);
criterion_main!(benches);
