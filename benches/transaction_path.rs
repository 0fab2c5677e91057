//! The proxy's own work per `select 1` round trip, without a database:
//! a client's Query in, the server's RowDescription, DataRow,
//! CommandComplete and ReadyForQuery back, through the relay over
//! in-memory pipes. Session pooling keeps one relay for every round.
//! Transaction pooling as `session::transactions` runs it: a client that
//! keeps its connection between transactions runs one relay that stops at
//! each idle boundary and is started again (`kept`, its pending reads
//! carried over); one whose connection goes back after each transaction
//! (`released`: someone waits, or `keep_between_transactions = "0s"`)
//! gets a fresh relay each time, its first bytes read apart and forwarded,
//! run in the bench's own task (the other two relay in a task of their
//! own, as the proxy does). A regression in per-message or
//! per-transaction work shows here without Postgres, pgbench or a second
//! core's noise.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "bench code: a panic is a failed run; the messages are a few bytes"
)]
#![allow(missing_docs)]

use authgres_wire::internals::{Relay, Stop};
use bytes::{BufMut, BytesMut};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

/// Round trips per measured iteration.
const ROUNDS: u64 = 1000;

/// `select 1` as the simple protocol sends it.
fn query() -> BytesMut {
    let mut out = BytesMut::new();
    let sql = b"select 1;\0";
    out.put_u8(b'Q');
    out.put_i32(4 + sql.len() as i32);
    out.put_slice(sql);
    out
}

/// The server's answer to it, ending idle.
fn answer() -> BytesMut {
    let mut out = BytesMut::new();
    // RowDescription: one int4 column "?column?".
    let name = b"?column?\0";
    out.put_u8(b'T');
    out.put_i32(4 + 2 + name.len() as i32 + 18);
    out.put_i16(1);
    out.put_slice(name);
    out.put_i32(0);
    out.put_i16(0);
    out.put_i32(23);
    out.put_i16(4);
    out.put_i32(-1);
    out.put_i16(0);
    // DataRow: "1".
    out.put_u8(b'D');
    out.put_i32(4 + 2 + 4 + 1);
    out.put_i16(1);
    out.put_i32(1);
    out.put_u8(b'1');
    // CommandComplete "SELECT 1", ReadyForQuery idle.
    let tag = b"SELECT 1\0";
    out.put_u8(b'C');
    out.put_i32(4 + tag.len() as i32);
    out.put_slice(tag);
    out.put_slice(&[b'Z', 0, 0, 0, 5, b'I']);
    out
}

/// A server that answers every Query with `answer`, until its pipe closes.
async fn server(mut pipe: DuplexStream, answer: BytesMut) {
    let mut buf = vec![0u8; 4096];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if pipe.write_all(&answer).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// Reads from the client's side until a ReadyForQuery has arrived.
async fn read_answer(client: &mut DuplexStream, buf: &mut [u8], length: usize) {
    let mut got = 0;
    while got < length {
        got += client.read(buf).await.expect("read");
    }
}

/// [`ROUNDS`] round trips from a client through `relay`, run in a task of
/// its own on the proxy's sides of two pipes, to a server answering
/// `answer`.
async fn rounds_through_a_task<R, F>(query: BytesMut, answer: BytesMut, relay: R)
where
    R: FnOnce(DuplexStream, DuplexStream) -> F,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (mut client, proxy_client) = tokio::io::duplex(64 * 1024);
    let (proxy_upstream, server_side) = tokio::io::duplex(64 * 1024);
    let server = tokio::spawn(server(server_side, answer.clone()));
    let relay = tokio::spawn(relay(proxy_client, proxy_upstream));
    let mut buf = vec![0u8; 4096];
    for _ in 0..ROUNDS {
        client.write_all(&query).await.expect("write");
        read_answer(&mut client, &mut buf, answer.len()).await;
    }
    drop(client);
    let _ = relay.await;
    let _ = server.await;
}

fn transaction_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (query, answer) = (query(), answer());
    let mut group = c.benchmark_group("transaction_path");
    group.throughput(Throughput::Elements(ROUNDS));
    group.bench_function("session_select_1", |b| {
        b.to_async(&runtime).iter(|| {
            rounds_through_a_task(query.clone(), answer.clone(), |mut c, mut u| async move {
                let _ = Relay::new(None, tokio::time::Instant::now())
                    .run(&mut c, &mut u)
                    .await;
            })
        })
    });
    group.bench_function("transaction_kept_select_1", |b| {
        b.to_async(&runtime).iter(|| {
            rounds_through_a_task(query.clone(), answer.clone(), |mut c, mut u| async move {
                let mut relay = Relay::new(None, tokio::time::Instant::now());
                relay.keep();
                while let Ok(Stop::Idle) = relay.run(&mut c, &mut u).await {
                    // As `session::transactions`: nothing else read the
                    // streams since the last run.
                    relay.keep_again();
                }
            })
        })
    });
    group.bench_function("transaction_released_select_1", |b| {
        b.to_async(&runtime).iter(|| {
            let (query, answer) = (query.clone(), answer.clone());
            async move {
                let (mut client, mut proxy_client) = tokio::io::duplex(64 * 1024);
                let (mut proxy_upstream, server_side) = tokio::io::duplex(64 * 1024);
                let server = tokio::spawn(server(server_side, answer.clone()));
                let mut buf = vec![0u8; 4096];
                let mut first = vec![0u8; 64];
                for _ in 0..ROUNDS {
                    client.write_all(&query).await.expect("write");
                    // As session::transactions: the first bytes, then a
                    // relay of its own until the idle boundary.
                    let n = proxy_client.read(&mut first).await.expect("read");
                    let mut relay = Relay::new(None, tokio::time::Instant::now());
                    relay.stop_at_idle(true);
                    relay
                        .forward(&first[..n], &mut proxy_upstream)
                        .await
                        .expect("forward");
                    let stopped = relay.run(&mut proxy_client, &mut proxy_upstream).await;
                    assert!(matches!(stopped, Ok(Stop::Idle)), "{stopped:?}");
                    read_answer(&mut client, &mut buf, answer.len()).await;
                }
                drop(client);
                drop(proxy_upstream);
                let _ = server.await;
            }
        })
    });
    group.finish();
}

criterion_group!(benches, transaction_path);
criterion_main!(benches);
