//! Which Postgres majors authgres supports: `init-db` installs on 14 and
//! later and refuses anything older with a message that says what to do.
//! The sandbox runs whatever `AUTHGRES_PG_BINDIR` selects; CI runs this
//! against 13 (see `.ci/run`), and the rest of the suite against 14-18.

#![allow(clippy::expect_used, reason = "test code: a panic is a failing test")]

use std::process::Command;

use authgres_sandbox::Cluster;

#[tokio::test]
async fn init_db_installs_on_14_and_later_and_refuses_older_servers() {
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("join")
        .expect("sandbox cluster");
    let admin = cluster.admin("postgres").await.expect("admin");
    admin
        .batch_execute("create database app")
        .await
        .expect("database");
    let number: i32 = admin
        .query_one("select current_setting('server_version_num')::int", &[])
        .await
        .expect("version")
        .get(0);
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("proxy.toml"),
        format!(
            "secrets_file = \"authgres.env\"\n\
             [upstream]\nport = {}\n\
             [[providers]]\nname = \"p\"\nissuer = \"http://127.0.0.1:9/\"\n\
             jwks_url = \"http://127.0.0.1:9/jwks\"\n",
            cluster.port()
        ),
    )
    .expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_authgres"))
        .args(["init-db", "--config"])
        .arg(dir.path().join("proxy.toml"))
        .args(["--admin-url", &cluster.admin_url("app")])
        .output()
        .expect("run init-db");
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("server_version_num {number}: {stderr}");
    let installed = admin
        .query_one(
            "select count(*) from pg_roles where rolname = 'authenticated'",
            &[],
        )
        .await
        .expect("roles")
        .get::<_, i64>(0);
    if number >= 140_000 {
        assert!(output.status.success(), "init-db on {number}: {stderr}");
        assert_eq!(installed, 1);
    } else {
        assert!(!output.status.success(), "init-db installed on {number}");
        assert!(
            stderr.contains("authgres supports PostgreSQL 14 and later"),
            "{stderr}"
        );
        assert_eq!(installed, 0, "a refused server is left untouched");
    }
}
