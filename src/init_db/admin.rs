//! The administrator's connection for `init-db`, found the way libpq finds
//! it: a `postgres://` URL or a `key=value` string (`--admin-url`, or the
//! `PGHOST`/`PGPORT`/`PGUSER`/`PGDATABASE` variables), the password from
//! the string, else `PGPASSWORD`, else the password file (`PGPASSFILE`,
//! `~/.pgpass`), so it never has to be on the command line where `ps`
//! shows it. TLS as `sslmode` says: `disable`; `prefer` (the default) and
//! `require` encrypt when the server offers it (`require`: or fail). In
//! every mode but `disable` the certificate and host name are checked
//! against `sslrootcert` or the platform's roots: stricter than libpq's
//! `prefer`/`require`, which do not check, because this connection carries
//! the administrator's password. Managed services present a certificate
//! from a public CA, or name the bundle to pass as `sslrootcert`.

use std::path::PathBuf;
use std::str::FromStr as _;

use anyhow::{Context as _, bail};
use tokio_postgres::config::{Host, SslMode};

/// Libpq parameters this module handles itself (tokio-postgres does not
/// know them).
const OWN_PARAMETERS: &[&str] = &["sslmode", "sslrootcert", "passfile"];

/// How long connecting may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// What `sslmode` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    Disable,
    /// Encrypt if offered (or insist: `require`), with the certificate
    /// checked when a root is available.
    Encrypt {
        insist: bool,
    },
    /// verify-ca / verify-full.
    Verify,
}

/// Connects as the administrator; the connection runs on a spawned task.
pub async fn connect(url: Option<&str>) -> anyhow::Result<tokio_postgres::Client> {
    let text = match url {
        Some(url) => url.to_owned(),
        None => from_environment(),
    };
    let (rest, mut own) = split_own(&text);
    // As libpq: the environment fills what the string leaves out.
    for (var, key) in [("PGSSLMODE", "sslmode"), ("PGSSLROOTCERT", "sslrootcert")] {
        if !own.iter().any(|(k, _)| k == key)
            && let Ok(value) = std::env::var(var)
        {
            own.push((key.to_owned(), value));
        }
    }
    let mut config = tokio_postgres::Config::from_str(&rest)
        .context("--admin-url is neither a postgres:// URL nor a key=value connection string")?;
    fill_from_environment(&mut config);
    config.connect_timeout(CONNECT_TIMEOUT);
    if config.get_password().is_none() {
        let passfile = own
            .iter()
            .find(|(k, _)| k == "passfile")
            .map(|(_, v)| PathBuf::from(v));
        if let Some(password) = password_for(&config, passfile)? {
            config.password(password);
        }
    }
    let mode = match own
        .iter()
        .find(|(k, _)| k == "sslmode")
        .map(|(_, v)| v.as_str())
    {
        None | Some("prefer" | "allow") => Tls::Encrypt { insist: false },
        Some("require") => Tls::Encrypt { insist: true },
        Some("verify-ca" | "verify-full") => Tls::Verify,
        Some("disable") => Tls::Disable,
        Some(other) => bail!("sslmode={other} is not a libpq sslmode"),
    };
    let root = own
        .iter()
        .find(|(k, _)| k == "sslrootcert")
        .map(|(_, v)| PathBuf::from(v));
    let who = describe(&config);
    let failed = || format!("connecting to {who} (--admin-url)");
    if mode == Tls::Disable {
        config.ssl_mode(SslMode::Disable);
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .with_context(failed)?;
        tokio::spawn(connection);
        return Ok(client);
    }
    config.ssl_mode(match mode {
        Tls::Encrypt { insist: false } => SslMode::Prefer,
        _ => SslMode::Require,
    });
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_config(root.as_deref())?);
    let (client, connection) = config.connect(tls).await.with_context(|| {
        format!(
            "{}; the server's TLS certificate is checked against {} \
             (sslmode=disable for a local server without TLS)",
            failed(),
            root.as_ref().map_or(
                "the platform's roots (or sslrootcert=FILE)".to_owned(),
                |p| { p.display().to_string() }
            )
        )
    })?;
    tokio::spawn(connection);
    Ok(client)
}

