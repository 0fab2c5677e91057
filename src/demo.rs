//! `authgres demo`: a throwaway Postgres with the seed's todos schema, a
//! local token issuer and the proxy, all on loopback. Ctrl-C removes all.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use authgres_sandbox::{Cluster, Issuer, tls::TestCerts};

/// The issuer's keys, for `authgres token`.
pub const ISSUER_FILE: &str = "issuer.json";
/// The todos schema with RLS policies.
const TODOS_SQL: &str = include_str!("../sql/demo_todos.sql");
/// Database the demo serves.
const DATABASE: &str = "app";

/// Where the demo keeps its state unless told otherwise.
pub fn default_state_dir() -> PathBuf {
    std::env::temp_dir().join("authgres-demo")
}

/// Where the demo listens.
pub struct Addresses {
    /// Postgres clients.
    pub wire: String,
    /// `/sql` and WebSocket.
    pub http: String,
    /// `/metrics`, `/readyz`, ...
    pub admin: String,
}

/// Runs the demo until Ctrl-C or SIGTERM.
pub async fn run(
    env: Option<PathBuf>,
    addresses: &Addresses,
    state_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let listen = addresses.wire.as_str();
    let dir = state_dir.unwrap_or_else(default_state_dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _cleanup = RemoveOnDrop(dir.clone());
    eprintln!("starting a throwaway Postgres cluster...");
    let cluster = tokio::task::spawn_blocking(Cluster::start).await??;
    let issuer = Issuer::start().await?;
    issuer.signer().save(&dir.join(ISSUER_FILE))?;
    TestCerts::generate()?.write_to(&dir)?;

    cluster
        .admin("postgres")
        .await?
        .batch_execute(&format!("create database {DATABASE}"))
        .await?;
    let config_path = dir.join("proxy.toml");
    let http_address = concrete_address(&addresses.http)?;
    let admin_address = concrete_address(&addresses.admin)?;
    std::fs::write(
        &config_path,
        demo_config(listen, &http_address, &admin_address, &cluster, &issuer),
    )?;
    crate::init_db::run(
        &config_path,
        Some(&cluster.admin_url(DATABASE)),
        &crate::init_db::Options::default(),
    )
    .await?;
    cluster
        .admin(DATABASE)
        .await?
        .batch_execute(TODOS_SQL)
        .await
        .context("creating the todos table")?;

    let prepared = crate::serve::prepare(&config_path)?;
    let listeners = crate::serve::listen(&prepared)
        .await
        .context("use --listen, --http-listen and --admin-listen to pick other addresses")?;
    let address = listeners.wire.local_addr()?;
    let token_a = issuer.token("user_alice");
    let token_b = issuer.token("user_bob");
    let http_url = format!("http://{http_address}/sql");
    let admin_url = format!("http://{admin_address}");
    let urls = Urls {
        http: &http_url,
        admin: &admin_url,
    };
    println!("{}", instructions(address, &urls, &token_a, &token_b, &dir));
    if let Some(env) = &env {
        write_env_file(env, address, &urls, &token_a, &token_b)?;
        println!("wrote {}", env.display());
    }
    crate::serve::run(prepared, listeners).await?;
    eprintln!("removing the demo cluster and its files");
    drop(cluster);
    Ok(())
}

/// Picks a free port when `address` asks for port 0, so the HTTP URL can be
/// printed before the listener starts.
fn concrete_address(address: &str) -> anyhow::Result<String> {
    let parsed: std::net::SocketAddr = address
        .parse()
        .with_context(|| format!("{address} is not an address:port"))?;
    if parsed.port() != 0 {
        return Ok(address.to_owned());
    }
    let probe = std::net::TcpListener::bind(parsed)?;
    Ok(probe.local_addr()?.to_string())
}

/// The demo's HTTP endpoints.
struct Urls<'a> {
    http: &'a str,
    admin: &'a str,
}

