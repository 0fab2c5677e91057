//! The operators' console through the real binary: psql and drivers log
//! in to the console's database with a console user's password and run
//! pgbouncer's commands; PAUSE/RESUME under pgbench load fail no
//! transaction, KILL_CLIENT closes exactly the client named, RECONNECT
//! replaces the backends, DISABLE refuses new logins.

#![allow(clippy::expect_used, reason = "test code: a panic is a failing test")]
#![allow(missing_docs)]

mod common;

use std::time::Duration;

use common::{
    CONSOLE_DATABASE, CONSOLE_GRAFANA_PASSWORD, CONSOLE_OPS_PASSWORD, DATABASE, Options, Stack,
    psql_path,
};
use tokio_postgres::SimpleQueryMessage;

/// A console session as `user`.
async fn console(
    stack: &Stack,
    user: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname={CONSOLE_DATABASE} user={user} password={password} \
         sslmode=disable",
        stack.port
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

async fn ops(stack: &Stack) -> tokio_postgres::Client {
    console(stack, "ops", CONSOLE_OPS_PASSWORD)
        .await
        .expect("ops logs in to the console")
}

/// A result row: column name → value.
type Row = std::collections::HashMap<String, Option<String>>;

/// The rows of `command`.
async fn show(client: &tokio_postgres::Client, command: &str) -> Vec<Row> {
    client
        .simple_query(command)
        .await
        .unwrap_or_else(|e| panic!("{command}: {e}"))
        .into_iter()
        .filter_map(|message| match message {
            SimpleQueryMessage::Row(row) => Some(
                row.columns()
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (c.name().to_owned(), row.get(i).map(str::to_owned)))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

/// One short transaction that reads the identity: pgbench's script.
const LOAD: &str = "begin;\nselect pg_sleep(0.002);\nselect auth.user_id();\ncommit;\n";

/// The `SHOW POOLS` row of the wire pool for (app, authenticated).
fn wire_pool_of_app(pools: &[Row]) -> &Row {
    pools
        .iter()
        .find(|p| {
            p["database"].as_deref() == Some(DATABASE) && p["pool"].as_deref() == Some("wire")
        })
        .expect("the wire pool of app in SHOW POOLS")
}

fn code(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map(|e| e.code().code().to_owned())
        .unwrap_or_else(|| format!("no SQLSTATE: {error}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn show_commands_list_clients_servers_and_pools_with_pgbouncers_columns() {
    let stack = Stack::start().await;
    let alice = stack.login("user_alice").await;
    let backend: i32 = alice
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let ops = ops(&stack).await;

    let clients = show(&ops, "SHOW CLIENTS").await;
    let alice_row = clients
        .iter()
        .find(|c| c["sub"].as_deref() == Some("user_alice"))
        .expect("alice in SHOW CLIENTS");
    assert_eq!(alice_row["user"].as_deref(), Some("authenticated"));
    assert_eq!(alice_row["database"].as_deref(), Some(DATABASE));
    assert_eq!(
        alice_row["link"].as_deref(),
        Some(backend.to_string().as_str())
    );
    assert!(
        clients
            .iter()
            .any(|c| c["database"].as_deref() == Some(CONSOLE_DATABASE))
    );

    let servers = show(&ops, "SHOW SERVERS").await;
    let server = servers
        .iter()
        .find(|s| s["remote_pid"].as_deref() == Some(backend.to_string().as_str()))
        .expect("alice's backend in SHOW SERVERS");
    assert_eq!(server["state"].as_deref(), Some("active"));
    assert_eq!(server["link"], alice_row["id"], "linked to alice's client");

    let pools = show(&ops, "SHOW POOLS").await;
    let pool = wire_pool_of_app(&pools);
    assert_eq!(pool["user"].as_deref(), Some("authenticated"));
    assert_eq!(pool["cl_active"].as_deref(), Some("1"));
    assert_eq!(pool["sv_active"].as_deref(), Some("1"));

    alice
        .simple_query("select 1; select 2")
        .await
        .expect("queries");
    let stats = show(&ops, "SHOW STATS").await;
    let row = stats
        .iter()
        .find(|s| {
            s["database"].as_deref() == Some(DATABASE)
                && s["user"].as_deref() == Some("authenticated")
        })
        .expect("app/authenticated in SHOW STATS");
    let count = |column: &str| -> u64 {
        row[column]
            .as_deref()
            .and_then(|n| n.parse().ok())
            .expect(column)
    };
    assert!(count("total_query_count") >= 2, "{row:?}");
    assert!(
        count("total_received") > 0 && count("total_sent") > 0,
        "{row:?}"
    );

    let version = show(&ops, "SHOW VERSION").await;
    assert!(
        version[0]["version"]
            .as_deref()
            .is_some_and(|v| v.starts_with("authgres "))
    );
    let config = show(&ops, "SHOW CONFIG").await;
    let address = config
        .iter()
        .find(|c| c["key"].as_deref() == Some("listen.address"))
        .expect("listen.address in SHOW CONFIG");
    assert_eq!(address["changeable"].as_deref(), Some("no"));
    assert!(
        config
            .iter()
            .all(|c| c["value"].as_deref() != Some(CONSOLE_OPS_PASSWORD)),
        "no secret in SHOW CONFIG"
    );
    let databases = show(&ops, "SHOW DATABASES").await;
    assert_eq!(databases[0]["name"].as_deref(), Some(DATABASE));
    assert!(
        show(&ops, "SHOW USERS")
            .await
            .iter()
            .any(|u| u["name"].as_deref() == Some("anonymous"))
    );
    assert!(!show(&ops, "SHOW LISTS").await.is_empty());
    assert!(!show(&ops, "SHOW HELP").await.is_empty());

    let mem = ops
        .simple_query("SHOW MEM")
        .await
        .expect_err("no allocator caches");
    assert_eq!(code(&mem), "0A000");
    let unknown = ops
        .simple_query("select 1")
        .await
        .expect_err("not a command");
    assert_eq!(code(&unknown), "42601");
    // The session goes on after an error.
    assert_eq!(show(&ops, "show version").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn psql_runs_the_console_as_pgbouncer_operators_do() {
    let stack = Stack::start().await;
    let output = std::process::Command::new(psql_path())
        .args(["-X", "-A", "-t", "-F", "|"])
        .args(["-h", "127.0.0.1", "-p", &stack.port.to_string()])
        .args(["-U", "ops", CONSOLE_DATABASE])
        .args(["-c", "SHOW VERSION", "-c", "SHOW DATABASES"])
        .env("PGPASSWORD", CONSOLE_OPS_PASSWORD)
        .output()
        .expect("psql");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("authgres "), "{stdout}");
    assert!(
        stdout.contains(&format!("{DATABASE}|127.0.0.1|")),
        "{stdout}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_refuses_wrong_passwords_and_stats_users_run_show_only() {
    let stack = Stack::start().await;
    let wrong = console(&stack, "ops", CONSOLE_GRAFANA_PASSWORD)
        .await
        .expect_err("another user's password");
    assert_eq!(code(&wrong), "28P01");
    let unknown = console(&stack, "root", CONSOLE_OPS_PASSWORD)
        .await
        .expect_err("no such console user");
    assert_eq!(code(&unknown), "28P01");
    // A token does not open the console, nor does a console password open
    // the database.
    let token = stack.issuer.token("user_alice");
    let token_login = console(&stack, "ops", &token).await.expect_err("a token");
    assert_eq!(code(&token_login), "28P01");
    assert!(
        stack
            .connect("authenticated", CONSOLE_OPS_PASSWORD)
            .await
            .is_err()
    );

    let grafana = console(&stack, "grafana", CONSOLE_GRAFANA_PASSWORD)
        .await
        .expect("stats user logs in");
    grafana
        .simple_query("SHOW POOLS")
        .await
        .expect("a stats user may SHOW");
    for command in [
        "PAUSE",
        "RESUME",
        "RECONNECT",
        "KILL_CLIENT 1",
        "SHUTDOWN",
        "RELOAD",
    ] {
        let refused = grafana.simple_query(command).await.expect_err(command);
        assert_eq!(code(&refused), "42501", "{command}");
    }
    // Extended-protocol queries get a clear error, and the session goes on.
    let prepared = grafana
        .query("SHOW POOLS", &[])
        .await
        .expect_err("extended");
    assert_eq!(code(&prepared), "0A000");
    assert_eq!(show(&grafana, "SHOW VERSION").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_client_closes_exactly_the_client_named() {
    let stack = Stack::start().await;
    let alice = stack.login("user_alice").await;
    let bob = stack.login("user_bob").await;
    let ops = ops(&stack).await;
    let alice_id = *common::console_client_ids(&ops, "user_alice")
        .await
        .first()
        .expect("alice's id");
    common::kill_client(&ops, alice_id, &alice).await;
    bob.simple_query("select 1").await.expect("bob goes on");
    let again = ops
        .simple_query(&format!("KILL_CLIENT {alice_id}"))
        .await
        .expect_err("alice is gone");
    assert_eq!(code(&again), "22023");
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnect_replaces_backends_and_disable_refuses_new_logins() {
    let stack = Stack::start_with(Options {
        upstream_extra: "pool_mode = \"transaction\"\n",
        ..Options::default()
    })
    .await;
    let alice = stack.login("user_alice").await;
    let before: i32 = alice
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    let ops = ops(&stack).await;
    show(&ops, "RECONNECT").await;
    show(&ops, "WAIT_CLOSE").await;
    let after: i32 = alice
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pid")
        .get(0);
    assert_ne!(before, after, "a new backend after RECONNECT");

    show(&ops, &format!("DISABLE {DATABASE}")).await;
    let refused = stack
        .connect("authenticated", &stack.issuer.token("user_bob"))
        .await
        .expect_err("disabled");
    assert_eq!(code(&refused), "57P03");
    alice
        .simple_query("select 1")
        .await
        .expect("a logged-in client goes on");
    show(&ops, &format!("ENABLE {DATABASE}")).await;
    stack.login("user_bob").await;
    let unknown = ops
        .simple_query("DISABLE nosuch")
        .await
        .expect_err("no such database");
    assert_eq!(code(&unknown), "3D000");
}

#[tokio::test(flavor = "multi_thread")]
async fn pause_and_resume_under_pgbench_load_fail_no_transaction() {
    let stack = Stack::start_with(Options {
        upstream_extra: "pool_mode = \"transaction\"\npool_size = 4\ncheckout_timeout = \"20s\"\n",
        ..Options::default()
    })
    .await;
    let pgbench = common::spawn_pgbench(&stack, LOAD, 6, 6);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ops = ops(&stack).await;
    show(&ops, "PAUSE").await;
    // Paused: no backend is checked out, the clients wait.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pools = show(&ops, "SHOW POOLS").await;
    let pool = wire_pool_of_app(&pools);
    assert_eq!(pool["sv_active"].as_deref(), Some("0"), "{pools:?}");
    assert!(
        pool["cl_waiting"].as_deref().is_some_and(|n| n != "0"),
        "clients wait while paused: {pools:?}"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    show(&ops, "RESUME").await;
    let resumed = ops
        .simple_query("RESUME")
        .await
        .expect_err("not paused any more");
    assert_eq!(code(&resumed), "22023");

    let output = pgbench.wait_with_output().expect("pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
    assert!(!stderr.contains("aborted"), "{stderr}");
}

/// `POST /console` on the admin listener as `user`, with `command`.
async fn http_console(
    stack: &Stack,
    credentials: Option<(&str, &str)>,
    command: &str,
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/console", stack.admin_port))
        .body(command.to_owned());
    if let Some((user, password)) = credentials {
        request = request.basic_auth(user, Some(password));
    }
    let response = request.send().await.expect("admin listener");
    let status = response.status().as_u16();
    let body = response.text().await.expect("body");
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_mirrors_the_console_with_the_console_users_credentials() {
    let stack = Stack::start_with(Options {
        admin_extra: "require_auth = true\n",
        ..Options::default()
    })
    .await;
    let _alice = stack.login("user_alice").await;
    let ops = Some(("ops", CONSOLE_OPS_PASSWORD));
    let grafana = Some(("grafana", CONSOLE_GRAFANA_PASSWORD));

    let (status, body) = http_console(&stack, grafana, "SHOW CLIENTS").await;
    assert_eq!(status, 200, "{body}");
    let columns = body["columns"].as_array().expect("columns");
    let sub = columns
        .iter()
        .position(|c| c == "sub")
        .expect("a sub column");
    assert!(
        body["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .any(|row| row[sub] == "user_alice"),
        "{body}"
    );
    assert_eq!(http_console(&stack, None, "SHOW CLIENTS").await.0, 401);
    let wrong = Some(("ops", CONSOLE_GRAFANA_PASSWORD));
    assert_eq!(http_console(&stack, wrong, "SHOW CLIENTS").await.0, 401);
    let (status, body) = http_console(&stack, grafana, "PAUSE").await;
    assert_eq!((status, body["code"].as_str()), (403, Some("42501")));
    let (status, body) = http_console(&stack, ops, "DISABLE nosuch").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("3D000")));
    let (status, _) = http_console(&stack, ops, "SHOW POOLS; SHOW CLIENTS").await;
    assert_eq!(status, 400, "one command per request");

    // With require_auth, the other routes need the same credentials; the
    // probes do not.
    assert_eq!(stack.admin_get("/metrics").await.0, 401);
    assert_eq!(stack.admin_post("/reload").await.0, 401);
    assert_eq!(stack.admin_get("/healthz").await.0, 200);
    let metrics = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/metrics", stack.admin_port))
        .basic_auth("grafana", Some(CONSOLE_GRAFANA_PASSWORD))
        .send()
        .await
        .expect("metrics");
    assert_eq!(metrics.status().as_u16(), 200);
    let reload = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/reload", stack.admin_port))
        .basic_auth("grafana", Some(CONSOLE_GRAFANA_PASSWORD))
        .send()
        .await
        .expect("reload");
    assert_eq!(reload.status().as_u16(), 403, "a stats user cannot reload");
    let (status, body) = http_console(&stack, ops, "RELOAD").await;
    assert_eq!(
        (status, body["command"].as_str()),
        (200, Some("RELOAD")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn under_pgbench_reconnect_fails_nothing_and_kill_client_ends_exactly_one_client() {
    let stack = Stack::start_with(Options {
        upstream_extra: "pool_mode = \"transaction\"\npool_size = 4\n",
        ..Options::default()
    })
    .await;
    let pgbench = common::spawn_pgbench(&stack, LOAD, 4, 6);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let ops = ops(&stack).await;
    let backends = |servers: &[Row]| {
        servers
            .iter()
            .filter_map(|s| s["remote_pid"].clone())
            .collect::<std::collections::HashSet<_>>()
    };
    let before = backends(&show(&ops, "SHOW SERVERS").await);
    show(&ops, "RECONNECT").await;
    show(&ops, "WAIT_CLOSE").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = backends(&show(&ops, "SHOW SERVERS").await);
    assert!(
        !after.is_empty() && before.is_disjoint(&after),
        "{before:?} then {after:?}"
    );

    let victim = show(&ops, "SHOW CLIENTS")
        .await
        .into_iter()
        .find(|c| c["sub"].as_deref() == Some("user_bench"))
        .and_then(|c| c["id"].clone())
        .expect("a pgbench client");
    show(&ops, &format!("KILL_CLIENT {victim}")).await;

    let output = pgbench.wait_with_output().expect("pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let aborted = stderr
        .lines()
        .filter(|l| l.contains(" aborted in command "))
        .count();
    assert_eq!(
        aborted, 1,
        "exactly the killed client ends:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("number of failed transactions: 0"),
        "{stdout}"
    );
}

/// Issue 25 item 4: under pgbench load from one user, `SHOW IDENTITIES`
/// lists that user first, a light user after it with its exact count; a
/// stats user may run it, and the admin API lists the same.
#[tokio::test(flavor = "multi_thread")]
async fn show_identities_under_load_lists_the_heavy_user_first() {
    let stack = Stack::start().await;
    let pgbench = common::spawn_pgbench(&stack, LOAD, 4, 3);
    let light = stack.login("user_light").await;
    for _ in 0..5 {
        light.simple_query("select 1").await.expect("select");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = pgbench.wait_with_output().expect("pgbench");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let grafana = console(&stack, "grafana", CONSOLE_GRAFANA_PASSWORD)
        .await
        .expect("grafana logs in");
    let rows = show(&grafana, "SHOW IDENTITIES").await;
    let first = rows.first().expect("a row");
    assert_eq!(first["user_id"].as_deref(), Some("user_bench"), "{rows:?}");
    assert_eq!(first["provider"].as_deref(), Some("sandbox"));
    let bench: u64 = first["transactions"]
        .as_deref()
        .and_then(|n| n.parse().ok())
        .expect("a count");
    assert!(bench > 50, "{rows:?}");
    let light_row = rows
        .iter()
        .find(|r| r["user_id"].as_deref() == Some("user_light"))
        .expect("the light user is listed");
    assert_eq!(light_row["transactions"].as_deref(), Some("5"), "{rows:?}");
    assert_eq!(light_row["error_bound_us"].as_deref(), Some("0"));
    // No provider names a tenant here.
    assert!(show(&grafana, "SHOW TENANTS").await.is_empty());
    let help = show(&grafana, "SHOW HELP").await;
    assert!(help.iter().any(|r| {
        r["command"]
            .as_deref()
            .is_some_and(|c| c.contains("IDENTITIES"))
    }));

    let (status, body) = stack.admin_get("/identities?limit=1").await;
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let identities = listed["identities"].as_array().expect("a list");
    assert_eq!(identities.len(), 1, "{body}");
    assert_eq!(identities[0]["user_id"], "user_bench");
    let (status, body) = http_console(
        &stack,
        Some(("grafana", CONSOLE_GRAFANA_PASSWORD)),
        "SHOW IDENTITIES",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rows"][0][1], "user_bench", "{body}");
}