/// The TLS settings: `root`'s certificates, or the platform's roots.
fn client_config(root: Option<&std::path::Path>) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let Some(root) = root else {
        use rustls_platform_verifier::ConfigVerifierExt as _;
        return rustls::ClientConfig::with_platform_verifier()
            .context("loading the platform's TLS roots");
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(root)
        .with_context(|| format!("reading sslrootcert {}", root.display()))?
    {
        roots
            .add(cert.with_context(|| format!("parsing sslrootcert {}", root.display()))?)
            .with_context(|| format!("using sslrootcert {}", root.display()))?;
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The connection string the `PG*` variables describe.
fn from_environment() -> String {
    let mut parts = Vec::new();
    for (var, key) in [
        ("PGHOST", "host"),
        ("PGPORT", "port"),
        ("PGUSER", "user"),
        ("PGDATABASE", "dbname"),
        ("PGSSLMODE", "sslmode"),
        ("PGSSLROOTCERT", "sslrootcert"),
        ("PGPASSFILE", "passfile"),
    ] {
        if let Ok(value) = std::env::var(var) {
            parts.push(format!(
                "{key}='{}'",
                value.replace('\\', "\\\\").replace('\'', "\\'")
            ));
        }
    }
    parts.join(" ")
}

/// What the string left out and libpq would take from the environment.
fn fill_from_environment(config: &mut tokio_postgres::Config) {
    if config.get_hosts().is_empty() {
        config.host(std::env::var("PGHOST").as_deref().unwrap_or("localhost"));
    }
    if config.get_user().is_none() {
        let user = std::env::var("PGUSER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| "postgres".to_owned());
        config.user(&user);
    }
    if config.get_dbname().is_none()
        && let Ok(db) = std::env::var("PGDATABASE")
    {
        config.dbname(&db);
    }
    if config.get_ports().is_empty()
        && let Some(port) = std::env::var("PGPORT").ok().and_then(|p| p.parse().ok())
    {
        config.port(port);
    }
}

/// `user@host:port/db`, for messages (never the password).
fn describe(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_owned(),
    };
    format!(
        "{}@{host}:{}/{}",
        config.get_user().unwrap_or_default(),
        config.get_ports().first().copied().unwrap_or(5432),
        config
            .get_dbname()
            .unwrap_or(config.get_user().unwrap_or_default())
    )
}

/// Splits the parameters this module handles off `text`: returns the rest
/// (for tokio-postgres) and them.
fn split_own(text: &str) -> (String, Vec<(String, String)>) {
    let mut own = Vec::new();
    let mut take = |key: &str, value: &str| {
        let is_own = OWN_PARAMETERS.contains(&key);
        if is_own {
            own.push((key.to_owned(), value.to_owned()));
        }
        is_own
    };
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        let Some((base, query)) = text.split_once('?') else {
            return (text.to_owned(), own);
        };
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                !take(key, &percent_decode(value))
            })
            .collect();
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, own);
    }
    let kept: Vec<&str> = text
        .split_whitespace()
        .filter(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            !take(key.trim(), value.trim().trim_matches('\''))
        })
        .collect();
    (kept.join(" "), own)
}

/// `%XX` decoding for URL query values.
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b, hex) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The password for `config` from `PGPASSWORD` or the password file, as
/// libpq looks it up (first matching `host:port:database:user:password`
/// line; `*` matches anything; the file must not be group/world readable).
fn password_for(
    config: &tokio_postgres::Config,
    passfile: Option<PathBuf>,
) -> anyhow::Result<Option<String>> {
    if let Ok(password) = std::env::var("PGPASSWORD") {
        return Ok(Some(password));
    }
    let file = passfile
        .or_else(|| std::env::var_os("PGPASSFILE").map(PathBuf::from))
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".pgpass")));
    let Some(file) = file else {
        return Ok(None);
    };
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok(None);
    };
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file)?.permissions().mode();
        if mode & 0o077 != 0 {
            eprintln!(
                "warning: password file {} has group or world access; ignored, as libpq \
                 ignores it (chmod 0600 it)",
                file.display()
            );
            return Ok(None);
        }
    }
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        _ => "localhost".to_owned(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default();
    let database = config.get_dbname().unwrap_or(user);
    Ok(pgpass_lookup(&text, [&host, &port, database, user]))
}

/// The password of the first line of a password file matching `wanted`
/// (host, port, database, user).
fn pgpass_lookup(text: &str, wanted: [&str; 4]) -> Option<String> {
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let fields = split_pgpass(line);
        let [host, port, database, user, password] = fields.as_slice() else {
            continue;
        };
        let matches = [host, port, database, user]
            .iter()
            .zip(wanted)
            .all(|(field, want)| field.as_str() == "*" || field.as_str() == want);
        if matches {
            return Some(password.clone());
        }
    }
    None
}

/// A password-file line's fields: `:` separates, `\` escapes.
fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(next), Some(field)) = (chars.next(), fields.last_mut()) {
                    field.push(next);
                }
            }
            ':' if fields.len() < 5 => fields.push(String::new()),
            c => {
                if let Some(field) = fields.last_mut() {
                    field.push(c);
                }
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_parameters_are_taken_off_both_forms() {
        let (rest, own) = split_own(
            "postgres://a@h/db?sslmode=verify-full&sslrootcert=%2Ftmp%2Fca.pem&application_name=x",
        );
        assert_eq!(rest, "postgres://a@h/db?application_name=x");
        assert_eq!(
            own,
            [
                ("sslmode".to_owned(), "verify-full".to_owned()),
                ("sslrootcert".to_owned(), "/tmp/ca.pem".to_owned())
            ]
        );
        let (rest, own) = split_own("host=h user=a sslmode=disable dbname=db");
        assert_eq!(rest, "host=h user=a dbname=db");
        assert_eq!(own, [("sslmode".to_owned(), "disable".to_owned())]);
    }

    #[test]
    fn password_file_lines_match_as_libpq_matches_them() {
        let file = "# comment\nother:5432:*:a:nope\nh:*:db:a:pa\\:ss\n*:*:*:*:fallback\n";
        assert_eq!(
            pgpass_lookup(file, ["h", "5432", "db", "a"]).as_deref(),
            Some("pa:ss")
        );
        assert_eq!(
            pgpass_lookup(file, ["x", "1", "y", "z"]).as_deref(),
            Some("fallback")
        );
        assert_eq!(pgpass_lookup("h:1:db:a\n", ["h", "1", "db", "a"]), None);
    }
}
