//! Every user of the proxy shares a login role, and Postgres lets any role
//! change its own password and session defaults (issue 21, item 1). These
//! attacks rewrite the role from inside a session; none may change what
//! any other session gets, and none may lock the proxy out. Also: what
//! init-db does on a server where nobody is superuser (issue 20), run in
//! whichever installer mode `AUTHGRES_TEST_ADMIN` selects.

#![allow(clippy::expect_used, reason = "test code: a panic is a failing test")]

mod common;

use std::time::Duration;

use common::Stack;

/// Opens `n` sessions as `role` at once and holds them, so the pool must
/// log in new backends; each is checked to run with clean defaults.
async fn fresh_sessions(stack: &Stack, role: &str, n: usize) -> Vec<tokio_postgres::Client> {
    let mut sessions = Vec::new();
    for i in 0..n {
        let token = if role == "anonymous" {
            String::new()
        } else {
            stack.issuer.token(&format!("user_{i}"))
        };
        let client = stack.connect(role, &token).await.unwrap_or_else(|e| {
            panic!("session {i} as {role} logs in: {e}\nlog:\n{}", stack.log())
        });
        for (setting, expected) in [
            ("default_transaction_read_only", "off"),
            ("row_security", "on"),
            ("extra_float_digits", "1"),
            ("local_preload_libraries", ""),
            ("statement_timeout", "0"),
        ] {
            let value: String = client
                .query_one(&format!("show {setting}"), &[])
                .await
                .expect("show")
                .get(0);
            assert_eq!(value, expected, "session {i}: {setting}");
        }
        client
            .batch_execute("create temp table t (x int); insert into t values (1)")
            .await
            .expect("a fresh session writes");
        sessions.push(client);
    }
    sessions
}

