//! Memory the proxy holds per idle authenticated client: opens N sessions
//! through the real binary, each logged in with a token and idle, and
//! reports the proxy's RSS growth per session.
//!
//! Run: `cargo bench --bench idle_memory [-- N]` (default 250; in session
//! pooling every client holds an upstream backend, so N is bounded by the
//! sandbox's max_connections of 300).

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
    let sessions: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(250);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let stack = common::Stack::start_with(common::Options {
            upstream_extra: "pool_size = 1000",
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
            let client = stack.connect("authenticated", &token).await.expect("connect");
            client.simple_query("select 1").await.expect("query");
            clients.push(client);
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let after = rss_kib(stack.proxy_pid());
        let growth = after.saturating_sub(before);
        println!(
            "{sessions} idle sessions: proxy RSS {before} KiB -> {after} KiB, +{growth} KiB, {:.1} KiB per session; \
             5,000 sessions would add about {:.0} MiB",
            growth as f64 / sessions as f64,
            growth as f64 / sessions as f64 * 5000.0 / 1024.0
        );
        drop(clients);
    });
}
