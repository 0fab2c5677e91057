//! Reaching the stack's proxy as a client: connection strings,
//! tokio-postgres with and without TLS, the real psql, the `/sql` URL.

use std::process::{Command, Stdio};
use std::sync::Arc;

use super::{DATABASE, Stack, psql_path};

impl Stack {
    /// The /sql URL.
    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}/sql", self.http_port)
    }

    /// A `/sql` request as the Neon driver sends it, as `authenticated`
    /// to the stack's database with `token`, carrying `body`.
    pub fn sql_post(&self, token: &str, body: &'static str) -> reqwest::RequestBuilder {
        reqwest::Client::new()
            .post(self.http_url())
            .header("Authorization", format!("Bearer {token}"))
            .header(
                "Neon-Connection-String",
                format!("postgresql://authenticated@127.0.0.1/{DATABASE}"),
            )
            .body(body)
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

    /// The operators' console as `ops` (an admin user).
    pub async fn console_ops(&self) -> tokio_postgres::Client {
        let conninfo = format!(
            "host=127.0.0.1 port={} dbname={} user=ops password={} sslmode=disable",
            self.port,
            super::CONSOLE_DATABASE,
            super::CONSOLE_OPS_PASSWORD
        );
        let (client, connection) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
            .await
            .expect("ops logs in to the console");
        tokio::spawn(connection);
        client
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
