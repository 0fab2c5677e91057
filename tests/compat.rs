//! Every driver unmodified through authgres: the real clients (node-postgres,
//! postgres.js, psycopg 3 on libpq 18, asyncpg) connect with a token as the password,
//! over TLS and in the clear, and run the compatibility checks in
//! tests/compat/<language>/, provisioned on first use (see
//! `common::provision`).

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::path::Path;
use std::process::Command;

use common::Stack;

/// A stack with what the checks need beyond the todos schema: a table
/// without RLS (Postgres refuses COPY FROM into tables with RLS).
async fn stack() -> Stack {
    stack_with("").await
}

/// Transaction pooling with two connections: the drivers' transactions
/// move between backends while their sessions go on.
const TRANSACTION_POOLING: &str = "pool_mode = \"transaction\"\npool_size = 2";

async fn stack_with(upstream_extra: &'static str) -> Stack {
    let stack = Stack::start_with(common::Options {
        upstream_extra,
        ..Default::default()
    })
    .await;
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
    match program {
        "node" => {
            common::provision::node_modules("tests/compat/node");
        }
        "python3" => {
            command.env("PYTHONPATH", common::provision::python_path());
        }
        _ => {}
    }
    command
        .args(args)
        .current_dir(&dir)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", stack.port.to_string())
        .env("PGDATABASE", common::DATABASE)
        .env("AUTHGRES_TOKEN_A", stack.issuer.token("user_alice"))
        .env("AUTHGRES_TOKEN_B", stack.issuer.token("user_bob"))
        .env("AUTHGRES_TOKEN_OAUTH", stack.issuer.token("user_oauth"))
        .env("AUTHGRES_ISSUER", stack.issuer.issuer())
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
    let stack = stack().await;
    run(&stack, "node", &["run.mjs"], "tests/compat/node").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg_and_asyncpg() {
    let stack = stack().await;
    run(&stack, "python3", &["run.py"], "tests/compat/python").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn node_postgres_and_postgres_js_in_transaction_pooling() {
    let stack = stack_with(TRANSACTION_POOLING).await;
    run(&stack, "node", &["run.mjs"], "tests/compat/node").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn psycopg_and_asyncpg_in_transaction_pooling() {
    let stack = stack_with(TRANSACTION_POOLING).await;
    run(&stack, "python3", &["run.py"], "tests/compat/python").await;
}

/// Postgres 18's libpq: protocol 3.2 negotiation, cancel, native OAuth.
#[tokio::test(flavor = "multi_thread")]
async fn libpq_18_protocol_cancel_and_oauth() {
    let stack = stack().await;
    run(&stack, "python3", &["libpq18.py"], "tests/compat/python").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn libpq_18_protocol_cancel_and_oauth_in_transaction_pooling() {
    let stack = stack_with(TRANSACTION_POOLING).await;
    run(&stack, "python3", &["libpq18.py"], "tests/compat/python").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokio_postgres_full_checklist() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_postgres::error::SqlState;

    let stack = stack().await;
    let alice = stack.issuer.token("user_alice");
    let client = stack
        .connect_tls("authenticated", &alice, "sslmode=require")
        .await
        .expect("TLS");
    // Simple and parameterised queries, RLS.
    client
        .simple_query("insert into todos (task) values ('tokio-postgres')")
        .await
        .expect("simple");
    let n: i32 = client
        .query_one("select $1::int + 1", &[&41i32])
        .await
        .expect("param")
        .get(0);
    assert_eq!(n, 42);
    let owners: Vec<String> = client
        .query("select distinct user_id from todos", &[])
        .await
        .expect("rls")
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(owners, ["user_alice"]);
    // A prepared statement reused; a transaction rolled back.
    let statement = client.prepare("select $1::int").await.expect("prepare");
    for i in 0..200i32 {
        let got: i32 = client
            .query_one(&statement, &[&i])
            .await
            .expect("execute")
            .get(0);
        assert_eq!(got, i);
    }
    let mut client = client;
    let tx = client.transaction().await.expect("begin");
    tx.execute("insert into todos (task) values ('rolled back')", &[])
        .await
        .expect("insert");
    tx.rollback().await.expect("rollback");
    let count: i64 = client
        .query_one("select count(*) from todos where task = 'rolled back'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 0);
    // COPY both ways.
    let sink = client
        .copy_in("copy copy_target (task) from stdin")
        .await
        .expect("copy in");
    futures_util::pin_mut!(sink);
    for i in 0..1000 {
        sink.send(bytes::Bytes::from(format!("tp {i}\n")))
            .await
            .expect("send");
    }
    assert_eq!(sink.finish().await.expect("finish"), 1000);
    let out = client
        .copy_out("copy (select task from copy_target where task like 'tp %') to stdout")
        .await
        .expect("copy out");
    let chunks: Vec<_> = out.collect().await;
    let text: Vec<u8> = chunks
        .into_iter()
        .flat_map(|c| c.expect("chunk").to_vec())
        .collect();
    assert_eq!(
        text.split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        1000
    );
    // A 100k-row result and an error with its SQLSTATE.
    let rows = client
        .query("select i from generate_series(1, 100000) i", &[])
        .await
        .expect("100k rows");
    assert_eq!(rows.len(), 100_000);
    let error = client.query("select 1/0", &[]).await.expect_err("error");
    assert_eq!(error.code(), Some(&SqlState::DIVISION_BY_ZERO));

    // LISTEN/NOTIFY across two connections.
    let (listener, mut notes) = common::listening_client(&stack, &alice).await;
    listener
        .batch_execute("listen tp_channel")
        .await
        .expect("listen");
    let notifier = stack.login("user_bob").await;
    notifier
        .batch_execute("select pg_notify('tp_channel', 'hello')")
        .await
        .expect("notify");
    let payload = tokio::time::timeout(std::time::Duration::from_secs(5), notes.recv())
        .await
        .expect("notification within 5 s")
        .expect("payload");
    assert_eq!(payload, "hello");
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_and_psql_copy_through_the_proxy() {
    let stack = stack().await;
    let token = stack.issuer.token("user_alice");
    common::pgbench_rls(&stack, &token, 4);

    // psql's \copy both ways (COPY FROM STDIN / TO STDOUT underneath).
    let psql = |command: &str, input: &str| {
        use std::io::Write as _;
        let mut child = Command::new(common::psql_path())
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", command])
            .arg(format!(
                "host=127.0.0.1 port={} dbname={} user=authenticated",
                stack.port,
                common::DATABASE
            ))
            .env("PGPASSWORD", &token)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("psql");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write");
        let output = child.wait_with_output().expect("psql");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    psql(
        "\\copy copy_target (task) from stdin",
        "psql one\npsql two\n\\.\n",
    );
    let out = psql(
        "\\copy (select task from copy_target order by task) to stdout",
        "",
    );
    assert_eq!(out, "psql one\npsql two\n");
}

/// Runs the pgjdbc checks (Debian's driver) against `stack`.
async fn run_pgjdbc(stack: &Stack) {
    run(
        stack,
        "java",
        &["-cp", common::provision::PGJDBC_JAR, "Compat.java"],
        "tests/compat/java",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pgjdbc() {
    run_pgjdbc(&stack().await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pgjdbc_in_transaction_pooling() {
    run_pgjdbc(&stack_with(TRANSACTION_POOLING).await).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_through_the_checklist() {
    use std::process::Stdio;

    let stack = stack().await;
    let token = stack.issuer.token("user_alice");
    let conninfo = |sslmode: &str| {
        format!(
            "host=127.0.0.1 port={} dbname={} user=authenticated sslmode={sslmode}",
            stack.port,
            common::DATABASE
        )
    };
    let psql = |password: &str, sslmode: &str, commands: &[&str]| {
        let mut command = Command::new(common::psql_path());
        command
            .args(["-X", "-A", "-t", "-q"])
            .arg(conninfo(sslmode))
            .env("PGPASSWORD", password)
            .stdin(Stdio::null());
        for c in commands {
            command.args(["-c", c]);
        }
        command.output().expect("psql")
    };
    // Plaintext and TLS; RLS; a rolled-back transaction; 100k rows.
    for sslmode in ["disable", "require"] {
        let out = psql(
            &token,
            sslmode,
            &[
                "select auth.user_id(), pg_backend_pid() > 0",
                "begin",
                "insert into todos (task) values ('rolled back')",
                "rollback",
                "select count(*) from todos",
                "select count(*) from (select generate_series(1, 100000)) s",
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = stdout.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(
            lines,
            ["user_alice|t", "0", "100000"],
            "{sslmode}: {stdout}"
        );
    }
    // A bad token: a readable message.
    let out = psql("not-a-token", "disable", &["select 1"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("token is malformed"), "{stderr}");
    // An error with its SQLSTATE.
    let out = psql(
        &token,
        "disable",
        &["\\set VERBOSITY verbose", "select 1/0"],
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("22012"));

    // LISTEN in psql, NOTIFY from another connection; psql reports it after
    // its next command.
    let notifier = stack.login("user_bob").await;
    let listener = Command::new(common::psql_path())
        .args(["-X", "-A", "-t"])
        .arg(conninfo("disable"))
        .args([
            "-c",
            "listen psql_channel",
            "-c",
            "select pg_sleep(2)",
            "-c",
            "select 1",
        ])
        .env("PGPASSWORD", &token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql listener");
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    notifier
        .batch_execute("select pg_notify('psql_channel', 'hello')")
        .await
        .expect("notify");
    let out = tokio::task::spawn_blocking(move || listener.wait_with_output())
        .await
        .expect("join")
        .expect("psql");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("Asynchronous notification \"psql_channel\" with payload \"hello\""),
        "{stdout}"
    );

    // Ctrl-C in psql sends a CancelRequest through the proxy.
    let sleeper = Command::new(common::psql_path())
        .args(["-X", "-A", "-t"])
        .arg(conninfo("disable"))
        .args(["-c", "select pg_sleep(30)"])
        .env("PGPASSWORD", &token)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("psql sleeper");
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(sleeper.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let started = std::time::Instant::now();
    let out = tokio::task::spawn_blocking(move || sleeper.wait_with_output())
        .await
        .expect("join")
        .expect("psql");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
}
