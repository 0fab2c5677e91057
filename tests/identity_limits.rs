//! Limits per identity and fair queueing (issue 25, item 3), through the
//! real binary: connections and transactions per user and per tenant,
//! refused with 53300 / 53400 (429 over `/sql`), a transaction-pooled
//! session that goes on after a refusal, limits changed by a reload for
//! new work only, and a light user served ahead of a heavy user's queue.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::time::{Duration, Instant};

use authgres_sandbox::TokenSpec;
use common::Stack;
use serde_json::json;

const TRANSACTION_POOLING: &str = "pool_mode_by_database = { app = \"transaction\" }";
const ROLE: &str = "password_env = \"AUTHGRES_AUTHENTICATED_PASSWORD\"\n";

async fn start(upstream_extra: &'static str) -> Stack {
    Stack::start_with(common::Options {
        upstream_extra,
        ..Default::default()
    })
    .await
}

/// Puts `role` lines under `[roles.authenticated]` and `provider` lines
/// under the sandbox provider (replacing the last call's), and reloads.
async fn configure(stack: &Stack, role: &str, provider: &str) {
    stack.edit_config(|text| {
        let kept: String = text
            .lines()
            .filter(|line| !line.starts_with("max_") && !line.starts_with("tenant_claim"))
            .map(|line| format!("{line}\n"))
            .collect();
        let with_role = kept.replace(
            &format!("[roles.authenticated]\n{ROLE}"),
            &format!("[roles.authenticated]\n{ROLE}{role}\n"),
        );
        format!("{with_role}{provider}\n")
    });
    let (status, body) = stack.admin_post("/reload").await;
    assert_eq!(status, 200, "reload: {body}");
}

