//! The [`Stack`] every end-to-end test starts: a sandbox Postgres with the
//! todos schema, a local issuer, and the real `authgres serve` in front,
//! configured from [`Options`]; restarting, signalling and reconfiguring
//! that proxy process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use authgres_sandbox::{Cluster, Issuer, tls::TestCerts};

use super::installer::{Installer, connect_admin, create_database, run_init_db};
use super::{BIN, DATABASE, free_port, provision};

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
    /// Extra lines for the config's [admin] section.
    pub admin_extra: &'static str,
}

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
            admin_extra: "",
        }
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
    pub(super) json_logs: bool,
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
{admin_extra}
[console]
admin_users = {{ ops = "AUTHGRES_CONSOLE_OPS_PASSWORD" }}
stats_users = {{ grafana = "AUTHGRES_CONSOLE_GRAFANA_PASSWORD" }}
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
            admin_extra = options.admin_extra,
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

    /// Runs `authgres init-db` with the stack's config against another
    /// database (a tenant's, another server's).
    pub fn init_db_at(&self, admin_url: &str) -> String {
        run_init_db(&self.config_path(), admin_url, &[])
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

    /// Waits (up to 10 s) until the proxy's log contains `needle`.
    pub async fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "log never said {needle:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("authgres.log")).unwrap_or_default()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("proxy.toml")
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

/// Starts `authgres serve` on the `proxy.toml` in `dir`, logging to
/// `authgres.log` there.
pub(super) fn spawn_proxy(dir: &Path, json_logs: bool) -> Child {
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
        .env("AUTHGRES_CONSOLE_OPS_PASSWORD", super::CONSOLE_OPS_PASSWORD)
        .env(
            "AUTHGRES_CONSOLE_GRAFANA_PASSWORD",
            super::CONSOLE_GRAFANA_PASSWORD,
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn authgres serve")
}