async fn role_settings(stack: &Stack, role: &str) -> i64 {
    stack
        .installer()
        .await
        .query_one(
            "select count(*) from pg_db_role_setting where setrole = $1::text::regrole",
            &[&role],
        )
        .await
        .expect("pg_db_role_setting")
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clients_role_defaults_never_reach_another_session() {
    let stack = Stack::start().await;
    for role in ["anonymous", "authenticated"] {
        let token = if role == "anonymous" {
            String::new()
        } else {
            stack.issuer.token("user_mallory")
        };
        let attacker = stack.connect(role, &token).await.expect("attacker");
        attacker
            .batch_execute(
                "alter role current_user set default_transaction_read_only = on;
                 alter role current_user set extra_float_digits = -15;
                 alter role current_user set local_preload_libraries = 'nonexistent';
                 alter role current_user set statement_timeout = '1ms';
                 alter role current_user set idle_session_timeout = '1ms';
                 alter role current_user in database app set row_security = off;",
            )
            .await
            .expect("any role may set its own defaults");
        assert!(role_settings(&stack, role).await > 0);
        // While the attacker holds its backend, new ones must be logged in.
        let sessions = fresh_sessions(&stack, role, 4).await;
        assert_eq!(
            role_settings(&stack, role).await,
            0,
            "{role}: the proxy cleared the defaults"
        );
        drop(sessions);
        drop(attacker);
    }
    assert!(
        stack.log().contains("session defaults"),
        "the repair is logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn defaults_set_in_a_pooled_session_are_cleared_when_it_leaves() {
    let stack = Stack::start().await;
    let attacker = stack.login("user_mallory").await;
    attacker
        .batch_execute("alter role current_user set default_transaction_read_only = on")
        .await
        .expect("own defaults");
    drop(attacker);
    // The attacker's backend is reset for the next client; the reset finds
    // the defaults and clears them before anyone else logs in.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let bob = stack.login("user_bob").await;
    assert_eq!(common::user_id(&bob).await.as_deref(), Some("user_bob"));
    let _more = fresh_sessions(&stack, "authenticated", 3).await;
    assert_eq!(role_settings(&stack, "authenticated").await, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_clients_password_change_locks_nobody_out_and_is_undone() {
    password_change_is_undone("").await;
}

/// Without a pool each client logs in on its own: the repair held only for
/// pooled logins.
#[tokio::test(flavor = "multi_thread")]
async fn without_a_pool_a_password_change_locks_nobody_out_either() {
    password_change_is_undone("pool_mode = \"none\"").await;
}

async fn password_change_is_undone(upstream_extra: &'static str) {
    let stack = Stack::start_with(common::Options {
        upstream_extra,
        ..Default::default()
    })
    .await;
    // The role's first login gives the pool its keeper connection, logged
    // in beside it.
    drop(stack.login("user_bob").await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attacker = stack.login("user_mallory").await;
    attacker
        .batch_execute("alter role current_user password 'stolen'")
        .await
        .expect("any role may change its own password");
    // Every new login still works, while the attacker holds its backend.
    let sessions = fresh_sessions(&stack, "authenticated", 4).await;
    // And the attacker's password no longer opens the role.
    let direct = format!(
        "host=127.0.0.1 port={} dbname=app user=authenticated password=stolen sslmode=disable",
        stack.cluster.port()
    );
    let error = tokio_postgres::connect(&direct, tokio_postgres::NoTls)
        .await
        .err()
        .expect("the stolen password is refused");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{error}"
    );
    assert!(stack.log().contains("password no longer matched"));
    drop(sessions);
}

#[tokio::test(flavor = "multi_thread")]
async fn init_db_repairs_the_role_and_keeps_a_working_password() {
    let stack = Stack::start().await;
    let admin = stack.installer().await;
    let direct = |password: &str| {
        format!(
            "host=127.0.0.1 port={} dbname=app user=authenticated password={password} \
             sslmode=disable",
            stack.cluster.port()
        )
    };
    let attacker = stack.login("user_mallory").await;
    attacker
        .batch_execute(
            "alter role current_user password 'stolen';
             alter role current_user set statement_timeout = '1ms'",
        )
        .await
        .expect("own password and defaults");
    // Still connected: the proxy has not reset its backend yet.
    let output = stack.init_db(&[]);
    drop(attacker);
    assert!(output.contains("setting it back"), "{output}");
    assert!(output.contains("cleared its session defaults"), "{output}");
    assert_eq!(role_settings(&stack, "authenticated").await, 0);
    assert!(
        tokio_postgres::connect(&direct("stolen"), tokio_postgres::NoTls)
            .await
            .is_err()
    );
    // A second run with a working password changes nothing.
    let output = stack.init_db(&[]);
    assert!(!output.contains("password set"), "{output}");
    drop(admin);
}

#[tokio::test(flavor = "multi_thread")]
async fn init_db_never_replaces_the_password_of_a_role_that_exists() {
    let stack = Stack::start().await;
    // A new checkout of the deployment: the secrets file lacks a password.
    let secrets = stack.dir.path().join("authgres.env");
    let text = std::fs::read_to_string(&secrets).expect("secrets");
    let kept: Vec<&str> = text
        .lines()
        .filter(|line| !line.starts_with("AUTHGRES_AUTHENTICATED_PASSWORD="))
        .collect();
    std::fs::write(&secrets, kept.join("\n")).expect("write secrets");
    let init = std::process::Command::new(common::BIN)
        .args(["init-db", "--config"])
        .arg(stack.config_path())
        .args(["--admin-url", &stack.admin_url])
        .env("PGSSLMODE", "disable")
        .output()
        .expect("init-db");
    let stderr = String::from_utf8_lossy(&init.stderr);
    assert!(!init.status.success(), "{stderr}");
    assert!(stderr.contains("--reset-passwords"), "{stderr}");
    // The running proxy still logs in: nothing was changed.
    let fresh = fresh_sessions(&stack, "authenticated", 2).await;
    drop(fresh);
}

#[tokio::test(flavor = "multi_thread")]
async fn init_db_reads_the_password_from_pgpassword_and_pgpass() {
    let stack = Stack::start().await;
    let url = url_parts(&stack.admin_url);
    let keywords = format!(
        "host=127.0.0.1 port={} dbname=app user={} sslmode=disable",
        url.port, url.user
    );
    let run = |envs: &[(&str, &str)]| {
        let mut command = std::process::Command::new(common::BIN);
        command
            .args(["init-db", "--config"])
            .arg(stack.config_path())
            .args(["--admin-url", &keywords])
            .env_remove("PGPASSWORD")
            .env("HOME", stack.dir.path());
        for (name, value) in envs {
            command.env(name, value);
        }
        command.output().expect("init-db")
    };
    let with_env = run(&[("PGPASSWORD", &url.password)]);
    assert!(
        with_env.status.success(),
        "{}",
        String::from_utf8_lossy(&with_env.stderr)
    );
    let pgpass = stack.dir.path().join(".pgpass");
    std::fs::write(
        &pgpass,
        format!("127.0.0.1:{}:app:{}:{}\n", url.port, url.user, url.password),
    )
    .expect("pgpass");
    std::fs::set_permissions(&pgpass, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .expect("chmod");
    let with_file = run(&[]);
    assert!(
        with_file.status.success(),
        "{}",
        String::from_utf8_lossy(&with_file.stderr)
    );
}

struct UrlParts {
    user: String,
    password: String,
    port: String,
}

/// `postgres://user:password@host:port/db` split.
fn url_parts(url: &str) -> UrlParts {
    let rest = url.trim_start_matches("postgres://");
    let (credentials, rest) = rest.split_once('@').expect("credentials");
    let (user, password) = credentials.split_once(':').expect("password");
    let port = rest
        .split_once(':')
        .and_then(|(_, tail)| tail.split_once('/'))
        .map(|(port, _)| port)
        .expect("port");
    UrlParts {
        user: user.to_owned(),
        password: password.to_owned(),
        port: port.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_token_the_login_role_only_reads_and_tables_without_rls_are_named() {
    let stack = Stack::start().await;
    let admin = stack.installer().await;
    admin
        .batch_execute(
            "create table plans (id int primary key, price int); insert into plans values (1, 100)",
        )
        .await
        .expect("a table without RLS");
    let output = stack.init_db(&[]);
    assert!(
        output.contains("without row-level security: plans"),
        "{output}"
    );
    let anonymous = stack.connect("anonymous", "").await.expect("anonymous");
    let error = anonymous
        .batch_execute("update plans set price = 0")
        .await
        .expect_err("no writes without a token");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
    let price: i32 = admin
        .query_one("select price from plans", &[])
        .await
        .expect("price")
        .get(0);
    assert_eq!(price, 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn tables_a_migration_role_creates_later_are_granted() {
    let stack = Stack::start().await;
    let admin = stack.installer().await;
    admin
        .batch_execute(
            "create role migrator login password 'migrator';
             grant migrator to current_user;
             grant create on schema public to migrator;",
        )
        .await
        .expect("a migration role");
    stack.init_db(&["--migration-role", "migrator"]);
    let url = url_parts(&stack.admin_url);
    let migrator = common::connect_admin(&format!(
        "postgres://migrator:migrator@127.0.0.1:{}/app",
        url.port
    ))
    .await;
    migrator
        .batch_execute(
            "create table notes (owner text default auth.user_id(), body text);
             alter table notes enable row level security;
             create policy own on notes to authenticated
                 using (owner = (select auth.user_id())) with check (owner = (select auth.user_id()));",
        )
        .await
        .expect("a later migration");
    let alice = stack.login("user_alice").await;
    alice
        .batch_execute("insert into notes (body) values ('mine')")
        .await
        .expect("granted as it appeared");
    let mine: i64 = alice
        .query_one("select count(*) from notes", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(mine, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn init_db_says_which_isolation_holds_for_who_installed_it() {
    let stack = Stack::start().await;
    let output = &stack.init_db_output;
    if stack.installer.managed() {
        assert!(
            output.contains("stay open") && output.contains("pg_stat_activity"),
            "without a superuser init-db names the open channels: {output}"
        );
        // And what it names is what a client finds.
        let bob = stack.login("user_bob").await;
        let seen: i64 = bob
            .query_one("select count(*) from pg_stat_activity", &[])
            .await
            .expect("the activity view stays readable")
            .get(0);
        assert!(seen >= 1);
    } else {
        assert!(
            output.contains("every channel init-db knows is closed"),
            "{output}"
        );
    }
}

/// `check-config` output and exit status for a config written to a fresh
/// directory.
fn check_config(config: &str, secrets: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("proxy.toml"), config).expect("config");
    std::fs::write(dir.path().join("authgres.env"), secrets).expect("secrets");
    common::check_config(&dir.path().join("proxy.toml"))
}

#[test]
fn check_config_fails_on_missing_secrets_and_warns_of_a_remote_listener_without_tls() {
    let config = "secrets_file = \"authgres.env\"\n\
                  [listen]\naddress = \"0.0.0.0:6432\"\n\
                  [upstream]\nhost = \"127.0.0.1\"\nport = 5432\n\
                  [[providers]]\nname = \"p\"\nissuer = \"https://issuer.example\"\n\
                  jwks_url = \"https://issuer.example/jwks\"\n";
    let (ok, text) = check_config(config, "");
    assert!(!ok, "missing secrets are an error: {text}");
    assert!(text.contains("missing secrets"), "{text}");
    let secrets = format!(
        "AUTHGRES_CLAIMS_KEY={}\nAUTHGRES_AUTHENTICATED_PASSWORD=x\n",
        "ab".repeat(32)
    );
    let (ok, text) = check_config(config, &secrets);
    assert!(ok, "{text}");
    assert!(
        text.contains("warning: 0.0.0.0:6432 is reachable from other hosts without TLS"),
        "{text}"
    );
    // The default roles: no tokenless access unless configured.
    assert!(!text.contains("anonymous"), "{text}");
}