/// The SQLSTATE and message of a refusal.
fn refusal(error: &tokio_postgres::Error) -> (String, String) {
    let db = error
        .as_db_error()
        .unwrap_or_else(|| panic!("an error from the proxy: {error}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

async fn token_of(stack: &Stack, sub: &str, org: &str) -> String {
    stack
        .issuer
        .mint(&TokenSpec::new(sub).claim("org_id", json!(org)))
}

/// Retries a login until `wait` runs out (a seat comes back once the
/// proxy has seen the client leave).
async fn login_within(stack: &Stack, sub: &str, wait: Duration) -> tokio_postgres::Client {
    let deadline = Instant::now() + wait;
    loop {
        match stack
            .connect("authenticated", &stack.issuer.token(sub))
            .await
        {
            Ok(client) => return client,
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("{sub} never logged in again: {error}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_users_third_connection_is_refused_with_53300_while_another_user_connects() {
    let stack = start("").await;
    configure(&stack, "max_connections_per_user = 2", "").await;
    let first = stack.login("user_1").await;
    let _second = stack.login("user_1").await;
    let error = stack
        .connect("authenticated", &stack.issuer.token("user_1"))
        .await
        .expect_err("the third is refused");
    let (code, message) = refusal(&error);
    assert_eq!(code, "53300");
    assert_eq!(
        message,
        "user \"user_1\" already has 2 connections (max_connections_per_user = 2)"
    );
    let other = stack.login("user_2").await;
    assert_eq!(common::user_id(&other).await.as_deref(), Some("user_2"));
    drop(first);
    let again = login_within(&stack, "user_1", Duration::from_secs(5)).await;
    assert_eq!(common::user_id(&again).await.as_deref(), Some("user_1"));
    let metrics = stack.metrics().await;
    let refused = metrics
        .iter()
        .find(|(name, _)| {
            name.starts_with("authgres_identity_limit_refusals_total")
                && name.contains("user_connection_limit")
                && name.contains("tcp")
        })
        .map(|(_, value)| *value);
    // The first refusal, and any while the seat was coming back.
    assert!(refused.is_some_and(|n| n >= 1.0), "{metrics:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn in_transaction_pooling_the_transaction_past_the_limit_is_refused_and_the_session_goes_on()
{
    let stack = start(TRANSACTION_POOLING).await;
    configure(&stack, "max_transactions_per_user = 2", "").await;
    // Logged in first: a login's own checkout counts as a transaction.
    let held = [stack.login("user_1").await, stack.login("user_1").await];
    let third = stack.login("user_1").await;
    for client in &held {
        client
            .batch_execute("begin; select 1")
            .await
            .expect("held open");
    }
    let error = third
        .simple_query("select 1")
        .await
        .expect_err("a third transaction");
    let (code, message) = refusal(&error);
    assert_eq!(code, "53400");
    assert_eq!(
        message,
        "user \"user_1\" already has 2 transactions running (max_transactions_per_user = 2)"
    );
    // The extended protocol too: the batch is read to its Sync.
    let error = third
        .query("select $1::int", &[&1i32])
        .await
        .expect_err("refused again");
    assert_eq!(refusal(&error).0, "53400");
    let other = stack.login("user_2").await;
    other.simple_query("select 1").await.expect("another user");
    held[0].batch_execute("commit").await.expect("commit");
    let row = third
        .query_one("select $1::int", &[&7i32])
        .await
        .expect("the same session goes on");
    assert_eq!(row.get::<_, i32>(0), 7);
    assert_eq!(common::user_id(&third).await.as_deref(), Some("user_1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_pipelining_without_pause_past_its_limit_is_still_killed() {
    let stack = start(TRANSACTION_POOLING).await;
    configure(&stack, "max_transactions_per_user = 1", "").await;
    let held = stack.login("user_1").await;
    let flooder = std::sync::Arc::new(stack.login("user_1").await);
    held.batch_execute("begin; select 1")
        .await
        .expect("held open");
    let ops = stack.console_ops().await;
    // The flooder is user_1's later client.
    let flooder_id = *common::console_client_ids(&ops, "user_1")
        .await
        .last()
        .expect("the flooder's id");
    // Requests always in flight: every one refused with 53400, and many
    // more already sent when the proxy finishes one.
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..256 {
        let flooder = std::sync::Arc::clone(&flooder);
        flood.spawn(async move {
            loop {
                match flooder.simple_query("select 1").await {
                    Err(error) if error.code().is_some_and(|c| c.code() == "53400") => {}
                    Err(_) => return true,
                    Ok(_) => return false,
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    ops.simple_query(&format!("KILL_CLIENT {flooder_id}"))
        .await
        .expect("KILL_CLIENT");
    let ended = tokio::time::timeout(Duration::from_secs(10), flood.join_next())
        .await
        .expect("the killed client's connection closed while it kept sending")
        .expect("a task")
        .expect("the task ran");
    assert!(ended, "a request ran past the limit");
    held.batch_execute("commit")
        .await
        .expect("the other goes on");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_users_of_one_tenant_share_its_limits_and_another_tenant_is_unaffected() {
    let stack = start(TRANSACTION_POOLING).await;
    configure(
        &stack,
        "",
        "tenant_claim = \"$.org_id\"\nmax_connections_per_tenant = 3\n\
         max_transactions_per_tenant = 1",
    )
    .await;
    let alice = token_of(&stack, "alice", "org_1").await;
    let bob = token_of(&stack, "bob", "org_1").await;
    let carol = token_of(&stack, "carol", "org_2").await;
    let alice = stack.connect("authenticated", &alice).await.expect("alice");
    let bob_token = bob.clone();
    let bob = stack.connect("authenticated", &bob).await.expect("bob");
    let _bob2 = stack
        .connect("authenticated", &bob_token)
        .await
        .expect("bob 2");
    let error = stack
        .connect("authenticated", &token_of(&stack, "dave", "org_1").await)
        .await
        .expect_err("org_1 has 3 connections");
    let (code, message) = refusal(&error);
    assert_eq!(code, "53300");
    assert_eq!(
        message,
        "tenant \"org_1\" already has 3 connections (max_connections_per_tenant = 3)"
    );
    let carol = stack.connect("authenticated", &carol).await.expect("carol");
    alice
        .batch_execute("begin; select 1")
        .await
        .expect("alice holds one");
    let error = bob
        .simple_query("select 1")
        .await
        .expect_err("org_1 holds its one");
    let (code, message) = refusal(&error);
    assert_eq!(code, "53400");
    assert!(message.starts_with("tenant \"org_1\""), "{message}");
    carol
        .batch_execute("begin; select 1; commit")
        .await
        .expect("org_2 is not limited by org_1");
    alice.batch_execute("commit").await.expect("commit");
    bob.simple_query("select 1").await.expect("bob's turn now");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_holds_one_transaction_and_sql_over_the_limit_gets_429_with_the_sqlstate() {
    let stack = start("").await;
    configure(&stack, "max_transactions_per_user = 1", "").await;
    // In session pooling a session holds its backend: one transaction,
    // so a second session is refused at login.
    let held = stack.login("user_1").await;
    let error = stack
        .connect("authenticated", &stack.issuer.token("user_1"))
        .await
        .expect_err("a second backend");
    assert_eq!(refusal(&error).0, "53400");
    let response = stack
        .sql_post(&stack.issuer.token("user_1"), r#"{"query": "select 1"}"#)
        .send()
        .await
        .expect("POST /sql");
    assert_eq!(response.status().as_u16(), 429);
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["code"], "53400", "{body}");
    let message = body["message"].as_str().expect("message");
    assert!(
        message.contains("max_transactions_per_user = 1"),
        "{message}"
    );
    let other = stack
        .sql_post(&stack.issuer.token("user_2"), r#"{"query": "select 1"}"#)
        .send()
        .await
        .expect("POST /sql");
    assert_eq!(other.status().as_u16(), 200);
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = stack
            .sql_post(&stack.issuer.token("user_1"), r#"{"query": "select 1"}"#)
            .send()
            .await
            .expect("POST /sql")
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "still {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_raises_and_lowers_a_limit_for_new_work_and_spares_running_work() {
    let stack = start("").await;
    configure(&stack, "max_connections_per_user = 1", "").await;
    let first = stack.login("user_1").await;
    stack
        .connect("authenticated", &stack.issuer.token("user_1"))
        .await
        .expect_err("one is the limit");
    configure(&stack, "max_connections_per_user = 3", "").await;
    let second = stack.login("user_1").await;
    let third = stack.login("user_1").await;
    configure(&stack, "max_connections_per_user = 1", "").await;
    let error = stack
        .connect("authenticated", &stack.issuer.token("user_1"))
        .await
        .expect_err("lowered");
    assert!(refusal(&error).1.contains("already has 3"), "{error}");
    for client in [&first, &second, &third] {
        client
            .simple_query("select 1")
            .await
            .expect("running work goes on");
    }
    configure(&stack, "", "").await;
    let _fourth = stack.login("user_1").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_limit_at_50_the_51st_concurrent_transaction_is_refused() {
    let stack = start(TRANSACTION_POOLING).await;
    configure(&stack, "max_transactions_per_user = 50", "").await;
    let mut clients = Vec::new();
    for _ in 0..51 {
        clients.push(stack.login("user_1").await);
    }
    let last = clients.pop().expect("51");
    let begun = clients
        .iter()
        .map(|client| client.batch_execute("begin; select 1"));
    for begun in futures_util::future::join_all(begun).await {
        begun.expect("each of 50 holds a transaction");
    }
    let error = last.simple_query("select 1").await.expect_err("the 51st");
    assert_eq!(refusal(&error).0, "53400");
    clients[0].batch_execute("commit").await.expect("commit");
    last.simple_query("select 1")
        .await
        .expect("a place came back");
}

/// The wire pool's clients waiting for a connection, from `/pools`.
async fn waiting(stack: &Stack) -> u64 {
    let (_, pools) = stack.admin_get("/pools").await;
    let pools: serde_json::Value = serde_json::from_str(&pools).expect("json");
    pools["pools"][0]["slots"].as_array().map_or(0, |slots| {
        slots.iter().filter_map(|s| s["waiting"].as_u64()).sum()
    })
}

async fn wait_for_waiting(stack: &Stack, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while waiting(stack).await != expected {
        assert!(Instant::now() < deadline, "never {expected} waiting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Not timed: the order in which queued transactions got a connection,
/// read from the server's clock as each ran.
#[tokio::test(flavor = "multi_thread")]
async fn a_light_user_is_served_before_most_of_a_heavy_users_queue() {
    let stack = start(
        "pool_mode_by_database = { app = \"transaction\" }\npool_size = 2\n\
         checkout_timeout = \"30s\"",
    )
    .await;
    let holders = [stack.login("heavy").await, stack.login("heavy").await];
    let mut queued = Vec::new();
    for _ in 0..8 {
        queued.push(stack.login("heavy").await);
    }
    let light = stack.login("light").await;
    for holder in &holders {
        holder.batch_execute("begin; select 1").await.expect("held");
    }
    const NOW: &str = "select (extract(epoch from clock_timestamp()) * 1000000)::int8";
    let mut runs = Vec::new();
    for client in queued {
        runs.push(tokio::spawn(async move {
            let row = client.query_one(NOW, &[]).await.expect("heavy runs");
            ("heavy", row.get::<_, i64>(0))
        }));
    }
    wait_for_waiting(&stack, 8).await;
    runs.push(tokio::spawn(async move {
        let row = light.query_one(NOW, &[]).await.expect("light runs");
        ("light", row.get::<_, i64>(0))
    }));
    wait_for_waiting(&stack, 9).await;
    for holder in &holders {
        holder.batch_execute("commit").await.expect("commit");
    }
    let mut ran = Vec::new();
    for run in runs {
        ran.push(run.await.expect("task"));
    }
    ran.sort_by_key(|(_, at)| *at);
    let rank = ran
        .iter()
        .position(|(who, _)| *who == "light")
        .expect("light ran");
    assert!(
        rank <= 2,
        "the light user ran after {rank} of the heavy user's 8: {ran:?}"
    );
}
