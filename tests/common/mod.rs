//! The whole stack for end-to-end tests: a sandbox Postgres with the todos
//! schema, a local issuer, and the real `authgres` binary in front.

#![allow(dead_code, missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use authgres_sandbox::{Cluster, Issuer, tls::TestCerts};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub mod provision;

pub const DATABASE: &str = "app";
pub const BIN: &str = env!("CARGO_BIN_EXE_authgres");

/// Knobs that differ between tests.
pub struct Options {
    pub auth_timeout: &'static str,
    pub cleartext_tokens: &'static str,
    /// Run the cluster with TLS and have the proxy use `verify-full`
    /// against this CA: `Some(true)` the right CA, `Some(false)` a stranger's.
    pub upstream_tls: Option<bool>,
    pub enforce_token_expiry: bool,
    /// Extra server settings for the sandbox cluster.
    pub server_settings: &'static [&'static str],
    /// Extra lines for the config's [upstream] section.
    pub upstream_extra: &'static str,
    /// Extra lines for the config's [listen] section.
    pub listen_extra: &'static str,
    /// Serve HTTPS instead of HTTP on the [http] address.
    pub http_tls: bool,
    /// Extra lines for the config's [http] section.
    pub http_extra: &'static str,
    /// Log JSON lines (`--log-format json`).
    pub json_logs: bool,
}

/// What `/metrics` said: each sample as `name{label="value",...}` (labels
/// sorted), parsed by Python's prometheus_client.
pub type Samples = std::collections::BTreeMap<String, f64>;

impl Default for Options {
    fn default() -> Self {
        Self {
            auth_timeout: "2s",
            cleartext_tokens: "loopback",
            upstream_tls: None,
            enforce_token_expiry: false,
            server_settings: &[],
            upstream_extra: "",
            listen_extra: "",
            http_tls: false,
            http_extra: "",
            json_logs: false,
        }
    }
}

/// Who installs authgres in the sandbox: `AUTHGRES_TEST_ADMIN` =
/// `superuser` (the default: a self-hosted server), `owner` (a database
/// owner with CREATEROLE, as a managed service gives), or `owner-stats`
/// (that owner also in pg_read_all_stats, pg_signal_backend and
/// pg_monitor, as on RDS and Neon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Installer {
    Superuser,
    Owner,
    OwnerWithStats,
}

impl Installer {
    /// The one `AUTHGRES_TEST_ADMIN` selects.
    pub fn from_env() -> Self {
        match std::env::var("AUTHGRES_TEST_ADMIN").as_deref() {
            Ok("owner") => Self::Owner,
            Ok("owner-stats") => Self::OwnerWithStats,
            Ok("superuser") | Err(_) => Self::Superuser,
            Ok(other) => panic!("AUTHGRES_TEST_ADMIN={other}: superuser, owner or owner-stats"),
        }
    }

    /// Whether init-db runs without a superuser.
    pub fn managed(self) -> bool {
        self != Self::Superuser
    }
}

