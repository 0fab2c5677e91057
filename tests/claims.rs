//! Roles and databases chosen by the token's claims, through the real
//! proxy: a role claim grants roles and the startup user chooses among
//! them (never beyond, and SET ROLE cannot move between them); a tenant
//! claim sends each tenant to its own database, on this server or
//! another, in both pool modes, over TCP, `/sql` and WebSocket.

#![allow(clippy::expect_used, reason = "test code: a panic is a failing test")]
#![allow(missing_docs)]

mod common;

use std::path::Path;
use std::process::Command;

use authgres_sandbox::{Cluster, TokenSpec};
use common::Stack;
use serde_json::{Value, json};

/// Roles the role claim may grant, beside the stack's.
const CLAIMED_ROLES: [&str; 2] = ["editor", "reader"];

/// The stack with a role claim and a tenant claim on its provider,
/// `tenant_acme` and `tenant_globex` beside its database, another
/// `tenant_globex` on a second server, and `[databases]` entries routing
/// by tenant. Returns the second
/// server too (it must outlive the test).
async fn claims_stack() -> (Stack, Cluster) {
    let mut stack = Stack::start().await;
    let other = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("join")
        .expect("second cluster");
    let other_port = other.port();
    stack.edit_config(|config| {
        let provider_roles = r#"roles = ["authenticated", "person"]"#;
        assert!(config.contains(provider_roles));
        let config = config.replace(
            provider_roles,
            r#"roles = ["authenticated", "person", "editor", "reader"]
role_claim = "$.org_role"
role_claim_values = { "org:admin" = "editor", "org:member" = "reader" }
role_claim_default = "authenticated"
tenant_claim = "$.org_id""#,
        );
        format!(
            r#"{config}
[roles.editor]
password_env = "AUTHGRES_EDITOR_PASSWORD"
[roles.reader]
password_env = "AUTHGRES_READER_PASSWORD"
[databases.app_tx]
dbname = "tenant_{{tenant}}"
pool_mode = "transaction"
[databases.app_session]
dbname = "tenant_{{tenant}}"
pool_mode = "session"
[databases.b2b]
tenants = {{ acme = "acme_db", globex = "globex_db" }}
pool_mode = "transaction"
[databases.acme_db]
dbname = "tenant_acme"
[databases.globex_db]
host = "127.0.0.1"
port = {other_port}
dbname = "tenant_globex"
"#
        )
    });
    // The new roles, in the stack's database.
    stack.init_db(&[]);
    // On the second server, globex's database says so.
    for (cluster, tenant, name) in [
        (&stack.cluster, "acme", "acme"),
        (&stack.cluster, "globex", "globex"),
        (&other, "globex", "globex@other"),
    ] {
        let database = format!("tenant_{tenant}");
        cluster
            .admin("postgres")
            .await
            .expect("admin")
            .batch_execute(&format!("create database {database}"))
            .await
            .expect("create tenant database");
        stack.init_db_at(&cluster.admin_url(&database));
        let grants: String = CLAIMED_ROLES
            .iter()
            .map(|role| format!("grant select on tenant_info to {role};"))
            .collect();
        cluster
            .admin(&database)
            .await
            .expect("tenant admin")
            .batch_execute(&format!(
                "create table tenant_info (name text);
                 insert into tenant_info values ('{name}');
                 grant select on tenant_info to authenticated; {grants}"
            ))
            .await
            .expect("tenant schema");
    }
    stack.restart_proxy();
    (stack, other)
}

fn token(stack: &Stack, sub: &str, claims: Value) -> String {
    let mut spec = TokenSpec::new(sub);
    for (name, value) in claims.as_object().expect("claims") {
        spec = spec.claim(name, value.clone());
    }
    stack.issuer.mint(&spec)
}

