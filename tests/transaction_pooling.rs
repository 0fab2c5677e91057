//! Transaction pooling on the wire path: clients hold an upstream
//! connection only for a transaction, more clients than connections share
//! them, and each transaction runs as its own client with its own settings
//! and prepared statements, whichever connection it lands on.

#![allow(
    clippy::expect_used,
    clippy::cast_possible_truncation,
    reason = "test code: a panic is a failing test"
)]

mod common;

use std::time::Duration;

use common::{Stack, backend_pid};

/// Transaction pooling for the test database, with `pool_size` connections.
async fn start(extra: &'static str) -> Stack {
    Stack::start_with(common::Options {
        upstream_extra: extra,
        ..Default::default()
    })
    .await
}

const POOL_OF_ONE: &str = "pool_mode_by_database = { app = \"transaction\" }\npool_size = 1";
const POOL_OF_TWO: &str = "pool_mode_by_database = { app = \"transaction\" }\npool_size = 2";

async fn setting(client: &tokio_postgres::Client, name: &str) -> String {
    client
        .query_one("select current_setting($1)", &[&name])
        .await
        .expect("setting")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn many_clients_share_two_connections_and_each_transaction_is_its_own_client() {
    let stack = start(POOL_OF_TWO).await;
    let mut tasks = Vec::new();
    for n in 0..8 {
        let client = stack.login(&format!("user_{n}")).await;
        tasks.push(tokio::spawn(async move {
            let me = format!("user_{n}");
            let mut pids = std::collections::HashSet::new();
            for round in 0..25 {
                let row = client
                    .query_one("select auth.user_id(), pg_backend_pid()", &[])
                    .await
                    .expect("autocommit query");
                assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some(&*me));
                pids.insert(row.get::<_, i32>(1));
                client
                    .batch_execute(&format!(
                        "begin; insert into todos (task) values ('{me} {round}'); commit"
                    ))
                    .await
                    .expect("transaction");
            }
            let own: i64 = client
                .query_one("select count(*) from todos", &[])
                .await
                .expect("count")
                .get(0);
            (own, pids)
        }));
    }
    let mut all_pids = std::collections::HashSet::new();
    let mut moved = 0;
    for task in tasks {
        let (own, pids) = task.await.expect("client");
        assert_eq!(own, 25, "RLS showed a client rows that are not its own");
        moved += usize::from(pids.len() > 1);
        all_pids.extend(pids);
    }
    assert!(
        all_pids.len() <= 2,
        "more backends than the pool holds: {all_pids:?}"
    );
    assert!(moved > 0, "no client ever moved to another connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn settings_follow_their_client_and_never_reach_another() {
    let stack = start(POOL_OF_ONE).await;
    let alice = stack.login("user_alice").await;
    let bob = stack.login("user_bob").await;
    alice
        .batch_execute("set application_name = 'alice-app'; set statement_timeout = '7s'")
        .await
        .expect("alice sets");
    // Custom settings, by SET and by set_config.
    alice
        .batch_execute(
            "set app.tenant = 'alice-tenant'; \
             select set_config('app.region', 'eu', false)",
        )
        .await
        .expect("alice sets custom settings");
    // Custom settings named in quotes and with Unicode escapes.
    alice
        .batch_execute(r#"set "App"."Quoted" = 'q'; set U&"app\002Eescaped" = 'e'"#)
        .await
        .expect("alice sets quoted custom settings");
    // Alice's SET inside a committed transaction lasts too, SET LOCAL not.
    alice
        .batch_execute("begin; set work_mem = '3MB'; set local lock_timeout = '9s'; commit")
        .await
        .expect("alice sets in a transaction");
    // One connection: Bob's transaction takes it from Alice.
    assert_eq!(setting(&bob, "statement_timeout").await, "0");
    assert_ne!(setting(&bob, "application_name").await, "alice-app");
    assert_ne!(setting(&bob, "work_mem").await, "3MB");
    for custom in ["app.tenant", "app.region", "app.quoted", "app.escaped"] {
        let seen: Option<String> = bob
            .query_one("select nullif(current_setting($1, true), '')", &[&custom])
            .await
            .expect("custom setting")
            .get(0);
        assert_eq!(seen, None, "Bob sees Alice's {custom}");
    }
    assert_eq!(
        common::user_id(&bob).await.as_deref(),
        Some("user_bob"),
        "Bob ran as someone else"
    );
    bob.batch_execute("set statement_timeout = '11s'")
        .await
        .expect("bob sets");
    // And back: Alice's settings are hers again, Bob's are not.
    assert_eq!(setting(&alice, "statement_timeout").await, "7s");
    assert_eq!(setting(&alice, "application_name").await, "alice-app");
    assert_eq!(setting(&alice, "work_mem").await, "3MB");
    assert_eq!(setting(&alice, "lock_timeout").await, "0");
    assert_eq!(setting(&alice, "app.tenant").await, "alice-tenant");
    assert_eq!(setting(&alice, "app.region").await, "eu");
    assert_eq!(setting(&alice, "app.quoted").await, "q");
    assert_eq!(setting(&alice, "app.escaped").await, "e");
    assert_eq!(common::user_id(&alice).await.as_deref(), Some("user_alice"));
    assert_eq!(setting(&bob, "statement_timeout").await, "11s");
    alice
        .batch_execute("reset statement_timeout")
        .await
        .expect("reset");
    bob.simple_query("select 1").await.expect("bob again");
    assert_eq!(setting(&alice, "statement_timeout").await, "0");
}

#[tokio::test(flavor = "multi_thread")]
async fn named_prepared_statements_work_on_whichever_connection_a_transaction_lands() {
    let stack = start(POOL_OF_ONE).await;
    let alice = stack.login("user_alice").await;
    let bob = stack.login("user_bob").await;
    // tokio-postgres prepares named statements ("s0", ...) on the server.
    let mine = alice
        .prepare("select auth.user_id(), $1::int + 1")
        .await
        .expect("prepare");
    let first = alice.query_one(&mine, &[&1i32]).await.expect("execute");
    assert_eq!(first.get::<_, i32>(1), 2);
    // Rows hold their statement: the last one lets it close.
    drop(first);
    for round in 0..3i32 {
        // Bob takes the only connection (and prepares his own "s0").
        let bobs = bob
            .prepare("select auth.user_id(), 'bob'")
            .await
            .expect("bob prepares");
        let row = bob.query_one(&bobs, &[]).await.expect("bob executes");
        assert_eq!(row.get::<_, Option<String>>(0).as_deref(), Some("user_bob"));
        // Alice's statement is hers again, with her identity.
        let row = alice.query_one(&mine, &[&round]).await.expect("execute");
        assert_eq!(
            row.get::<_, Option<String>>(0).as_deref(),
            Some("user_alice")
        );
        assert_eq!(row.get::<_, i32>(1), round + 1);
    }
    // A closed statement is not prepared again.
    drop(mine);
    bob.simple_query("select 1").await.expect("bob");
    let names: Vec<String> = alice
        .query_one(
            "select array_agg(statement order by name) from pg_prepared_statements",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(
        names.len(),
        1,
        "only the statement of this very query: {names:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_open_transaction_holds_its_connection_until_it_ends() {
    let stack = start(POOL_OF_ONE).await;
    let alice = stack.login("user_alice").await;
    let bob = stack.login("user_bob").await;
    alice
        .batch_execute("begin; insert into todos (task) values ('held')")
        .await
        .expect("begin");
    let pid = backend_pid(&alice).await;
    let waiting = tokio::spawn(async move {
        let pid = backend_pid(&bob).await;
        (pid, common::user_id(&bob).await)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "Bob ran inside Alice's transaction");
    alice.batch_execute("commit").await.expect("commit");
    let (bob_pid, bob_id) = waiting.await.expect("bob");
    assert_eq!(bob_pid, pid);
    assert_eq!(bob_id.as_deref(), Some("user_bob"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_waits_at_most_the_checkout_timeout_and_is_told_why() {
    let stack = start(
        "pool_mode_by_database = { app = \"transaction\" }\npool_size = 1\ncheckout_timeout = \"300ms\"",
    )
    .await;
    let alice = stack.login("user_alice").await;
    let bob = stack.login("user_bob").await;
    alice.batch_execute("begin").await.expect("begin");
    backend_pid(&alice).await;
    let error = bob
        .simple_query("select 1")
        .await
        .expect_err("no connection");
    let db = error.as_db_error().expect("an error from the proxy");
    assert_eq!(db.code().code(), "53300");
    assert!(db.message().contains("no database connection became free"));
    assert!(db.hint().is_some_and(|h| h.contains("pool_size")));
    alice.batch_execute("commit").await.expect("alice goes on");
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_keeps_its_connection_and_notifications_arrive() {
    let stack = start(POOL_OF_TWO).await;
    let token = stack.issuer.token("user_alice");
    let (alice, mut received) = common::listening_client(&stack, &token).await;
    alice.batch_execute("listen news").await.expect("listen");
    let pid = backend_pid(&alice).await;
    let bob = stack.login("user_bob").await;
    for n in 0..3 {
        bob.batch_execute(&format!("notify news, 'n{n}'"))
            .await
            .expect("notify");
        assert_ne!(backend_pid(&bob).await, pid, "Bob got Alice's connection");
    }
    for n in 0..3 {
        let note = tokio::time::timeout(Duration::from_secs(5), received.recv())
            .await
            .expect("notification in time")
            .expect("notification");
        assert_eq!(note, format!("n{n}"));
    }
    assert_eq!(backend_pid(&alice).await, pid, "Alice moved");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_reaches_the_transaction_running_now() {
    let stack = start(POOL_OF_TWO).await;
    let alice = stack.login("user_alice").await;
    let cancel = alice.cancel_token();
    let sleeping = tokio::spawn(async move { alice.simple_query("select pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    cancel
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel sent");
    let error = tokio::time::timeout(Duration::from_secs(10), sleeping)
        .await
        .expect("cancelled in time")
        .expect("join")
        .expect_err("cancelled");
    assert_eq!(
        error.as_db_error().map(|e| e.code().code()),
        Some("57014"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pgbench_prepared_with_more_clients_than_connections() {
    let stack = start(POOL_OF_TWO).await;
    let token = stack.issuer.token("user_bench");
    common::pgbench_rls(&stack, &token, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_set_by_one_client_keeps_it_on_its_connection_and_away_from_others() {
    let stack = start(POOL_OF_TWO).await;
    common::grant_role_to_authenticated(&stack, "app_admin").await;
    let alice = stack.login("user_alice").await;
    let bob = stack.login("user_bob").await;
    let carol = stack.login("user_carol").await;
    alice
        .batch_execute("set role app_admin")
        .await
        .expect("set role");
    let pid = backend_pid(&alice).await;
    let current = async |client: &tokio_postgres::Client| -> String {
        client
            .query_one("select current_user::text", &[])
            .await
            .expect("current_user")
            .get(0)
    };
    // Bob and Carol share the other connection; Alice's is never theirs.
    for _ in 0..3 {
        for other in [&bob, &carol] {
            assert_eq!(current(other).await, "authenticated", "got Alice's role");
            assert_ne!(backend_pid(other).await, pid, "got Alice's connection");
        }
        assert_eq!(current(&alice).await, "app_admin");
        assert_eq!(backend_pid(&alice).await, pid, "Alice moved");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_departed_clients_connection_serves_the_next_client_after_a_reset() {
    let stack = start("pool_mode_by_database = { app = \"transaction\" }\npool_size = 5").await;
    let alice = stack.login("user_alice").await;
    alice
        .batch_execute("set application_name = 'alice-app'")
        .await
        .expect("alice sets");
    let pid = backend_pid(&alice).await;
    drop(alice);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The pool could grow, but Alice will not be back for her connection.
    let bob = stack.login("user_bob").await;
    assert_eq!(backend_pid(&bob).await, pid, "a new connection was opened");
    assert_eq!(common::user_id(&bob).await.as_deref(), Some("user_bob"));
    assert_ne!(setting(&bob, "application_name").await, "alice-app");
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_settings_follow_their_client() {
    let stack = start(POOL_OF_ONE).await;
    let token = stack.issuer.token("user_alice");
    let (alice, connection) = tokio_postgres::connect(
        &stack.conninfo(
            "authenticated",
            &token,
            "sslmode=disable application_name=alice-app options='-c statement_timeout=1234ms'",
        ),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    tokio::spawn(connection);
    let bob = stack.login("user_bob").await;
    for _ in 0..2 {
        assert_eq!(setting(&alice, "statement_timeout").await, "1234ms");
        assert_eq!(setting(&alice, "application_name").await, "alice-app");
        assert_eq!(setting(&bob, "statement_timeout").await, "0");
        assert_ne!(setting(&bob, "application_name").await, "alice-app");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_notification_sent_right_after_listen_returns_is_not_lost() {
    let stack = start(POOL_OF_TWO).await;
    let bob = stack.login("user_bob").await;
    // The proxy reads the session's state right after LISTEN returns; a
    // notification arriving meanwhile must still reach the listener.
    for round in 0..30 {
        let token = stack.issuer.token("user_alice");
        let (alice, mut received) = common::listening_client(&stack, &token).await;
        alice
            .batch_execute(&format!("listen race_{round}"))
            .await
            .expect("listen");
        bob.batch_execute(&format!("notify race_{round}, 'n{round}'"))
            .await
            .expect("notify");
        let note = tokio::time::timeout(Duration::from_secs(5), received.recv())
            .await
            .unwrap_or_else(|_| panic!("notification {round} lost"))
            .expect("notification");
        assert_eq!(note, format!("n{round}"));
    }
}

/// The first value of a query's first row, over the simple protocol:
/// tokio-postgres prepares a named statement for each extended query, and
/// a client holding named statements never shares its session.
async fn simple_value(client: &tokio_postgres::Client, sql: &str) -> Option<String> {
    let rows = client.simple_query(sql).await.expect("simple query");
    rows.iter().find_map(|message| match message {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
        _ => None,
    })
}

/// Session-level advisory locks the client's backend holds: the reset
/// releases them, so they show whether a connection was reset.
async fn advisory_locks(client: &tokio_postgres::Client) -> String {
    let sql =
        "select count(*) from pg_locks where locktype = 'advisory' and pid = pg_backend_pid()";
    simple_value(client, sql).await.unwrap_or_default()
}

/// Who `auth.user_id()` says the client is, over the simple protocol.
async fn simple_user(client: &tokio_postgres::Client) -> Option<String> {
    simple_value(client, "select auth.user_id()").await
}

/// A pool of one connection and two clients logged in with one token.
async fn one_token_twice() -> (Stack, tokio_postgres::Client, tokio_postgres::Client) {
    let stack = start(POOL_OF_ONE).await;
    let token = stack.issuer.token("user_alice");
    let first = stack.connect("authenticated", &token).await.expect("first");
    let second = (stack.connect("authenticated", &token).await).expect("second");
    (stack, first, second)
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_presenting_the_same_token_share_a_session_and_no_one_else_does() {
    let (stack, first, second) = one_token_twice().await;
    let lock = "select pg_advisory_lock(7)";
    first.batch_execute(lock).await.expect("lock");
    // Same verified claims, same settings: the one connection passes from
    // the first client to the second as it is, without a reset.
    assert_eq!(advisory_locks(&second).await, "1", "the session was reset");
    assert_eq!(simple_user(&second).await.as_deref(), Some("user_alice"));
    // Another identity gets it only after a reset.
    let bob = stack.login("user_bob").await;
    assert_eq!(advisory_locks(&bob).await, "0", "Bob met Alice's session");
    assert_eq!(simple_user(&bob).await.as_deref(), Some("user_bob"));
    // So does another token of the same user (other claims).
    first.batch_execute(lock).await.expect("lock");
    let spec = authgres_sandbox::TokenSpec::new("user_alice")
        .claim("sid", serde_json::json!("sess_other"));
    let other = stack
        .connect("authenticated", &stack.issuer.mint(&spec))
        .await
        .expect("other token");
    assert_eq!(
        advisory_locks(&other).await,
        "0",
        "another token met the session"
    );
    // And a client whose settings differ: the first's application_name
    // stays its own.
    first
        .batch_execute("set application_name = 'first-app'; select pg_advisory_lock(7)")
        .await
        .expect("set");
    assert_eq!(
        advisory_locks(&second).await,
        "0",
        "other settings met the session"
    );
    let name = "select current_setting('application_name')";
    assert_ne!(
        simple_value(&second, name).await.as_deref(),
        Some("first-app")
    );
    assert_eq!(
        simple_value(&first, name).await.as_deref(),
        Some("first-app")
    );
    // The anonymous role never shares: anyone can be anonymous.
    let anonymous = stack.connect("anonymous", "").await.expect("anonymous");
    anonymous.batch_execute(lock).await.expect("lock");
    let stranger = stack.connect("anonymous", "").await.expect("stranger");
    assert_eq!(
        advisory_locks(&stranger).await,
        "0",
        "anonymous clients shared"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_holding_prepared_statements_is_not_shared_even_with_the_same_token() {
    let (_stack, first, second) = one_token_twice().await;
    let statement = first.prepare("select 1").await.expect("prepare");
    first.query(&statement, &[]).await.expect("query");
    let prepared = simple_value(&second, "select count(*) from pg_prepared_statements").await;
    assert_eq!(
        prepared.as_deref(),
        Some("0"),
        "the second client met the first's statement"
    );
    // The first client's statement follows it back.
    first.query(&statement, &[]).await.expect("query again");
}

// Connections kept between transactions (`keep_between_transactions`).

/// Transaction pooling with `size` connections, kept for `keep`.
async fn start_keeping(size: usize, keep: &str) -> Stack {
    let extra = format!(
        "pool_mode_by_database = {{ app = \"transaction\" }}\npool_size = {size}\n\
         keep_between_transactions = \"{keep}\""
    );
    Stack::start_with(common::Options {
        upstream_extra: Box::leak(extra.into_boxed_str()),
        ..Default::default()
    })
    .await
}

/// The wire pool's (in use, idle) connections of the test database, as
/// `/pools` shows them.
async fn in_use_and_idle(stack: &Stack) -> (u64, u64) {
    let (_, pools) = stack.admin_get("/pools").await;
    let pools: serde_json::Value = serde_json::from_str(&pools).expect("json");
    let slots = pools["pools"][0]["slots"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let slot = slots
        .iter()
        .find(|slot| slot["database"] == common::DATABASE)
        .unwrap_or_else(|| panic!("no slot of the test database: {pools}"));
    let count = |name: &str| slot[name].as_u64().expect("a count");
    (count("in_use"), count("idle"))
}

/// Polls `/pools` until it shows (`in_use`, `idle`), for at most 5 s.
async fn wait_for_pool(stack: &Stack, want: (u64, u64)) {
    let mut seen = (0, 0);
    for _ in 0..100 {
        seen = in_use_and_idle(stack).await;
        if seen == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the pool shows (in use, idle) = {seen:?}, not {want:?}");
}

/// Waits for the last transaction's client to settle its session, then
/// requires its connection kept (in use, none idle).
async fn settled_and_kept(stack: &Stack) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(in_use_and_idle(stack).await, (1, 0), "not kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_keeps_its_connection_between_transactions_until_it_is_quiet() {
    let stack = start_keeping(2, "2s").await;
    let alice = stack.login("user_alice").await;
    let first = backend_pid(&alice).await;
    for _ in 0..3 {
        assert_eq!(backend_pid(&alice).await, first, "moved while kept");
    }
    // Idle, she still has it: nobody waits.
    assert_eq!(in_use_and_idle(&stack).await, (1, 0));
    // Quiet for longer than the keep: it goes back to the pool.
    wait_for_pool(&stack, (0, 1)).await;
    assert_eq!(common::user_id(&alice).await.as_deref(), Some("user_alice"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_connection_goes_to_the_client_that_waits_for_it() {
    // One connection, kept for longer than any checkout waits: only the
    // call back can hand it over.
    let stack = start_keeping(1, "60s").await;
    let alice = stack.login("user_alice").await;
    let bob = stack.login("user_bob").await;
    alice
        .batch_execute("set application_name = 'alice-app'")
        .await
        .expect("alice sets");
    for _ in 0..2 {
        // Alice keeps it, idle: Bob's checkout has to call it back.
        settled_and_kept(&stack).await;
        assert_eq!(common::user_id(&bob).await.as_deref(), Some("user_bob"));
        assert_ne!(setting(&bob, "application_name").await, "alice-app");
        settled_and_kept(&stack).await;
        assert_eq!(common::user_id(&alice).await.as_deref(), Some("user_alice"));
        assert_eq!(setting(&alice, "application_name").await, "alice-app");
    }
    // A client inside a transaction gives the connection up at its end.
    alice.batch_execute("begin").await.expect("begin");
    let waiting = tokio::spawn(async move { common::user_id(&bob).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "bob ran inside alice's transaction");
    alice.batch_execute("commit").await.expect("commit");
    let bob_seen = tokio::time::timeout(Duration::from_secs(3), waiting)
        .await
        .expect("bob got the connection at alice's commit")
        .expect("bob's task");
    assert_eq!(bob_seen.as_deref(), Some("user_bob"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kept_connection_the_server_closes_is_replaced_without_a_word_to_its_client() {
    let stack = start_keeping(2, "60s").await;
    let alice = stack.login("user_alice").await;
    let kept = backend_pid(&alice).await;
    let installer = stack.installer().await;
    installer
        .query_one("select pg_terminate_backend($1)", &[&kept])
        .await
        .expect("terminate alice's kept backend");
    // Its FATAL waits, unread, in the socket.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        common::user_id(&alice).await.as_deref(),
        Some("user_alice"),
        "alice's next transaction failed with her kept connection"
    );
    assert_ne!(backend_pid(&alice).await, kept);
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_and_reconnect_call_kept_connections_back() {
    let stack = start_keeping(2, "60s").await;
    let alice = stack.login("user_alice").await;
    let kept = backend_pid(&alice).await;
    let ops = stack.console_ops().await;
    // PAUSE waits for every connection to come back: a kept one does
    // at once.
    tokio::time::timeout(Duration::from_secs(5), ops.simple_query("PAUSE"))
        .await
        .expect("PAUSE returned while alice kept her connection")
        .expect("PAUSE");
    assert_eq!(in_use_and_idle(&stack).await, (0, 1));
    let paused = tokio::spawn(async move {
        let pid = backend_pid(&alice).await;
        (alice, pid)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!paused.is_finished(), "a transaction ran during PAUSE");
    ops.simple_query("RESUME").await.expect("RESUME");
    let (alice, pid) = paused.await.expect("alice after RESUME");
    assert_eq!(pid, kept, "her own connection, kept again");
    assert_eq!(in_use_and_idle(&stack).await, (1, 0));
    // RECONNECT: the kept connection is closed, her next transaction
    // gets a new one.
    ops.simple_query("RECONNECT").await.expect("RECONNECT");
    wait_for_pool(&stack, (0, 0)).await;
    assert_ne!(backend_pid(&alice).await, kept);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_token_ends_the_session_of_a_client_keeping_its_connection() {
    let stack = Stack::start_with(common::Options {
        enforce_token_expiry: true,
        upstream_extra: "pool_mode_by_database = { app = \"transaction\" }\n\
                         keep_between_transactions = \"60s\"",
        ..Default::default()
    })
    .await;
    let ttl = Duration::from_secs(3);
    let spec = |sub| authgres_sandbox::TokenSpec::new(sub).ttl(ttl);
    // Alice sits idle, keeping her connection, across her token's expiry;
    // Bob keeps running transactions across his.
    let alice = stack
        .connect("authenticated", &stack.issuer.mint(&spec("user_alice")))
        .await
        .expect("alice");
    let bob = stack
        .connect("authenticated", &stack.issuer.mint(&spec("user_bob")))
        .await
        .expect("bob");
    assert_eq!(common::user_id(&alice).await.as_deref(), Some("user_alice"));
    let started = tokio::time::Instant::now();
    let mut refused = None;
    while started.elapsed() < ttl + Duration::from_secs(3) {
        if let Err(error) = bob.batch_execute("select 1").await {
            refused = Some(started.elapsed());
            assert!(
                bob.is_closed()
                    || error.is_closed()
                    || error.code() == Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
                "{error}"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = refused.expect("bob's transactions ran past his token's expiry");
    // `exp` is in whole seconds, counted from before the logins.
    assert!(
        refused + Duration::from_millis(1500) >= ttl,
        "refused early, at {refused:?}"
    );
    let error = alice
        .batch_execute("select 1")
        .await
        .expect_err("alice's transaction ran after her token expired");
    assert!(
        alice.is_closed()
            || error.is_closed()
            || error.code() == Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_keeping_its_connection_can_still_be_pinned_to_it() {
    let stack = start_keeping(2, "60s").await;
    let alice = stack.login("user_alice").await;
    let kept = backend_pid(&alice).await;
    alice.batch_execute("listen alerts").await.expect("listen");
    // Pinned now, for good: her transactions go on on the same backend.
    for _ in 0..3 {
        assert_eq!(backend_pid(&alice).await, kept);
        assert_eq!(common::user_id(&alice).await.as_deref(), Some("user_alice"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_drops_its_identity_settings_gets_them_back_while_it_keeps_its_connection() {
    let stack = start_keeping(2, "60s").await;
    let alice = stack.login("user_alice").await;
    assert_eq!(common::user_id(&alice).await.as_deref(), Some("user_alice"));
    for reset in ["discard all", "reset all"] {
        alice.batch_execute(reset).await.expect(reset);
        assert_eq!(
            common::user_id(&alice).await.as_deref(),
            Some("user_alice"),
            "after {reset}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_client_gets_an_idle_kept_connection_while_another_keeper_is_busy() {
    let stack = start_keeping(2, "60s").await;
    let carol = stack.login("user_carol").await;
    let alice = stack.login("user_alice").await;
    let bob = stack.login("user_bob").await;
    // Both connections kept: Carol's first, then Alice's, idle.
    carol.batch_execute("select 1").await.expect("carol");
    let sleeping = tokio::spawn(async move { carol.batch_execute("select pg_sleep(3)").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    alice.batch_execute("select 1").await.expect("alice");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(in_use_and_idle(&stack).await, (2, 0));
    let started = tokio::time::Instant::now();
    assert_eq!(common::user_id(&bob).await.as_deref(), Some("user_bob"));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "bob waited {:?} for carol's transaction, alice's idle connection kept",
        started.elapsed()
    );
    sleeping
        .await
        .expect("carol's task")
        .expect("carol's sleep");
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_client_closes_a_client_keeping_its_connection_and_no_other() {
    let stack = start_keeping(2, "60s").await;
    let alice = stack.login("user_alice").await;
    let bob = stack.login("user_bob").await;
    alice.batch_execute("select 1").await.expect("alice");
    bob.batch_execute("select 1").await.expect("bob");
    let ops = stack.console_ops().await;
    let alice_id = common::console_client_ids(&ops, "user_alice").await;
    let alice_id = *alice_id.first().expect("alice's id");
    common::kill_client(&ops, alice_id, &alice).await;
    assert_eq!(common::user_id(&bob).await.as_deref(), Some("user_bob"));
    // Alice's kept connection went with her; Bob keeps his.
    wait_for_pool(&stack, (1, 0)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_leaving_inside_a_transaction_block_has_it_rolled_back() {
    let stack = start_keeping(2, "60s").await;
    let installer = stack.installer().await;
    let query = |sql: &str| common::message(b'Q', format!("{sql}\0").as_bytes());
    for terminate in [true, false] {
        let token = stack.issuer.token("user_alice");
        let mut alice = common::RawClient::login(stack.port, "authenticated", Some(&token)).await;
        // Kept first, then a transaction block left open.
        alice.send(&query("select 1")).await;
        alice.read_until(b'Z').await;
        alice
            .send(&query("begin; lock table todos in access exclusive mode"))
            .await;
        alice.read_until(b'Z').await;
        if terminate {
            alice.send(&common::message(b'X', &[])).await;
        }
        // Or gone without a word: the socket closes under it.
        drop(alice);
        let mut free = false;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if installer
                .batch_execute("begin; lock table todos nowait; rollback")
                .await
                .is_ok()
            {
                free = true;
                break;
            }
            let _ = installer.batch_execute("rollback").await;
        }
        assert!(
            free,
            "the transaction left open still holds its lock (terminate: {terminate})"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_during_a_transaction_ends_the_keep_it_would_have_begun() {
    let stack = start_keeping(2, "60s").await;
    let alice = stack.login("user_alice").await;
    alice.batch_execute("begin").await.expect("begin");
    let (status, body) = stack.admin_post("/reload").await;
    assert_eq!(status, 200, "{body}");
    alice.batch_execute("commit").await.expect("commit");
    // Checked out before the reload: back at its end, not kept, so the
    // next transaction is checked out (and counted) under the new config.
    wait_for_pool(&stack, (0, 1)).await;
    alice.batch_execute("select 1").await.expect("after");
    settled_and_kept(&stack).await;
}