pub struct Stack {
    pub cluster: Cluster,
    /// Who ran init-db and created the schema, and their URL.
    pub installer: Installer,
    pub admin_url: String,
    /// What the first init-db printed.
    pub init_db_output: String,
    pub issuer: Issuer,
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// Port of the HTTP endpoint (/sql, WebSocket /v2).
    pub http_port: u16,
    /// Port of the admin listener (/metrics, /readyz, ...).
    pub admin_port: u16,
    pub ca_pem: String,
    proxy: Child,
    json_logs: bool,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        provision::system();
        let certs = TestCerts::generate().expect("certs");
        let cluster = match options.upstream_tls {
            None => {
                let settings = options.server_settings;
                tokio::task::spawn_blocking(move || Cluster::start_with_settings(settings)).await
            }
            Some(_) => {
                let certs = TestCerts {
                    ca_pem: certs.ca_pem.clone(),
                    cert_pem: certs.cert_pem.clone(),
                    key_pem: certs.key_pem.clone(),
                };
                tokio::task::spawn_blocking(move || Cluster::start_with_tls(&certs)).await
            }
        }
        .expect("join")
        .expect("sandbox cluster starts");
        let issuer = Issuer::start().await.expect("issuer starts");
        let dir = tempfile::tempdir().expect("tempdir");
        certs.write_to(dir.path()).expect("write certs");
        let upstream_tls = match options.upstream_tls {
            None => String::new(),
            Some(right_ca) => {
                let ca = if right_ca {
                    certs.ca_pem.clone()
                } else {
                    TestCerts::generate().expect("other CA").ca_pem
                };
                std::fs::write(dir.path().join("upstream-ca.pem"), ca).expect("write CA");
                "tls = \"verify-full\"\ntls_ca_file = \"upstream-ca.pem\"\n".to_owned()
            }
        };
        let port = free_port();
        let http_port = free_port();
        let admin_port = free_port();
        let config = format!(
            r#"secrets_file = "authgres.env"
[listen]
address = "127.0.0.1:{port}"
tls_cert = "server.crt"
tls_key = "server.key"
auth_timeout = "{auth_timeout}"
cleartext_tokens = "{cleartext}"
enforce_token_expiry = {enforce}
{listen_extra}
[upstream]
host = "127.0.0.1"
port = {pg_port}
databases = ["{DATABASE}"]
connect_timeout = "5s"
{upstream_extra}
{upstream_tls}[http]
address = "127.0.0.1:{http_port}"
tls = {http_tls}
{http_extra}
[admin]
address = "127.0.0.1:{admin_port}"
[roles.authenticated]
password_env = "AUTHGRES_AUTHENTICATED_PASSWORD"
[roles.anonymous]
password_env = "AUTHGRES_ANONYMOUS_PASSWORD"
token = "none"
[roles.reporting]
password_env = "AUTHGRES_REPORTING_PASSWORD"
[roles.person]
password_env = "AUTHGRES_PERSON_PASSWORD"
login = "oauthbearer"
[[providers]]
name = "sandbox"
issuer = "{iss}"
jwks_url = "{jwks}"
roles = ["authenticated", "person"]
"#,
            auth_timeout = options.auth_timeout,
            cleartext = options.cleartext_tokens,
            enforce = options.enforce_token_expiry,
            upstream_extra = options.upstream_extra,
            listen_extra = options.listen_extra,
            http_tls = options.http_tls,
            http_extra = options.http_extra,
            pg_port = cluster.port(),
            iss = issuer.issuer(),
            jwks = issuer.jwks_url(),
        );
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, config).expect("write config");
        let installer = Installer::from_env();
        let admin_url = create_database(&cluster, installer).await;
        let init_db_output = run_init_db(&config_path, &admin_url, &[]);
        connect_admin(&admin_url)
            .await
            .batch_execute(include_str!("../../sql/demo_todos.sql"))
            .await
            .expect("todos schema");
        let proxy = spawn_proxy(dir.path(), options.json_logs);
        let stack = Self {
            json_logs: options.json_logs,
            cluster,
            installer,
            admin_url,
            init_db_output,
            issuer,
            port,
            http_port,
            admin_port,
            ca_pem: certs.ca_pem,
            proxy,
            dir,
        };
        stack.wait_listening();
        stack
    }

    /// Runs `authgres init-db` again with extra arguments; returns stderr.
    pub fn init_db(&self, args: &[&str]) -> String {
        run_init_db(&self.config_path(), &self.admin_url, args)
    }

    /// Connects as whoever installed authgres (see [`Installer`]).
    pub async fn installer(&self) -> tokio_postgres::Client {
        connect_admin(&self.admin_url).await
    }

    /// Stops and starts `authgres serve` (it re-reads config and secrets).
    pub fn restart_proxy(&mut self) {
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
        self.proxy = spawn_proxy(self.dir.path(), self.json_logs);
        self.wait_listening();
    }

    /// A directory `name` inside the stack's with its secrets and
    /// certificates, and its config listening on `port` with a fresh HTTP
    /// port and the admin listener on `admin_port`, `extra` appended.
    fn fleet_dir(&self, name: &str, port: u16, admin_port: u16, extra: &str) -> PathBuf {
        let config = std::fs::read_to_string(self.config_path())
            .expect("config")
            .replace(
                &format!("\"127.0.0.1:{}\"", self.port),
                &format!("\"127.0.0.1:{port}\""),
            )
            .replace(
                &format!("\"127.0.0.1:{}\"", self.http_port),
                &format!("\"127.0.0.1:{}\"", free_port()),
            )
            .replace(
                &format!("\"127.0.0.1:{}\"", self.admin_port),
                &format!("\"127.0.0.1:{admin_port}\""),
            );
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).expect("dir");
        for file in ["authgres.env", "server.crt", "server.key", "ca.pem"] {
            std::fs::copy(self.dir.path().join(file), dir.join(file)).expect("copy");
        }
        std::fs::write(dir.join("proxy.toml"), config + extra).expect("config");
        dir
    }

    /// Starts another `authgres serve` with the same config on another
    /// port, as a second proxy in a fleet would run. Killed on drop.
    pub fn second_proxy(&self) -> SecondProxy {
        let port = free_port();
        let dir = self.fleet_dir(&format!("second-{port}"), port, free_port(), "");
        let child = spawn_proxy(&dir, self.json_logs);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "second proxy did not listen: {}",
                std::fs::read_to_string(dir.join("authgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        SecondProxy { child, port }
    }

    /// Another instance of the fleet on `port`: the stack's config with
    /// fresh HTTP and admin ports and `extra` appended (a `[cluster]`
    /// section). Started.
    pub fn instance(&self, port: u16, extra: &str) -> Instance {
        let admin_port = free_port();
        let dir = self.fleet_dir(&format!("instance-{port}"), port, admin_port, extra);
        let mut instance = Instance {
            port,
            admin_port,
            dir,
            child: None,
        };
        instance.start();
        instance
    }

    /// A secret from the stack's secrets file.
    pub fn secret(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("authgres.env")).expect("secrets");
        text.lines()
            .rev()
            .filter_map(|l| l.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())
            .unwrap_or_else(|| panic!("{name} not in the secrets file"))
    }

    /// The proxy's process id.
    pub fn proxy_pid(&self) -> u32 {
        self.proxy.id()
    }

    /// Sends `signal` to the proxy process.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = i32::try_from(self.proxy.id()).expect("pid");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("signal the proxy");
    }

    /// Waits up to `wait` for the proxy to exit; its status if it did.
    pub fn wait_exit(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(Some(status)) = self.proxy.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Rewrites the proxy's config file with `edit`.
    pub fn edit_config(&self, edit: impl FnOnce(String) -> String) {
        let path = self.config_path();
        let text = std::fs::read_to_string(&path).expect("config");
        std::fs::write(&path, edit(text)).expect("write config");
    }

    /// GETs `path` from the admin listener: status and body.
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://127.0.0.1:{}{path}", self.admin_port))
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// POSTs to `path` on the admin listener: status and body.
    pub async fn admin_post(&self, path: &str) -> (u16, String) {
        let response = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}{path}", self.admin_port))
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        let status = response.status().as_u16();
        (status, response.text().await.expect("body"))
    }

    /// Scrapes `/metrics` and parses it with Python's prometheus_client.
    pub async fn metrics(&self) -> Samples {
        let (status, text) = self.admin_get("/metrics").await;
        assert_eq!(status, 200, "{text}");
        parse_metrics(&text)
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = self.admin_get("/readyz").await;
            if status == 200 {
                return;
            }
            assert!(Instant::now() < deadline, "never ready: {body}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The /sql URL.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}/sql", self.http_port)
    }

    fn wait_listening(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && std::net::TcpStream::connect(("127.0.0.1", self.http_port)).is_ok()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("authgres did not listen; log:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("authgres.log")).unwrap_or_default()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("proxy.toml")
    }

    /// A libpq-style connection string through the proxy.
    pub fn conninfo(&self, user: &str, password: &str, extra: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={DATABASE} user={user} password='{}' {extra}",
            self.port,
            password.replace('\'', "\\'")
        )
    }

    /// tokio-postgres without TLS.
    pub async fn connect(
        &self,
        user: &str,
        token: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        self.connect_port(self.port, user, token).await
    }

    /// tokio-postgres as `authenticated` with a fresh token for `sub`.
    pub async fn login(&self, sub: &str) -> tokio_postgres::Client {
        self.connect("authenticated", &self.issuer.token(sub))
            .await
            .unwrap_or_else(|e| panic!("{sub} logs in: {e}"))
    }

    /// tokio-postgres without TLS to a proxy on `port`.
    pub async fn connect_port(
        &self,
        port: u16,
        user: &str,
        token: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let conninfo = self
            .conninfo(user, token, "sslmode=disable")
            .replace(&format!("port={} ", self.port), &format!("port={port} "));
        let (client, connection) =
            tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// tokio-postgres over TLS, trusting the test CA.
    pub async fn connect_tls(
        &self,
        user: &str,
        token: &str,
        extra: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) =
            tokio_postgres::connect(&self.conninfo(user, token, extra), self.tls_connector())
                .await?;
        tokio::spawn(connection);
        Ok(client)
    }

    pub fn tls_connector(&self) -> tokio_postgres_rustls::MakeRustlsConnect {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(cert.expect("CA pem")).expect("add CA");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        tokio_postgres_rustls::MakeRustlsConnect::new(config)
    }

    /// Runs the real psql with `token` as PGPASSWORD.
    pub fn psql(&self, user: &str, token: Option<&str>, sql: &[&str]) -> std::process::Output {
        let mut command = Command::new(psql_path());
        command
            .arg("-X")
            .arg("-A")
            .arg("-t")
            .arg("-v")
            .arg("ON_ERROR_STOP=1")
            .arg(format!(
                "host=127.0.0.1 port={} dbname={DATABASE} user={user}",
                self.port
            ))
            .env_remove("PGPASSWORD")
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null());
        if let Some(token) = token {
            command.env("PGPASSWORD", token);
        }
        for statement in sql {
            command.arg("-c").arg(statement);
        }
        command.output().expect("run psql")
    }
}