/// Connects as `user` to `database` with `token`.
async fn connect(
    stack: &Stack,
    user: &str,
    database: &str,
    token: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let password = if token.is_empty() {
        String::new()
    } else {
        format!("password={token}")
    };
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname={database} user={user} {password}",
        stack.port
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn code(error: &tokio_postgres::Error) -> String {
    error
        .as_db_error()
        .map_or_else(|| format!("{error}"), |e| e.code().code().to_owned())
}

async fn one(client: &tokio_postgres::Client, sql: &str) -> String {
    client
        .query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_role_claim_chooses_the_role_and_nothing_escalates() {
    let (stack, _other) = claims_stack().await;
    let admin = token(&stack, "u_admin", json!({"org_role": "org:admin"}));
    let member = token(&stack, "u_member", json!({"org_role": "org:member"}));
    let owner = token(&stack, "u_owner", json!({"org_role": "admin"}));
    let plain = token(&stack, "u_plain", json!({}));

    // user=authenticated lets the token choose.
    let editor = connect(&stack, "authenticated", "app", &admin)
        .await
        .expect("admin");
    assert_eq!(one(&editor, "select current_user::text").await, "editor");
    assert_eq!(one(&editor, "select auth.user_id()").await, "u_admin");
    let reader = connect(&stack, "reader", "app", &member)
        .await
        .expect("member as reader");
    assert_eq!(one(&reader, "select current_user::text").await, "reader");
    // Asking for a role the claim does not grant is refused, never
    // answered with another role.
    let refused = connect(&stack, "editor", "app", &member)
        .await
        .map(drop)
        .expect_err("refused");
    assert_eq!(code(&refused), "28000", "{refused}");
    let message = refused.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("grants role \"reader\"")),
        "{message:?}"
    );
    // A claim naming a role the provider does not allow grants nothing:
    // the default (the floor) applies, and asking for more is refused.
    let floor = connect(&stack, "authenticated", "app", &owner)
        .await
        .expect("floor");
    assert_eq!(
        one(&floor, "select current_user::text").await,
        "authenticated"
    );
    for role in ["editor", "postgres"] {
        let refused = connect(&stack, role, "app", &owner)
            .await
            .map(drop)
            .expect_err("refused");
        assert_eq!(code(&refused), "28000", "{role}: {refused}");
    }
    let plain = connect(&stack, "authenticated", "app", &plain)
        .await
        .expect("plain");
    assert_eq!(
        one(&plain, "select current_user::text").await,
        "authenticated"
    );

    // SET ROLE, SET SESSION AUTHORIZATION and RESET ROLE cannot move a
    // session from the role its token chose to another.
    for escape in [
        "set role editor",
        "set session authorization editor",
        "select set_config('role', 'editor', false)",
        "set role authenticated",
    ] {
        let failed = reader.batch_execute(escape).await.err();
        let failed = failed.unwrap_or_else(|| panic!("{escape} was accepted"));
        assert_eq!(code(&failed), "42501", "{escape}: {failed}");
        reader.batch_execute("rollback").await.ok();
    }
    reader
        .batch_execute("reset role")
        .await
        .expect("reset role");
    assert_eq!(one(&reader, "select current_user::text").await, "reader");
    assert_eq!(one(&reader, "select session_user::text").await, "reader");
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_land_in_their_own_database_in_both_pool_modes_over_tcp() {
    let (stack, other) = claims_stack().await;
    let acme = token(
        &stack,
        "u_acme",
        json!({"org_id": "acme", "org_role": "org:member"}),
    );
    let globex = token(&stack, "u_globex", json!({"org_id": "globex"}));
    let lone = token(&stack, "u_lone", json!({}));
    let stranger = token(&stack, "u_initech", json!({"org_id": "initech"}));
    let odd = token(&stack, "u_odd", json!({"org_id": "acme;drop"}));

    // The template, in each pool mode: several transactions each, so a
    // transaction-pooled client is served more than once.
    for database in ["app_tx", "app_session"] {
        for (token, tenant) in [(&acme, "acme"), (&globex, "globex")] {
            let client = connect(&stack, "authenticated", database, token).await;
            let client = client.unwrap_or_else(|e| panic!("{database} {tenant}: {e}"));
            for _ in 0..3 {
                let row = client
                    .query_one(
                        "select current_database()::text, name from tenant_info",
                        &[],
                    )
                    .await;
                let row = row.unwrap_or_else(|e| panic!("{database} {tenant}: {e}"));
                assert_eq!(row.get::<_, String>(0), format!("tenant_{tenant}"));
                assert_eq!(row.get::<_, String>(1), tenant);
            }
        }
    }
    // The explicit map: acme on this server, globex on the other.
    for (token, tenant) in [(&acme, "acme"), (&globex, "globex@other")] {
        let client = connect(&stack, "authenticated", "b2b", token)
            .await
            .expect("b2b");
        assert_eq!(one(&client, "select name from tenant_info").await, tenant);
        // A cancel reaches the server the backend runs on.
        let cancel = client.cancel_token();
        let slow = client.query_one("select pg_sleep(30)", &[]);
        let canceller = async {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            cancel
                .cancel_query(tokio_postgres::NoTls)
                .await
                .expect("cancel sent");
        };
        let (slow, ()) = tokio::join!(slow, canceller);
        let error = slow.map(drop).expect_err("cancelled");
        assert_eq!(code(&error), "57014", "{tenant}: {error}");
    }
    // No tenant, a tenant without a database, a tenant that cannot name
    // one: refused.
    for (token, database, expected) in [
        (&lone, "app_tx", "28000"),
        (&lone, "b2b", "28000"),
        (&stranger, "b2b", "28000"),
        (&odd, "app_tx", "28000"),
        // A tenant's database is not reachable past its entry.
        (&globex, "acme_db", "3D000"),
        (&globex, "tenant_acme", "3D000"),
    ] {
        let refused = connect(&stack, "authenticated", database, token)
            .await
            .err();
        let refused = refused.unwrap_or_else(|| panic!("{database} was served"));
        assert_eq!(code(&refused), expected, "{database}: {refused}");
    }
    // The console lists the entries as written, with their servers.
    let console = connect(
        &stack,
        "ops",
        common::CONSOLE_DATABASE,
        common::CONSOLE_OPS_PASSWORD,
    )
    .await
    .expect("console");
    let rows: Vec<Vec<String>> = console
        .simple_query("SHOW DATABASES")
        .await
        .expect("SHOW DATABASES")
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                (0..4)
                    .map(|i| row.get(i).unwrap_or("").to_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    let other_port = other.port().to_string();
    for expected in [
        [
            "app_tx",
            "127.0.0.1",
            &stack.cluster.port().to_string(),
            "tenant_{tenant}",
        ],
        [
            "b2b",
            "127.0.0.1",
            &stack.cluster.port().to_string(),
            "(by tenant)",
        ],
        ["globex_db", "127.0.0.1", &other_port, "tenant_globex"],
    ] {
        assert!(
            rows.iter().any(|r| r == &expected),
            "{expected:?} in {rows:?}"
        );
    }
    // Anonymous logins carry no tenant.
    let anonymous = connect(&stack, "anonymous", "app_tx", "")
        .await
        .map(drop)
        .expect_err("refused");
    assert_eq!(code(&anonymous), "28000", "{anonymous}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_land_in_their_own_database_over_sql_and_websocket() {
    let (stack, _other) = claims_stack().await;
    let tokens = json!({
        "acme": token(&stack, "u_acme", json!({"org_id": "acme", "org_role": "org:admin"})),
        "globex": token(&stack, "u_globex", json!({"org_id": "globex"})),
        "lone": token(&stack, "u_lone", json!({})),
    });
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/neon");
    common::provision::node_modules("tests/neon");
    let output = tokio::task::spawn_blocking({
        let (http_url, pg) = (stack.http_url(), format!("127.0.0.1:{}", stack.port));
        move || {
            Command::new("node")
                .arg("tenants.mjs")
                .current_dir(&dir)
                .env("AUTHGRES_HTTP_URL", http_url)
                .env("AUTHGRES_PG_HOSTPORT", pg)
                .env("AUTHGRES_DATABASES", "app_tx,app_session,b2b")
                .env("AUTHGRES_TOKENS", tokens.to_string())
                .output()
                .expect("run node")
        }
    })
    .await
    .expect("join");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    for transport in ["http", "ws"] {
        for database in ["app_tx", "app_session", "b2b"] {
            let acme = &seen[format!("{transport}:{database}/acme")];
            assert_eq!(acme["tenant"], "acme", "{transport} {database}: {seen}");
            assert_eq!(acme["role"], "editor", "{transport} {database}: {seen}");
            let globex = &seen[format!("{transport}:{database}/globex")];
            let expected = if database == "b2b" {
                "globex@other"
            } else {
                "globex"
            };
            assert_eq!(globex["tenant"], expected, "{transport} {database}: {seen}");
            assert_eq!(
                globex["role"], "authenticated",
                "{transport} {database}: {seen}"
            );
            let lone = &seen[format!("{transport}:{database}/lone")];
            assert_eq!(lone["error"], "28000", "{transport} {database}: {seen}");
        }
    }
}
