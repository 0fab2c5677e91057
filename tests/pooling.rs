//! Session pooling on the wire path: a client's upstream connection is
//! reset when it leaves and serves the next client of the same role, and
//! nothing of the first client reaches the second.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use common::{Stack, backend_pid};

/// Alice leaves; Bob logs in and gets the backend she had (`pid`).
async fn hand_over(
    stack: &Stack,
    alice: tokio_postgres::Client,
    pid: i32,
) -> tokio_postgres::Client {
    drop(alice);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let bob = stack.login("user_bob").await;
    assert_eq!(
        backend_pid(&bob).await,
        pid,
        "the connection was not reused"
    );
    bob
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_connection_carries_nothing_from_one_client_to_the_next() {
    let stack = Stack::start().await;
    let alice = stack.login("user_alice").await;
    let pid = backend_pid(&alice).await;
    alice
        .batch_execute(
            "set search_path = pg_temp; set application_name = 'alice-was-here';
             select set_config('authgres.claims', current_setting('authgres.claims'), false);
             select pg_advisory_lock(42);
             create temp table alice_temp (x int);
             prepare alice_stmt as select 1;
             listen alice_channel;
             declare alice_cursor cursor with hold for select 1;",
        )
        .await
        .expect("leave state behind");
    let bob = hand_over(&stack, alice, pid).await;
    let row = bob
        .query_one(
            "select auth.user_id(), current_setting('search_path'), current_setting('application_name'), \
             (select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()), \
             to_regclass('pg_temp.alice_temp') is null, \
             (select count(*) from pg_prepared_statements where name = 'alice_stmt'), \
             (select count(*) from pg_listening_channels()), \
             (select count(*) from pg_cursors where name = 'alice_cursor')",
            &[],
        )
        .await
        .expect("look around");
    assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("user_bob"));
    assert_ne!(row.get::<_, String>(1), "pg_temp");
    assert_ne!(row.get::<_, String>(2), "alice-was-here");
    assert_eq!(row.get::<_, i64>(3), 0, "advisory lock");
    assert!(row.get::<_, bool>(4), "temp table");
    assert_eq!(row.get::<_, i64>(5), 0, "prepared statement");
    assert_eq!(row.get::<_, i64>(6), 0, "LISTEN");
    assert_eq!(row.get::<_, i64>(7), 0, "cursor");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_inside_a_transaction_leaves_nothing_committed() {
    let stack = Stack::start().await;
    let alice = stack.login("user_alice").await;
    alice
        .batch_execute("begin; insert into todos (task) values ('uncommitted')")
        .await
        .expect("open transaction");
    drop(alice);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let again = stack.login("user_alice").await;
    let row = again
        .query_one(
            "select count(*), pg_current_xact_id_if_assigned() is null from todos",
            &[],
        )
        .await
        .expect("count");
    assert_eq!(row.get::<_, i64>(0), 0);
    assert!(row.get::<_, bool>(1));
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_settings_apply_to_pooled_connections() {
    let stack = Stack::start().await;
    let token = stack.issuer.token("user_alice");
    for (app, timeout) in [("first", "1234ms"), ("second", "5678ms")] {
        let (client, connection) = tokio_postgres::connect(
            &stack.conninfo(
                "authenticated",
                &token,
                &format!("sslmode=disable application_name={app} options='-c statement_timeout={timeout}'"),
            ),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect");
        tokio::spawn(connection);
        let row = client
            .query_one(
                "select current_setting('application_name'), current_setting('statement_timeout')",
                &[],
            )
            .await
            .expect("settings");
        assert_eq!(row.get::<_, String>(0), app);
        assert_eq!(
            row.get::<_, String>(1),
            timeout.trim_end_matches("ms").to_owned() + "ms"
        );
    }
}

async fn role_backends(stack: &Stack) -> i64 {
    stack
        .cluster
        .admin(common::DATABASE)
        .await
        .expect("admin")
        .query_one(
            "select count(*) from pg_stat_activity where usename = 'authenticated' \
             and application_name <> 'authgres keeper'",
            &[],
        )
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_connection_that_died_while_idle_is_replaced() {
    let stack = Stack::start().await;
    let alice = stack.login("user_alice").await;
    let pid = backend_pid(&alice).await;
    drop(alice);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let admin = stack.cluster.admin(common::DATABASE).await.expect("admin");
    admin
        .execute("select pg_terminate_backend($1)", &[&pid])
        .await
        .expect("terminate the idle backend");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let bob = stack.login("user_bob").await;
    assert_ne!(backend_pid(&bob).await, pid);
    assert_eq!(common::user_id(&bob).await.as_deref(), Some("user_bob"));
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_close_after_the_idle_timeout() {
    let stack = Stack::start_with(common::Options {
        upstream_extra: "idle_timeout = \"1s\"",
        ..Default::default()
    })
    .await;
    let alice = stack.login("user_alice").await;
    drop(alice);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        role_backends(&stack).await,
        1,
        "kept idle in the pool: {}",
        stack.log()
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while role_backends(&stack).await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "idle connection never closed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn session_pooling_can_be_turned_off() {
    let stack = Stack::start_with(common::Options {
        upstream_extra: "pool_mode = \"none\"",
        ..Default::default()
    })
    .await;
    let alice = stack.login("user_alice").await;
    drop(alice);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while role_backends(&stack).await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the backend outlived its client"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_granted_by_the_operator_and_set_by_a_client_does_not_reach_the_next() {
    let stack = Stack::start().await;
    // init-db grants the login roles nothing; an operator might.
    common::grant_role_to_authenticated(&stack, "app_admin").await;
    let alice = stack.login("user_alice").await;
    let pid = backend_pid(&alice).await;
    alice
        .batch_execute("set role app_admin")
        .await
        .expect("set role");
    let bob = hand_over(&stack, alice, pid).await;
    let role: String = bob
        .query_one("select current_user::text", &[])
        .await
        .expect("current_user")
        .get(0);
    assert_eq!(role, "authenticated");
}

/// Sends `signal` to a backend: a stopped backend (SIGSTOP) holds its
/// connection open and answers nothing, as a stalled server does.
fn signal_backend(pid: i32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal)
        .unwrap_or_else(|error| panic!("{signal} to backend {pid}: {error}"));
}

/// A checkout that finds a stalled connection due for a health check
/// spends its internal query timeout on it, closes it, and checks the next
/// one with an allowance of its own: the healthy connection is handed out,
/// not dropped for a deadline the first check used up.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_idle_connection_fails_its_health_check_and_the_next_is_checked_afresh() {
    let stack = Stack::start_with(common::Options {
        upstream_extra: "health_check_after = \"0s\"\ninternal_query_timeout = \"1s\"",
        ..Default::default()
    })
    .await;
    let alice = stack.login("user_alice").await;
    let bob = stack.login("user_bob").await;
    let (alice_pid, bob_pid) = (backend_pid(&alice).await, backend_pid(&bob).await);
    drop(alice);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    // Bob's connection goes back last, so it is the next one taken.
    drop(bob);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    signal_backend(bob_pid, nix::sys::signal::Signal::SIGSTOP);
    let carol = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stack.login("user_carol"),
    )
    .await;
    signal_backend(bob_pid, nix::sys::signal::Signal::SIGCONT);
    let carol = carol.expect("carol's login waited past one health check's timeout");
    assert_eq!(
        backend_pid(&carol).await,
        alice_pid,
        "the healthy idle connection was not handed out: {}",
        stack.log()
    );
    assert_eq!(common::user_id(&carol).await.as_deref(), Some("user_carol"));
}
