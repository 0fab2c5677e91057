//! What `auth.user_id()` costs inside a query: a 100,000-row scan filtered
//! by the identity, through the real proxy, four ways: a constant, a plain
//! setting read (forgeable, for comparison), the verified function per row,
//! and the verified function wrapped in a scalar subquery (once per
//! statement). Prints the median of several runs and the per-row cost.
//!
//! Run: `cargo bench --bench identity_cost`

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]
#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

const ROWS: i64 = 100_000;
const RUNS: usize = 9;

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(measure());
}

async fn measure() {
    let stack = common::Stack::start().await;
    let admin = stack.cluster.admin(common::DATABASE).await.expect("admin");
    admin
        .batch_execute(&format!(
            "create table scan (id bigint, user_id text);
             insert into scan select i, 'user_' || (i % 2) from generate_series(1, {ROWS}) i;
             analyze scan;
             grant select on scan to authenticated;"
        ))
        .await
        .expect("table");
    let client = stack
        .connect("authenticated", &stack.issuer.token("user_1"))
        .await
        .expect("connect");
    let variants = [
        ("constant", "user_id = 'user_1'"),
        (
            "plain setting (forgeable)",
            "user_id = current_setting('authgres.claims', true)::jsonb ->> 'sub'",
        ),
        ("auth.user_id() per row", "user_id = auth.user_id()"),
        (
            "(select auth.user_id())",
            "user_id = (select auth.user_id())",
        ),
    ];
    let mut baseline = None;
    println!("{ROWS}-row scan, median of {RUNS} runs, PostgreSQL through authgres");
    println!("{:<28} {:>10} {:>14}", "filter", "ms", "µs per row");
    for (name, filter) in variants {
        let query = format!("select count(*) from scan where {filter}");
        let mut times = Vec::with_capacity(RUNS);
        for _ in 0..RUNS {
            let started = Instant::now();
            let count: i64 = client.query_one(&query, &[]).await.expect(&query).get(0);
            times.push(started.elapsed());
            assert_eq!(count, ROWS / 2, "{name}");
        }
        times.sort();
        let median = times[RUNS / 2];
        let base = *baseline.get_or_insert(median);
        let per_row = median.saturating_sub(base).as_secs_f64() * 1e6 / ROWS as f64;
        println!("{name:<28} {:>10.2} {per_row:>14.3}", ms(median));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