/// One more `authgres serve` of a fleet: the stack's config with its own
/// ports and extra sections; killed on drop.
pub struct Instance {
    pub port: u16,
    pub admin_port: u16,
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Instance {
    /// (Re)starts the process and waits until it listens.
    pub fn start(&mut self) {
        self.child = Some(spawn_proxy(&self.dir, false));
        wait_port(self.port, || self.log());
    }

    /// Starts another process on the same config without waiting (a
    /// successor taking over through the handover socket).
    pub fn spawn_successor(&self) -> Child {
        spawn_proxy(&self.dir, false)
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(child) = &self.child {
            let pid = i32::try_from(child.id()).expect("pid");
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// Waits for the process to exit; its status.
    pub fn wait_exit(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until its `/readyz` answers 200.
    pub async fn wait_ready(&self) {
        let url = format!("http://127.0.0.1:{}/readyz", self.admin_port);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = reqwest::get(&url).await
                && response.status() == 200
            {
                return;
            }
            assert!(Instant::now() < deadline, "never ready: {}", self.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Makes `child` (a successor that took over) this instance's process.
    pub fn adopt(&mut self, child: Child) {
        self.kill();
        self.child = Some(child);
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("authgres.log")).unwrap_or_default()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- {} log ---\n{}", self.dir.display(), self.log());
        }
    }
}

fn wait_port(port: u16, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "no listener on {port}: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Debian's HAProxy in TCP mode, round robin over `backends` (wire port,
/// admin port), health-checked on `/readyz` every 100 ms, retrying a
/// refused connection on another backend. With `send_proxy`, it connects
/// from [`HAPROXY_SOURCE`] and begins each connection with a PROXY protocol
/// v2 header (`send-proxy-v2`), as docs/scale-out.md configures it.
/// Stopped on drop.
pub struct Haproxy {
    pub port: u16,
    child: Child,
}

/// The address HAProxy connects to the backends from when it sends PROXY
/// headers: the one address the instances trust, so instances forwarding
/// cancels to each other from 127.0.0.1 are plain clients.
pub const HAPROXY_SOURCE: &str = "127.0.0.2";

impl Haproxy {
    pub fn start(dir: &Path, backends: &[(u16, u16)], send_proxy: bool) -> Self {
        provision::system();
        let port = free_port();
        let proxy = if send_proxy {
            format!(" send-proxy-v2 source {HAPROXY_SOURCE}")
        } else {
            String::new()
        };
        let servers: String = backends
            .iter()
            .enumerate()
            .map(|(i, (wire, admin))| {
                format!("  server authgres{i} 127.0.0.1:{wire} check port {admin}{proxy}\n")
            })
            .collect();
        let config = format!(
            "global\n  maxconn 2000\n\
             defaults\n  mode tcp\n  timeout connect 2s\n  timeout client 120s\n  timeout server 120s\n\
             \x20 retries 3\n  option redispatch 1\n\
             listen postgres\n  bind 127.0.0.1:{port}\n  balance roundrobin\n\
             \x20 option httpchk GET /readyz\n  http-check expect status 200\n\
             \x20 default-server inter 100ms fall 1 rise 2\n{servers}"
        );
        let path = dir.join(format!("haproxy-{port}.cfg"));
        std::fs::write(&path, config).expect("haproxy config");
        let log = std::fs::File::create(dir.join(format!("haproxy-{port}.log"))).expect("log");
        let binary = if Path::new("/usr/sbin/haproxy").is_file() {
            PathBuf::from("/usr/sbin/haproxy")
        } else {
            PathBuf::from("haproxy")
        };
        let child = Command::new(binary)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start haproxy");
        wait_port(port, String::new);
        Self { port, child }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A second proxy process; killed on drop.
pub struct SecondProxy {
    child: Child,
    pub port: u16,
}

impl Drop for SecondProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
        if std::thread::panicking() {
            eprintln!("--- authgres log ---\n{}", self.log());
        }
    }
}

/// Creates the test database as `installer` would have it; returns the
/// URL init-db and the schema run with.
async fn create_database(cluster: &Cluster, installer: Installer) -> String {
    let predefined: &[&str] = match installer {
        Installer::Superuser => {
            cluster
                .admin("postgres")
                .await
                .expect("admin")
                .batch_execute(&format!("create database {DATABASE}"))
                .await
                .expect("create database");
            return cluster.admin_url(DATABASE);
        }
        Installer::Owner => &[],
        Installer::OwnerWithStats => &["pg_read_all_stats", "pg_signal_backend", "pg_monitor"],
    };
    cluster
        .create_managed_owner(DATABASE, predefined)
        .await
        .expect("managed owner")
}

/// A connection to `url`, run on a spawned task.
pub async fn connect_admin(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("administrator connects");
    tokio::spawn(connection);
    client
}

fn run_init_db(config: &Path, admin_url: &str, args: &[&str]) -> String {
    let init = Command::new(BIN)
        .args(["init-db", "--config"])
        .arg(config)
        .args(["--admin-url", admin_url])
        .args(args)
        .env("PGSSLMODE", "disable")
        .output()
        .expect("run init-db");
    let stderr = String::from_utf8_lossy(&init.stderr).into_owned();
    assert!(init.status.success(), "init-db {args:?} failed: {stderr}");
    stderr
}

fn spawn_proxy(dir: &Path, json_logs: bool) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("authgres.log"))
        .expect("log file");
    Command::new(BIN)
        .args(["serve", "--config"])
        .arg(dir.join("proxy.toml"))
        .env("AUTHGRES_LOG", "info,authgres_wire=debug")
        .env(
            "AUTHGRES_LOG_FORMAT",
            if json_logs { "json" } else { "text" },
        )
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn authgres serve")
}

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

/// Parses Prometheus text with the Python client's own parser (a real
/// consumer of the format, not ours), into sample name with sorted labels
/// → value.
pub fn parse_metrics(text: &str) -> Samples {
    use std::io::Write as _;
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .env("PYTHONPATH", provision::python_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics");
    let output = child.wait_with_output().expect("parser");
    assert!(
        output.status.success(),
        "prometheus_client refused the exposition: {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("parser output")
}

pub fn psql_path() -> PathBuf {
    if let Ok(dir) = authgres_sandbox::find_postgres_bindir()
        && dir.join("psql").is_file()
    {
        return dir.join("psql");
    }
    PathBuf::from("psql")
}

/// A free loopback port (see [`authgres_sandbox::free_port`]).
pub fn free_port() -> u16 {
    authgres_sandbox::free_port().expect("a free port")
}

/// A hand-driven Postgres client for what drivers will not do: watching a
/// connection close, sending bytes out of order, never answering.
pub struct RawClient {
    pub stream: tokio::net::TcpStream,
}

impl RawClient {
    pub async fn connect(port: u16) -> Self {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        Self { stream }
    }

    /// Connects from the loopback address `source` (127.0.0.0/8 is all
    /// local on Linux), to act as another host.
    pub async fn connect_from(port: u16, source: [u8; 4]) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind((std::net::Ipv4Addr::from(source), 0).into())
            .expect("bind");
        let stream = socket
            .connect(([127, 0, 0, 1], port).into())
            .await
            .expect("connect");
        Self { stream }
    }

    /// Logs in as `user` (with `token` when the role needs one) and reads
    /// up to the first ReadyForQuery.
    pub async fn login(port: u16, user: &str, token: Option<&str>) -> Self {
        let mut raw = Self::connect(port).await;
        raw.send_startup(&[("user", user), ("database", DATABASE)])
            .await;
        if let Some(token) = token {
            raw.send_password(token).await;
        }
        raw.read_until(b'Z').await;
        raw
    }

    /// Sends raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Reads messages up to and including one tagged `tag`; returns their
    /// tags.
    pub async fn read_until(&mut self, tag: u8) -> Vec<u8> {
        let mut tags = Vec::new();
        loop {
            let (got, body) = self
                .read_message()
                .await
                .unwrap_or_else(|| panic!("closed before {:?}; saw {tags:?}", char::from(tag)));
            if got == b'E' && tag != b'E' && error_fields(&body).0.starts_with("08") {
                panic!("connection error: {:?}", error_fields(&body));
            }
            tags.push(got);
            if got == tag {
                return tags;
            }
        }
    }

    pub async fn send_startup(&mut self, params: &[(&str, &str)]) {
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::startup_message(params.iter().copied(), &mut buf)
            .expect("encode");
        self.stream.write_all(&buf).await.expect("write");
    }

    pub async fn send_password(&mut self, password: &str) {
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::password_message(password.as_bytes(), &mut buf)
            .expect("encode");
        self.stream.write_all(&buf).await.expect("write");
    }

    /// Reads one backend message: (tag, body).
    pub async fn read_message(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        let read =
            tokio::time::timeout(Duration::from_secs(10), self.stream.read_exact(&mut header))
                .await
                .expect("no reply within 10s");
        read.ok()?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let mut body = vec![0u8; len.saturating_sub(4)];
        self.stream.read_exact(&mut body).await.ok()?;
        Some((header[0], body))
    }

    /// Reads until an ErrorResponse; returns its SQLSTATE and message.
    pub async fn expect_error(&mut self) -> (String, String) {
        loop {
            let (tag, body) = self
                .read_message()
                .await
                .expect("an ErrorResponse before EOF");
            if tag == b'E' {
                return error_fields(&body);
            }
        }
    }

    /// Whether the server closed the connection (EOF) within `wait`.
    pub async fn closed_within(&mut self, wait: Duration) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(wait, self.stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// A frontend message: tag, length, body.
pub fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&u32::try_from(body.len() + 4).expect("fits").to_be_bytes());
    out.extend_from_slice(body);
    out
}

pub fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    for field in body.split(|b| *b == 0).filter(|f| !f.is_empty()) {
        let value = String::from_utf8_lossy(&field[1..]).into_owned();
        match field[0] {
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    (code, message)
}

pub fn stdout(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

pub fn path_exists(path: &Path) -> bool {
    path.exists()
}
