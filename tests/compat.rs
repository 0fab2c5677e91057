//! Every driver unmodified through authgres: the real clients (node-postgres,
//! postgres.js, psycopg 3, asyncpg) connect with a token as the password,
//! over TLS and in the clear, and run the compatibility checks in
//! tests/compat/<language>/. .ci/run installs them.

mod common;

use std::path::Path;
use std::process::Command;

use common::Stack;

/// A stack with what the checks need beyond the todos schema: a table
/// without RLS (Postgres refuses COPY FROM into tables with RLS).
async fn stack() -> Stack {
    let stack = Stack::start().await;
    stack
        .cluster
        .admin(common::DATABASE)
        .await
        .expect("admin")
        .batch_execute(
            "create table copy_target (task text);
             grant select, insert, delete on copy_target to authenticated;",
        )
        .await
        .expect("copy_target");
    stack
}

async fn run(stack: &Stack, program: &str, args: &[&str], dir: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut command = Command::new(program);
    command
        .args(args)
        .current_dir(&dir)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", stack.port.to_string())
        .env("PGDATABASE", common::DATABASE)
        .env("AUTHGRES_TOKEN_A", stack.issuer.token("user_alice"))
        .env("AUTHGRES_TOKEN_B", stack.issuer.token("user_bob"))
        .env("AUTHGRES_CA", stack.dir.path().join("ca.pem"));
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success() && stdout.contains(" passed, 0 failed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn node_postgres_and_postgres_js() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compat/node/node_modules");
    assert!(
        dir.join("pg").is_dir(),
        "run `npm ci --prefix tests/compat/node`"
    );
    let stack = stack().await;
    run(&stack, "node", &["run.mjs"], "tests/compat/node").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg_and_asyncpg() {
    let stack = stack().await;
    run(&stack, "python3", &["run.py"], "tests/compat/python").await;
}
