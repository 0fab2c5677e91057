//! The real @neondatabase/serverless driver (npm, on node) against authgres:
//! /sql over HTTP and the Postgres protocol over WebSocket. The checks live
//! in tests/neon/run.mjs; `npm ci --prefix tests/neon` installs the driver
//! (.ci/run does).

mod common;

use std::path::Path;
use std::process::Command;

#[tokio::test(flavor = "multi_thread")]
async fn the_neon_serverless_driver_works_against_authgres() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/neon");
    assert!(
        dir.join("node_modules/@neondatabase/serverless").is_dir(),
        "the Neon driver is not installed: run `npm ci --prefix tests/neon`"
    );
    let stack = common::Stack::start().await;
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
