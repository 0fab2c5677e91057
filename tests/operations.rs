//! Running the proxy in production, through the real binary and a real
//! Postgres: draining on SIGTERM, reloading on SIGHUP, metrics a real
//! Prometheus parser reads, readiness, and database restarts that no idle
//! client notices.

#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::time::{Duration, Instant};

use authgres_sandbox::Issuer;
use common::{DATABASE, Options, Samples, Stack, psql_path};
use nix::sys::signal::Signal;

/// Waits until the proxy's log contains `needle`.
async fn wait_log(stack: &Stack, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stack.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "log never said {needle:?}:\n{}",
            stack.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn delta(before: &Samples, after: &Samples, sample: &str) -> f64 {
    after.get(sample).copied().unwrap_or(0.0) - before.get(sample).copied().unwrap_or(0.0)
}

fn value(samples: &Samples, sample: &str) -> f64 {
    *samples
        .get(sample)
        .unwrap_or_else(|| panic!("no sample {sample} in {samples:#?}"))
}

async fn create_log_table(stack: &Stack) {
    stack
        .cluster
        .admin(DATABASE)
        .await
        .expect("admin")
        .batch_execute(
            "create table drained (id bigserial primary key, client text not null);
             grant insert, select on drained to authenticated;
             grant usage on sequence drained_id_seq to authenticated;",
        )
        .await
        .expect("table");
}

async fn rows(stack: &Stack, client: &str) -> i64 {
    stack
        .cluster
        .admin(DATABASE)
        .await
        .expect("admin")
        .query_one("select count(*) from drained where client = $1", &[&client])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_pgbench_in_transaction_mode_and_the_long_transaction_commits() {
    let mut stack = Stack::start_with(Options {
        upstream_extra: "pool_mode = \"transaction\"\npool_size = 4\n",
        listen_extra: "shutdown_timeout = \"20s\"\n",
        ..Options::default()
    })
    .await;
    create_log_table(&stack).await;
    let script = stack.dir.path().join("drain.sql");
    std::fs::write(
        &script,
        "begin;\ninsert into drained (client) values ('bench');\nselect pg_sleep(0.002);\ncommit;\n",
    )
    .expect("script");
    let pgbench = std::process::Command::new(psql_path().with_file_name("pgbench"))
        .args(["-n", "-c", "8", "-j", "2", "-T", "30", "-M", "simple", "-f"])
        .arg(&script)
        .args(["-h", "127.0.0.1", "-p", &stack.port.to_string()])
        .args(["-U", "authenticated", DATABASE])
        .env("PGPASSWORD", stack.issuer.token("user_bench"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let long = stack.login("user_long").await;
    let long_transaction = tokio::spawn(async move {
        long.batch_execute(
            "begin; insert into drained (client) values ('long'); select pg_sleep(3); commit;",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let signalled = Instant::now();
    stack.signal(Signal::SIGTERM);

    let status = stack
        .wait_exit(Duration::from_secs(20))
        .expect("the proxy exits within shutdown_timeout");
    assert!(status.success(), "exit status {status}");
    let took = signalled.elapsed();
    assert!(
        took >= Duration::from_millis(2000),
        "exited after {took:?}, before the long transaction could commit"
    );
    long_transaction
        .await
        .expect("join")
        .expect("the long transaction in flight at the signal commits");
    assert_eq!(rows(&stack, "long").await, 1);

    let output = pgbench.wait_with_output().expect("pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let processed: i64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|n| n.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no count in pgbench output:\n{stdout}\n{stderr}"));
    assert!(processed > 50, "pgbench ran: {stdout}");
    // Every transaction pgbench saw complete is in the table, and none
    // that started was cut: each client was stopped at its next BEGIN.
    assert_eq!(rows(&stack, "bench").await, processed, "{stdout}\n{stderr}");
    let aborts: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(" aborted in command "))
        .collect();
    assert_eq!(
        aborts.len(),
        8,
        "every client closed by the drain:\n{stderr}"
    );
    for abort in aborts {
        assert!(
            abort.contains(" aborted in command 0 ")
                && abort.contains("terminating connection due to administrator command"),
            "a client was stopped inside a transaction, or not with 57P01: {abort}"
        );
    }
    assert!(stack.log().contains("drained: every client has left"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_new_provider_and_pool_size_while_a_session_runs() {
    let stack = Stack::start_with(Options {
        upstream_extra: "pool_size = 3\ncheckout_timeout = \"1s\"\n",
        ..Options::default()
    })
    .await;
    let second = Issuer::start().await.expect("second issuer");
    let alice = stack.login("user_alice").await;
    // Before: three connections per (database, role), one issuer.
    let bob = stack.login("user_bob").await;
    drop(bob);
    assert!(
        stack
            .connect("authenticated", &second.token("user_carol"))
            .await
            .is_err(),
        "the second issuer is not trusted yet"
    );

    stack.edit_config(|config| {
        config.replace("pool_size = 3", "pool_size = 1")
            + &format!(
                "[[providers]]\nname = \"second\"\nissuer = \"{}\"\njwks_url = \"{}\"\nroles = [\"authenticated\"]\n",
                second.issuer(),
                second.jwks_url()
            )
    });
    stack.signal(Signal::SIGHUP);
    wait_log(&stack, "configuration reloaded").await;

    // The open session runs on, with its identity.
    assert_eq!(common::user_id(&alice).await.as_deref(), Some("user_alice"));
    // The new size holds for new logins: alice's connection is the only one.
    let error = stack
        .connect("authenticated", &stack.issuer.token("user_bob"))
        .await
        .expect_err("the pool is full at its new size");
    assert_eq!(
        error.as_db_error().map(|e| e.code().code()),
        Some("53300"),
        "{error}"
    );
    drop(alice);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // And the new provider's tokens log in.
    let carol = stack
        .connect("authenticated", &second.token("user_carol"))
        .await
        .expect("the second issuer is trusted after the reload");
    assert_eq!(common::user_id(&carol).await.as_deref(), Some("user_carol"));
    let (_, pools) = stack.admin_get("/pools").await;
    let pools: serde_json::Value = serde_json::from_str(&pools).expect("json");
    let wire = &pools["pools"][0];
    assert_eq!(wire["pool"], "wire");
    assert_eq!(wire["slots"][0]["size"], 1, "{pools}");
    drop(carol);

    // A config that does not parse, or does not validate, changes nothing.
    let good = std::fs::read_to_string(stack.config_path()).expect("config");
    stack.edit_config(|config| config + "\n[listen\n");
    stack.signal(Signal::SIGHUP);
    wait_log(&stack, "reload refused").await;
    stack.edit_config(|_| good.replace("roles = [\"authenticated\"]\n", "roles = []\n"));
    let (status, body) = stack.admin_post("/reload").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("roles"), "says what is wrong: {body}");
    let still = stack
        .connect("authenticated", &second.token("user_dave"))
        .await
        .expect("the running configuration stays");
    assert_eq!(common::user_id(&still).await.as_deref(), Some("user_dave"));
    let samples = stack.metrics().await;
    assert_eq!(
        value(
            &samples,
            "authgres_config_reloads_total{outcome=\"applied\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "authgres_config_reloads_total{outcome=\"refused\"}"
        ),
        2.0
    );

    // A change that needs a restart is named, and the rest applies.
    stack.edit_config(|_| good.replace(&format!("127.0.0.1:{}", stack.port), "127.0.0.1:1"));
    let (status, body) = stack.admin_post("/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("[listen] address"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_parse_and_move_with_logins_failures_and_transactions() {
    let stack = Stack::start().await;
    stack.wait_ready().await;
    let before = stack.metrics().await;

    let mut sessions = Vec::new();
    for sub in ["user_a", "user_b", "user_c"] {
        sessions.push(stack.login(sub).await);
    }
    for _ in 0..5 {
        sessions[0].simple_query("select 1").await.expect("query");
    }
    let impostor = authgres_sandbox::Signer::generate(stack.issuer.issuer()).expect("keys");
    let forged = impostor.mint(&authgres_sandbox::TokenSpec::new("user_x"));
    assert!(stack.connect("authenticated", &forged).await.is_err());
    let response = reqwest::Client::new()
        .post(stack.http_url())
        .header(
            "Authorization",
            format!("Bearer {}", stack.issuer.token("user_h")),
        )
        .header(
            "Neon-Connection-String",
            format!("postgresql://authenticated@127.0.0.1/{DATABASE}"),
        )
        .body(r#"{"query": "select 1 as one", "params": []}"#)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 200);

    let after = stack.metrics().await;
    let tcp_ok = "authgres_logins_total{outcome=\"ok\",reason=\"none\",transport=\"tcp\"}";
    assert_eq!(delta(&before, &after, tcp_ok), 3.0);
    let forged_sample =
        "authgres_logins_total{outcome=\"refused\",reason=\"bad_token\",transport=\"tcp\"}";
    assert_eq!(delta(&before, &after, forged_sample), 1.0);
    let http_ok = "authgres_logins_total{outcome=\"ok\",reason=\"none\",transport=\"http\"}";
    assert_eq!(delta(&before, &after, http_ok), 1.0);
    assert!(
        delta(
            &before,
            &after,
            "authgres_transactions_total{transport=\"tcp\"}"
        ) >= 5.0
    );
    assert!(delta(&before, &after, "authgres_queries_total{transport=\"tcp\"}") >= 5.0);
    assert!(
        delta(
            &before,
            &after,
            "authgres_client_received_bytes_total{transport=\"tcp\"}"
        ) > 0.0
    );
    assert!(
        delta(
            &before,
            &after,
            "authgres_client_sent_bytes_total{transport=\"tcp\"}"
        ) > 0.0
    );
    assert_eq!(
        delta(
            &before,
            &after,
            "authgres_http_requests_total{route=\"sql\",status=\"200\"}"
        ),
        1.0
    );
    assert!(
        delta(
            &before,
            &after,
            "authgres_token_verification_seconds_count{outcome=\"ok\"}"
        ) >= 4.0
    );
    assert_eq!(
        value(&after, "authgres_clients{state=\"idle\",transport=\"tcp\"}"),
        3.0
    );
    assert_eq!(
        value(
            &after,
            "authgres_pool_connections{database=\"app\",pool=\"wire\",role=\"authenticated\",state=\"in_use\"}"
        ),
        3.0,
        "session pooling: each session holds its connection"
    );
    assert!(value(&after, "authgres_jwks_fetches_total{provider=\"sandbox\"}") >= 1.0);
    assert_eq!(
        value(&after, "authgres_jwks_usable{provider=\"sandbox\"}"),
        1.0
    );
    assert_eq!(value(&after, "authgres_draining"), 0.0);
    assert!(value(&after, "authgres_upstream_login_seconds_count") >= 3.0);

    let (_, clients) = stack.admin_get("/clients").await;
    let clients: serde_json::Value = serde_json::from_str(&clients).expect("json");
    let subjects: Vec<&str> = clients["clients"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["subject"].as_str())
        .collect();
    assert_eq!(subjects, ["user_a", "user_b", "user_c"], "{clients}");
}

#[tokio::test(flavor = "multi_thread")]
async fn readyz_is_503_while_the_upstream_is_down_and_while_draining() {
    let mut stack = Stack::start().await;
    stack.wait_ready().await;
    assert_eq!(stack.admin_get("/healthz").await.0, 200);

    stack.cluster.stop();
    // The last probe's answer is reused for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, body) = stack.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains(&stack.cluster.port().to_string()), "{body}");
    stack.cluster.start_again().expect("postgres starts again");
    stack.wait_ready().await;

    let alice = stack.login("user_alice").await;
    alice.batch_execute("begin").await.expect("begin");
    stack.signal(Signal::SIGTERM);
    wait_log(&stack, "draining").await;
    let (status, body) = stack.admin_get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"draining\":true"), "{body}");
    assert_eq!(
        stack.admin_get("/healthz").await.0,
        200,
        "alive while draining"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", stack.port)).is_err(),
        "no new clients while draining"
    );
    // The open transaction finishes; then the session is closed and the
    // proxy exits.
    alice.batch_execute("commit").await.expect("commit");
    let status = stack
        .wait_exit(Duration::from_secs(10))
        .expect("exits once the last client left");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_restart_is_invisible_to_idle_transaction_pooled_clients() {
    let mut stack = Stack::start_with(Options {
        upstream_extra: "pool_mode = \"transaction\"\n",
        ..Options::default()
    })
    .await;
    // Clients with session state: a setting and a named prepared statement.
    let mut clients = Vec::new();
    for i in 0..4 {
        let client = stack.login(&format!("user_{i}")).await;
        client
            .batch_execute(&format!("set application_name = 'client_{i}'"))
            .await
            .expect("set");
        let statement = client
            .prepare("select auth.user_id(), current_setting('application_name')")
            .await
            .expect("prepare");
        clients.push((client, statement));
    }
    // Forty idle pooled connections, and twenty for /sql.
    let mut open = Vec::new();
    for i in 0..40 {
        let client = stack.login(&format!("warm_{i}")).await;
        client
            .batch_execute("begin; select 1")
            .await
            .expect("begin");
        open.push(client);
    }
    for client in &open {
        client.batch_execute("commit").await.expect("commit");
    }
    drop(open);
    let http = reqwest::Client::new();
    let (url, token) = (stack.http_url(), stack.issuer.token("user_h"));
    let sql = |query: &'static str| {
        let request = http
            .post(&url)
            .header("Authorization", format!("Bearer {token}"))
            .header(
                "Neon-Connection-String",
                format!("postgresql://authenticated@127.0.0.1/{DATABASE}"),
            )
            .body(format!(r#"{{"query": "{query}", "params": []}}"#));
        async move { request.send().await.expect("post").status().as_u16() }
    };
    let warm: Vec<u16> =
        futures_util::future::join_all((0..20).map(|_| sql("select pg_sleep(0.2)"))).await;
    assert!(warm.iter().all(|&s| s == 200), "{warm:?}");

    let cluster = &mut stack.cluster;
    tokio::task::block_in_place(|| cluster.restart()).expect("pg_ctl restart -m fast");

    for (i, (client, statement)) in clients.iter().enumerate() {
        let row = client
            .query_one(statement, &[])
            .await
            .unwrap_or_else(|e| panic!("client {i} after the restart: {e}"));
        assert_eq!(row.get::<_, Option<String>>(0), Some(format!("user_{i}")));
        assert_eq!(row.get::<_, String>(1), format!("client_{i}"));
    }
    let tokens: Vec<String> = (0..25)
        .map(|i| stack.issuer.token(&format!("new_{i}")))
        .collect();
    let logins = futures_util::future::join_all(
        tokens
            .iter()
            .map(|token| stack.connect("authenticated", token)),
    )
    .await;
    let failed: Vec<String> = logins
        .iter()
        .filter_map(|l| l.as_ref().err().map(ToString::to_string))
        .collect();
    assert!(
        failed.is_empty(),
        "logins failed after the restart: {failed:?}"
    );
    let after: Vec<u16> = futures_util::future::join_all((0..20).map(|_| sql("select 1"))).await;
    assert!(
        after.iter().all(|&s| s == 200),
        "/sql after the restart: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn http_requests_in_flight_finish_during_a_drain() {
    let mut stack = Stack::start().await;
    let request = reqwest::Client::new()
        .post(stack.http_url())
        .header(
            "Authorization",
            format!("Bearer {}", stack.issuer.token("user_h")),
        )
        .header(
            "Neon-Connection-String",
            format!("postgresql://authenticated@127.0.0.1/{DATABASE}"),
        )
        .body(r#"{"query": "select pg_sleep(1.5)::text as slept", "params": []}"#)
        .send();
    let in_flight = tokio::spawn(request);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stack.signal(Signal::SIGTERM);
    let response = in_flight.await.expect("join").expect("answered");
    assert_eq!(response.status(), 200, "the request in flight completes");
    let status = stack
        .wait_exit(Duration::from_secs(10))
        .expect("exits after the last response");
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_timeout_closes_what_is_left_and_a_second_signal_exits_at_once() {
    let mut stack = Stack::start_with(Options {
        listen_extra: "shutdown_timeout = \"1s\"\n",
        json_logs: true,
        ..Options::default()
    })
    .await;
    let stuck = stack.login("user_stuck").await;
    stuck.batch_execute("begin").await.expect("begin");
    let signalled = Instant::now();
    stack.signal(Signal::SIGTERM);
    let status = stack
        .wait_exit(Duration::from_secs(10))
        .expect("exits after shutdown_timeout");
    assert!(status.success());
    let took = signalled.elapsed();
    assert!(
        (Duration::from_millis(900)..Duration::from_secs(5)).contains(&took),
        "{took:?}"
    );
    let error = stuck.simple_query("select 1").await.expect_err("closed");
    assert!(
        error.is_closed() || error.as_db_error().is_some(),
        "{error}"
    );
    // Every log line is one JSON object with a level.
    let log = stack.log();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let parsed: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(parsed["level"].is_string(), "{line}");
    }
    assert!(log.contains("shutdown_timeout reached"), "{log}");

    // A second signal does not wait for anyone.
    stack.edit_config(|c| c.replace("shutdown_timeout = \"1s\"", "shutdown_timeout = \"60s\""));
    stack.restart_proxy();
    let stuck = stack.login("user_stuck").await;
    stuck.batch_execute("begin").await.expect("begin");
    let drains_before = stack.log().matches("\"draining\"").count();
    stack.signal(Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.log().matches("\"draining\"").count() == drains_before {
        assert!(Instant::now() < deadline, "never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = Instant::now();
    stack.signal(Signal::SIGINT);
    let status = stack
        .wait_exit(Duration::from_secs(5))
        .expect("the second signal exits");
    assert!(status.success());
    assert!(
        second.elapsed() < Duration::from_secs(2),
        "{:?}",
        second.elapsed()
    );
}
