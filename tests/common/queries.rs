//! One-line answers tests ask of a session or of the database: who the
//! session is, which backend serves it, whose rows exist; plus a
//! notification listener, an extra role, and a pgbench run through the proxy.

use super::{DATABASE, Stack, psql_path};

/// What `auth.user_id()` says in this session.
pub async fn user_id(client: &tokio_postgres::Client) -> Option<String> {
    client
        .query_one("select auth.user_id()", &[])
        .await
        .expect("auth.user_id()")
        .get(0)
}

/// The upstream backend serving this client's current transaction.
pub async fn backend_pid(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one("select pg_backend_pid()", &[])
        .await
        .expect("pg_backend_pid()")
        .get(0)
}

/// The console ids of `sub`'s clients in `SHOW CLIENTS` (on `ops`, a
/// console session), oldest first.
pub async fn console_client_ids(ops: &tokio_postgres::Client, sub: &str) -> Vec<u64> {
    let mut ids: Vec<u64> = ops
        .simple_query("SHOW CLIENTS")
        .await
        .expect("SHOW CLIENTS")
        .into_iter()
        .filter_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) if row.get("sub") == Some(sub) => {
                row.get("id").and_then(|id| id.parse().ok())
            }
            _ => None,
        })
        .collect();
    ids.sort_unstable();
    ids
}

/// Runs `KILL_CLIENT id` on `ops` and requires `client` (that client)
/// closed: its next query fails, with 57P01 if it is told why.
pub async fn kill_client(ops: &tokio_postgres::Client, id: u64, client: &tokio_postgres::Client) {
    ops.simple_query(&format!("KILL_CLIENT {id}"))
        .await
        .expect("KILL_CLIENT");
    let killed = client
        .simple_query("select 1")
        .await
        .expect_err("the client is closed");
    assert!(
        killed
            .as_db_error()
            .is_none_or(|e| e.code().code() == "57P01"),
        "{killed}"
    );
}

/// A client logged in with `token` whose notifications arrive, payloads
/// only, on the returned channel.
pub async fn listening_client(
    stack: &Stack,
    token: &str,
) -> (
    tokio_postgres::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use futures_util::StreamExt as _;
    let (client, mut connection) = tokio_postgres::connect(
        &stack.conninfo("authenticated", token, "sslmode=disable"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    let (notes, received) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let tokio_postgres::AsyncMessage::Notification(note) = message {
                let _ = notes.send(note.payload().to_owned());
            }
        }
    });
    (client, received)
}

/// Does what init-db never does and an operator might: creates `role` and
/// makes `authenticated` a member of it.
pub async fn grant_role_to_authenticated(stack: &Stack, role: &str) {
    stack
        .cluster
        .admin(DATABASE)
        .await
        .expect("admin")
        .batch_execute(&format!(
            "create role {role}; grant {role} to authenticated"
        ))
        .await
        .expect("grant");
}

/// Rows of `todos` owned by `sub`, counted by the superuser.
pub async fn todos_of(stack: &Stack, sub: &str) -> i64 {
    stack
        .cluster
        .admin(DATABASE)
        .await
        .expect("admin")
        .query_one("select count(*) from todos where user_id = $1", &[&sub])
        .await
        .expect("count")
        .get(0)
}

/// Runs pgbench through the proxy as `authenticated` with `token`, 50
/// transactions on each of `clients` clients, prepared protocol, the RLS
/// query as its script; returns pgbench's report.
pub fn pgbench_rls(stack: &Stack, token: &str, clients: u32) -> String {
    let script = stack.dir.path().join("bench.sql");
    std::fs::write(
        &script,
        "select count(*) from todos where user_id = (select auth.user_id());\n",
    )
    .expect("script");
    let pgbench = psql_path().with_file_name("pgbench");
    let output = std::process::Command::new(if pgbench.is_file() {
        pgbench
    } else {
        "pgbench".into()
    })
    .args(["-n", "-j", "2", "-t", "50", "-M", "prepared", "-c"])
    .arg(clients.to_string())
    .arg("-f")
    .arg(&script)
    .args(["-h", "127.0.0.1", "-p", &stack.port.to_string()])
    .args(["-U", "authenticated", DATABASE])
    .env("PGPASSWORD", token)
    .output()
    .expect("run pgbench");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "pgbench failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "number of transactions actually processed: {0}/{0}",
            clients * 50
        )),
        "{stdout}"
    );
    stdout
}

/// Starts pgbench against the proxy as `user_bench`: `script` (its text)
/// in simple mode from `clients` clients for `seconds`, output piped.
pub fn spawn_pgbench(
    stack: &Stack,
    script: &str,
    clients: u32,
    seconds: u32,
) -> std::process::Child {
    let path = stack
        .dir
        .path()
        .join(format!("load-{clients}-{seconds}.sql"));
    std::fs::write(&path, script).expect("script");
    std::process::Command::new(psql_path().with_file_name("pgbench"))
        .args(["-n", "-j", "2", "-M", "simple", "-c"])
        .arg(clients.to_string())
        .arg("-T")
        .arg(seconds.to_string())
        .arg("-f")
        .arg(&path)
        .args(["-h", "127.0.0.1", "-p", &stack.port.to_string()])
        .args(["-U", "authenticated", DATABASE])
        .env("PGPASSWORD", stack.issuer.token("user_bench"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench")
}

/// How many backends are running exactly `query` now, as the sandbox's
/// superuser sees them (whoever's they are).
pub async fn active_statements(stack: &Stack, query: &str) -> i64 {
    stack
        .cluster
        .admin(DATABASE)
        .await
        .expect("admin")
        .query_one(
            "select count(*) from pg_stat_activity where state = 'active' and query = $1",
            &[&query],
        )
        .await
        .expect("activity")
        .get(0)
}