fn demo_config(
    listen: &str,
    http: &str,
    admin: &str,
    cluster: &Cluster,
    issuer: &Issuer,
) -> String {
    format!(
        r#"# Written by `authgres demo`.
secrets_file = "authgres.env"

[listen]
address = "{listen}"
tls_cert = "server.crt"
tls_key = "server.key"

[http]
address = "{http}"

[admin]
address = "{admin}"

[upstream]
host = "{host}"
port = {port}
databases = ["{DATABASE}"]

[roles.authenticated]
password_env = "AUTHGRES_AUTHENTICATED_PASSWORD"

# Access without a token is opt-in; the demo shows it. Without a token
# the role reads only (table_access), except where the schema grants more.
[roles.anonymous]
password_env = "AUTHGRES_ANONYMOUS_PASSWORD"
token = "none"

[[providers]]
name = "demo"
issuer = "{iss}"
jwks_url = "{jwks}"
roles = ["authenticated"]
"#,
        host = cluster.host(),
        port = cluster.port(),
        iss = issuer.issuer(),
        jwks = issuer.jwks_url(),
    )
}

fn instructions(
    address: std::net::SocketAddr,
    urls: &Urls<'_>,
    token_a: &str,
    token_b: &str,
    dir: &Path,
) -> String {
    let (host, port) = (address.ip(), address.port());
    let conn = format!("host={host} port={port} dbname={DATABASE} user=authenticated");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nauthgres demo is running on {address} (Ctrl-C removes everything)\n"
    );
    let _ = writeln!(out, "As user_alice:");
    let _ = writeln!(
        out,
        "  PGPASSWORD='{token_a}' psql \"{conn}\" -c \"insert into todos (task) values ('alice''s task')\" -c \"select id, user_id, task from todos\"\n"
    );
    let _ = writeln!(out, "As user_bob:");
    let _ = writeln!(
        out,
        "  PGPASSWORD='{token_b}' psql \"{conn}\" -c \"select auth.user_id()\" -c \"select id, user_id, task from todos\"\n"
    );
    let _ = writeln!(out, "Anonymous (no token; auth.user_id() is NULL):");
    let _ = writeln!(
        out,
        "  psql \"host={host} port={port} dbname={DATABASE} user=anonymous\" -c \"select auth.user_id()\"\n"
    );
    let http_url = urls.http;
    let _ = writeln!(
        out,
        "Over HTTP, as the Neon serverless driver does (neonConfig.fetchEndpoint = '{http_url}'):"
    );
    let _ = writeln!(
        out,
        "  curl -s {http_url} -H 'Authorization: Bearer {token_a}' -H 'Neon-Connection-String: postgresql://authenticated@{address}/{DATABASE}' -d '{{\"query\": \"select * from todos\"}}'\n"
    );
    // The binary's own path works however the demo was started (`cargo run`
    // puts nothing named authgres on PATH).
    let exe = std::env::current_exe()
        .map(|path| path.display().to_string())
        .unwrap_or_else(|_| "authgres".to_owned());
    let state = if dir == default_state_dir() {
        String::new()
    } else {
        format!(" --state-dir {}", dir.display())
    };
    let _ = writeln!(
        out,
        "Metrics and health: {admin}/metrics {admin}/readyz {admin}/clients",
        admin = urls.admin
    );
    let _ = writeln!(out, "More tokens: {exe} token --sub user_carol{state}");
    out
}

fn write_env_file(
    path: &Path,
    address: std::net::SocketAddr,
    urls: &Urls<'_>,
    token_a: &str,
    token_b: &str,
) -> anyhow::Result<()> {
    let text = format!(
        "export PGHOST={}\nexport PGPORT={}\nexport PGDATABASE={DATABASE}\nexport PGUSER=authenticated\n\
         export AUTHGRES_TOKEN_A={token_a}\nexport AUTHGRES_TOKEN_B={token_b}\n\
         export AUTHGRES_HTTP_URL={}\nexport AUTHGRES_ADMIN_URL={}\n",
        address.ip(),
        address.port(),
        urls.http,
        urls.admin,
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Removes the demo's state directory however the demo ends.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
