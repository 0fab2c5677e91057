//! The real @neondatabase/serverless driver (npm, on node) against authgres:
//! /sql over HTTP and the Postgres protocol over WebSocket. The checks live
//! in tests/neon/run.mjs; the driver is installed from its lockfile on
//! first use (see `common::provision`).

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::path::Path;
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn the_neon_serverless_driver_works_against_authgres() {
    run_checks(&common::Stack::start().await).await;
}

/// Its WebSocket `Pool` is a wire client like any other: the same checks with
/// transaction pooling behind /v2.
#[tokio::test(flavor = "multi_thread")]
async fn the_neon_serverless_driver_works_under_transaction_pooling() {
    let stack = common::Stack::start_with(common::Options {
        upstream_extra: "pool_mode = \"transaction\"\npool_size = 2",
        ..Default::default()
    })
    .await;
    run_checks(&stack).await;
}

/// Runs tests/neon/run.mjs against `stack`.
async fn run_checks(stack: &common::Stack) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/neon");
    common::provision::node_modules("tests/neon");
    let output = tokio::task::spawn_blocking({
        let http_url = stack.http_url();
        let pg = format!("127.0.0.1:{}", stack.port);
        let a = stack.issuer.token("user_alice");
        let b = stack.issuer.token("user_bob");
        move || {
            Command::new("node")
                .arg("run.mjs")
                .current_dir(&dir)
                .env("AUTHGRES_HTTP_URL", http_url)
                .env("AUTHGRES_PG_HOSTPORT", pg)
                .env("AUTHGRES_TOKEN_A", a)
                .env("AUTHGRES_TOKEN_B", b)
                .output()
                .expect("run node")
        }
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}
