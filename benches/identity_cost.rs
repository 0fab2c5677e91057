//! What `auth.user_id()` costs, on both identity paths side by side,
//! through the real proxy on a sandbox Postgres (issue 23):
//!
//! - per call: `select count(auth.user_id()) from generate_series(1, N)`
//!   minus the same count of a constant, divided by N;
//! - the seed's query, `select count(*) from todos where user_id =
//!   auth.user_id()`, on 10,000 todos of one user: unwrapped (a call per
//!   row), wrapped in `(select ...)` (once per statement), and with a
//!   constant.
//!
//! The native path is measured where the sandbox could build the library
//! for its server (Debian's PostgreSQL 15 with postgresql-server-dev-15);
//! the portable one always (init-db --portable, switched in place).
//! Prints the median of several runs.
//!
//! Run: `cargo bench --bench identity_cost`

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "test code: a panic is a failing test"
)]
#![allow(missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

/// Calls per run of the per-call query.
const CALLS: i64 = 200_000;
/// Rows of the seed's table.
const TODOS: i64 = 10_000;
const RUNS: usize = 7;
const USER: &str = "user_1";

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(measure());
}

async fn measure() {
    let stack = common::Stack::start().await;
    stack
        .installer()
        .await
        .batch_execute(&format!(
            "insert into todos (user_id, task) select '{USER}', 'task ' || i \
               from generate_series(1, {TODOS}) i;
             analyze todos;"
        ))
        .await
        .expect("todos");
    let mut paths = vec![("portable", vec!["--portable"])];
    if stack.cluster.native_library_dir().is_some() && !stack.installer.managed() {
        paths.insert(0, ("native", vec![]));
    }
    println!(
        "auth.user_id() through authgres, PostgreSQL {}, median of {RUNS} runs",
        server_version(&stack).await
    );
    println!(
        "{:<9} {:>12} {:>16} {:>14} {:>14}",
        "path", "µs per call", "unwrapped ms", "wrapped ms", "constant ms"
    );
    for (path, args) in paths {
        let said = stack.init_db(&args);
        assert_eq!(common::identity_path(&said), path, "{said}");
        let client = stack
            .connect("authenticated", &stack.issuer.token(USER))
            .await
            .expect("connect");
        let per_call = {
            let calls = median(
                &client,
                &format!("select count(auth.user_id()) from generate_series(1, {CALLS})"),
                CALLS,
            )
            .await;
            let constant = median(
                &client,
                &format!("select count('{USER}'::text) from generate_series(1, {CALLS})"),
                CALLS,
            )
            .await;
            calls.saturating_sub(constant).as_secs_f64() * 1e6 / CALLS as f64
        };
        let seed = "select count(*) from todos where user_id = ";
        let unwrapped = median(&client, &format!("{seed}auth.user_id()"), TODOS).await;
        let wrapped = median(&client, &format!("{seed}(select auth.user_id())"), TODOS).await;
        let constant = median(&client, &format!("{seed}'{USER}'"), TODOS).await;
        println!(
            "{path:<9} {per_call:>12.3} {:>16.2} {:>14.2} {:>14.2}",
            ms(unwrapped),
            ms(wrapped),
            ms(constant)
        );
    }
}

/// The median time of `query`, which must count `expected`.
async fn median(client: &tokio_postgres::Client, query: &str, expected: i64) -> Duration {
    let mut times = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let started = Instant::now();
        let count: i64 = client.query_one(query, &[]).await.expect(query).get(0);
        times.push(started.elapsed());
        assert_eq!(count, expected, "{query}");
    }
    times.sort();
    times[RUNS / 2]
}

async fn server_version(stack: &common::Stack) -> String {
    stack
        .installer()
        .await
        .query_one("select current_setting('server_version')", &[])
        .await
        .expect("version")
        .get(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
