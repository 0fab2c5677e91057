//! Memory the proxy holds per idle authenticated client: opens N sessions
//! through the real binary, each logged in with a token, one query run, then
//! idle, and reports the proxy's RSS growth.
//!
//! Run: `cargo bench --bench idle_memory -- [N] [transaction]`.
//! In session pooling (default, N = 250) every client holds an upstream
//! backend, so N is bounded by the sandbox's max_connections of 300. With
//! `transaction`, clients share 20 connections and N defaults to 5,000.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]
#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("proc status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn main() {
    let transaction = std::env::args().any(|a| a == "transaction");
    let sessions: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(if transaction { 5000 } else { 250 });
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let stack = common::Stack::start_with(common::Options {
            upstream_extra: if transaction {
                "pool_mode = \"transaction\"\npool_size = 20"
            } else {
                "pool_size = 1000"
            },
            listen_extra: "max_connections = 20000",
            ..Default::default()
        })
        .await;
        let token = stack.issuer.token("user_idle");
        // Warm up: keys fetched, allocator pools touched.
        let warm = stack.connect("authenticated", &token).await.expect("warm");
        warm.simple_query("select 1").await.expect("query");
        drop(warm);
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let before = rss_kib(stack.proxy_pid());
        let mut clients = Vec::with_capacity(sessions);
        for _ in 0..sessions {
            let client = stack
                .connect("authenticated", &token)
                .await
                .expect("connect");
            client.simple_query("select 1").await.expect("query");
            clients.push(client);
        }
        // Past `keep_between_transactions` (1s) and the reaper's round
        // after it: a transaction-pooled client that kept its connection
        // has given it back, and holds what any idle client holds.
        tokio::time::sleep(std::time::Duration::from_millis(2000)).await;
        let after = rss_kib(stack.proxy_pid());
        let growth = after.saturating_sub(before);
        let mode = if transaction {
            "transaction"
        } else {
            "session"
        };
        println!(
            "{sessions} idle sessions ({mode} pooling): proxy RSS {before} KiB -> {after} KiB, \
             +{:.1} MiB, {:.1} KiB per session; at that rate 5,000 sessions add {:.0} MiB",
            growth as f64 / 1024.0,
            growth as f64 / sessions as f64,
            growth as f64 / sessions as f64 * 5000.0 / 1024.0
        );
        drop(clients);
    });
}
