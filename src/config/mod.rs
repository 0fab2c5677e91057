//! `proxy.toml`: parsing, defaults, secrets, and conversion into the
//! libraries' settings. Every key is documented in the repository's
//! `proxy.toml`.

mod admin;
mod audit;
mod cluster;
mod console;
mod databases;
mod entries;
mod fixed;
mod http;
mod limits;
mod listen;
mod metrics;
mod providers;
mod roles;
mod secrets;
mod upstream;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use authgres_wire::{
    ClaimsKey, ClientLimits, ConnectionLimits, Policy, ProxyConfig, RoleConfig, UpstreamConfig,
    UpstreamTls,
};
use serde::{Deserialize, Serialize};

use providers::check_user_ids;
use roles::default_roles;

pub use admin::AdminSection;
pub use audit::AuditSection;
pub use cluster::ClusterSection;
pub use console::ConsoleSection;
pub use databases::DatabaseSection;
pub use fixed::{Fixed, restart_diff};
pub use http::HttpSection;
pub use listen::{ListenSection, Trusted, proxy_protocol_from};
pub use metrics::MetricsSection;
pub use providers::Provider;
pub use roles::{IdentitySection, Role, TableAccess, TokenPolicy};
pub use secrets::Secrets;
pub use upstream::{UpstreamSection, UpstreamTlsMode};

/// The file as written.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// KEY=VALUE file with secrets; environment variables override it.
    pub secrets_file: Option<PathBuf>,
    #[serde(default)]
    pub listen: ListenSection,
    #[serde(default)]
    pub upstream: UpstreamSection,
    /// `[databases.<name>]`: names that lead to another server, database
    /// or one database per tenant.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub databases: BTreeMap<String, DatabaseSection>,
    #[serde(default)]
    pub identity: IdentitySection,
    #[serde(default = "default_roles")]
    pub roles: BTreeMap<String, Role>,
    #[serde(default)]
    pub providers: Vec<Provider>,
    /// `[http]`: absent disables HTTP.
    pub http: Option<HttpSection>,
    /// `[admin]`: absent disables the admin listener.
    pub admin: Option<AdminSection>,
    /// `[cluster]`: absent means the instance runs alone.
    pub cluster: Option<ClusterSection>,
    /// `[console]`: absent disables the operators' console.
    pub console: Option<ConsoleSection>,
    /// `[audit]`: absent disables the audit log.
    pub audit: Option<AuditSection>,
    /// `[metrics]`: per-identity counting.
    #[serde(default)]
    pub metrics: MetricsSection,
}

/// A config file with its secrets resolved.
pub struct Loaded {
    pub file: FileConfig,
    /// Directory of the config file; relative paths are resolved from it.
    pub base: PathBuf,
    pub secrets: Secrets,
}

impl Loaded {
    /// Reads and checks `path`.
    pub fn from_path(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        let file: FileConfig =
            toml::from_str(&text).with_context(|| format!("parsing config {}", path.display()))?;
        check_user_ids(&file, &text)
            .with_context(|| format!("checking config {}", path.display()))?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let secrets = Secrets::load(file.secrets_file.as_ref().map(|p| base.join(p)))?;
        Ok(Self {
            file,
            base,
            secrets,
        })
    }

    /// Resolves a path from the config against the config's directory.
    pub fn path(&self, relative: &Path) -> PathBuf {
        self.base.join(relative)
    }

    /// The claims key, or an error naming where to put it.
    pub fn claims_key(&self) -> anyhow::Result<ClaimsKey> {
        let name = &self.file.identity.claims_key_env;
        let hex = self
            .secrets
            .get(name)
            .with_context(|| format!("{name} is not set: run `authgres init-db` or set it"))?;
        ClaimsKey::from_hex(&hex).with_context(|| format!("{name} is not a valid claims key"))
    }

    /// The `[upstream]` server.
    pub(super) fn upstream_config(&self) -> anyhow::Result<UpstreamConfig> {
        let listen = &self.file.listen;
        Ok(UpstreamConfig {
            host: self.file.upstream.host.clone(),
            port: self.file.upstream.port,
            connect_timeout: self.file.upstream.connect_timeout,
            tls: match self.file.upstream.tls {
                UpstreamTlsMode::Disable => UpstreamTls::Disable,
                UpstreamTlsMode::VerifyFull => UpstreamTls::verify_full(
                    self.file
                        .upstream
                        .tls_ca_file
                        .as_ref()
                        .map(|p| self.path(p))
                        .as_deref(),
                )
                .context("[upstream] tls")?,
            },
            tcp_keepalive: enabled(listen.tcp_keepalive),
        })
    }

    /// Wire settings.
    pub fn proxy_config(&self) -> anyhow::Result<ProxyConfig> {
        let mut roles = HashMap::new();
        for (name, role) in &self.file.roles {
            let password = match &role.password_env {
                Some(var) => Some(self.secrets.get(var).with_context(|| {
                    format!("role {name:?}: {var} is not set: run `authgres init-db` or set it")
                })?),
                None => None,
            };
            roles.insert(
                name.clone(),
                RoleConfig {
                    password,
                    requires_token: role.token == TokenPolicy::Required,
                    login: self.token_login(name, role)?,
                },
            );
        }
        let listen = &self.file.listen;
        let upstream = self.upstream_config()?;
        let (routes, entry_pool_modes) = self.routes(&upstream)?;
        let mut pool_mode_by_database = self.file.upstream.pool_mode_by_database.clone();
        pool_mode_by_database.extend(entry_pool_modes);
        Ok(ProxyConfig {
            upstream,
            admission: Policy {
                roles,
                databases: self.file.upstream.databases.clone(),
                routes,
                cleartext_tokens: listen.cleartext_tokens,
                tls_offered: listen.tls_cert.is_some(),
            },
            auth_timeout: listen.auth_timeout,
            proxy_protocol_from: proxy_protocol_from(&listen.proxy_protocol_from),
            connections: ConnectionLimits {
                max_connections: listen.max_connections,
                max_unauthenticated: listen.max_unauthenticated.min(listen.max_connections),
                max_unauthenticated_per_source: listen.max_unauthenticated_per_source,
            },
            client_limits: ClientLimits {
                idle_in_transaction: enabled(listen.idle_transaction_timeout),
                stalled_reader: enabled(listen.client_write_timeout),
            },
            tcp_keepalive: enabled(listen.tcp_keepalive),
            enforce_token_expiry: listen.enforce_token_expiry,
            pool_mode: self.file.upstream.pool_mode,
            pool_mode_by_database,
            pool_limits: {
                let upstream = &self.file.upstream;
                upstream.pool_limits(upstream.pool_size, upstream.checkout_timeout)
            },
            cluster: self.cluster()?,
            console: self.console()?,
            audit: self.audit()?,
            usage: self.usage()?,
            identity_limits: self.identity_limits()?,
        })
    }
}

/// A duration setting where zero means "off".
pub(super) fn enabled(duration: Duration) -> Option<Duration> {
    (!duration.is_zero()).then_some(duration)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use authgres_wire::TokenLogin;
    use providers::discovery_url;
    use secrets::parse_env_file;

    #[test]
    fn repository_example_config_parses() {
        let text = include_str!("../../proxy.toml");
        let file: FileConfig = toml::from_str(text).expect("proxy.toml parses");
        assert!(file.roles.contains_key("authenticated"));
        assert!(!file.providers.is_empty());
    }

    #[test]
    fn commented_examples_in_proxy_toml_parse_too() {
        let uncommented: String = include_str!("../../proxy.toml")
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if rest.starts_with('[')
                        || rest.split_once(" = ").is_some_and(|(key, _)| {
                            !key.is_empty()
                                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                        }) =>
                {
                    rest
                }
                _ => line,
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let file: FileConfig = toml::from_str(&uncommented).expect("uncommented proxy.toml parses");
        check_user_ids(&file, &uncommented).expect("its providers name their users apart");
        let names: Vec<_> = file.providers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["clerk", "auth0", "supabase"]);
        assert!(file.listen.tls_cert.is_some());
        let cluster = file.cluster.expect("[cluster]");
        assert_eq!((cluster.instance_id, cluster.peers.len()), (1, 2));
    }

    /// A config from `text`, with no secrets file.
    pub(super) fn loaded(text: &str) -> Loaded {
        Loaded {
            file: toml::from_str(text).expect("parses"),
            base: PathBuf::from("."),
            secrets: Secrets {
                file: None,
                values: HashMap::new(),
            },
        }
    }

    const OAUTH_ROLE: &str = "[roles.person]\nlogin = \"oauthbearer\"\n";
    const PROVIDER: &str = "[[providers]]\nname = \"a\"\nissuer = \"https://id.example/\"\n\
                            jwks_url = \"https://id.example/jwks\"\n";

    #[test]
    fn an_oauthbearer_role_is_sent_to_its_one_provider() {
        let config = loaded(&format!("{OAUTH_ROLE}{PROVIDER}roles = [\"person\"]\n"));
        let role = &config.proxy_config().expect("valid").admission.roles["person"];
        assert_eq!(
            role.login,
            TokenLogin::OAuthBearer {
                discovery_url: "https://id.example//.well-known/openid-configuration".into(),
                scope: "openid".into(),
            }
        );
    }

    #[test]
    fn discovery_urls_give_libpq_back_the_exact_issuer() {
        assert_eq!(
            discovery_url("https://id.example"),
            "https://id.example/.well-known/openid-configuration"
        );
        // libpq cuts at "/.well-known/": "https://t.auth0.com/" again.
        assert_eq!(
            discovery_url("https://t.auth0.com/"),
            "https://t.auth0.com//.well-known/openid-configuration"
        );
        let given = "https://id.example/.well-known/oauth-authorization-server";
        assert_eq!(discovery_url(given), given);
    }

    #[test]
    fn an_oauthbearer_role_needs_exactly_one_provider_and_a_token() {
        let two = format!(
            "{OAUTH_ROLE}{PROVIDER}roles = [\"person\"]\n{}roles = [\"person\"]\n",
            PROVIDER.replace("\"a\"", "\"b\"")
        );
        for (text, expected) in [
            (format!("{OAUTH_ROLE}{PROVIDER}"), "found 0"),
            (two, "found 2"),
            (
                format!("{OAUTH_ROLE}token = \"none\"\n{PROVIDER}roles = [\"person\"]\n"),
                "needs token = \"required\"",
            ),
        ] {
            let error = loaded(&text).proxy_config().expect_err("refused");
            assert!(format!("{error:#}").contains(expected), "{error:#}");
        }
    }

    /// Issue 21 item 5: an identity was a sub without its issuer.
    #[test]
    fn two_providers_in_one_user_namespace_are_refused_with_where_and_how() {
        let b = PROVIDER
            .replace("\"a\"", "\"b\"")
            .replace("id.example", "other.example");
        let text = format!("{PROVIDER}{b}");
        let file: FileConfig = toml::from_str(&text).expect("parses");
        let error = format!("{:#}", check_user_ids(&file, &text).expect_err("refused"));
        for expected in [
            "providers \"a\" (line 1, column 1) and \"b\" (line 5, column 1)",
            "both serve role \"authenticated\"",
            "user_id_prefix = \"b:\"",
            "shared_user_ids = true under both",
        ] {
            assert!(error.contains(expected), "{expected:?} in {error}");
        }
        for (fix, ok) in [
            ("user_id_prefix = \"a:\"\n", "user_id_prefix = \"b:\"\n"),
            ("shared_user_ids = true\n", "shared_user_ids = true\n"),
            // A bare provider may stay beside a prefixed one.
            ("", "user_id_prefix = \"b:\"\n"),
        ] {
            let text = format!("{PROVIDER}{fix}{b}{ok}");
            let file: FileConfig = toml::from_str(&text).expect("parses");
            check_user_ids(&file, &text).expect("fixed");
        }
        let nested = format!("{PROVIDER}user_id_prefix = \"a\"\n{b}user_id_prefix = \"ab\"\n");
        let file: FileConfig = toml::from_str(&nested).expect("parses");
        let error = format!("{:#}", check_user_ids(&file, &nested).expect_err("nested"));
        assert!(error.contains("starts with the other"), "{error}");
        let single: FileConfig = toml::from_str(PROVIDER).expect("parses");
        check_user_ids(&single, PROVIDER).expect("one provider needs nothing");
    }

    #[test]
    fn proxy_protocol_from_takes_addresses_and_blocks_and_points_at_mistakes() {
        let config = loaded(
            "[listen]\nproxy_protocol_from = [\"10.0.0.0/8\", \"192.0.2.7\", \"2001:db8::/32\"]\n\
             [http]\naddress = \"127.0.0.1:0\"\nproxy_protocol_from = [\"127.0.0.2\"]\n\
             [roles.web]\n",
        );
        let wire = config.proxy_config().expect("valid").proxy_protocol_from;
        assert!(wire.contains([10, 1, 2, 3].into()));
        assert!(wire.contains([192, 0, 2, 7].into()));
        assert!(!wire.contains([192, 0, 2, 8].into()));
        let http = config.http().expect("[http]").proxy_protocol_from;
        assert!(http.contains([127, 0, 0, 2].into()));
        assert!(!http.contains([10, 1, 2, 3].into()));
        for (entry, expected) in [
            ("\"10.0.0.1/8\"", "did you mean \"10.0.0.0/8\""),
            ("\"balancer.internal\"", "not an IP address or CIDR block"),
            ("10", "invalid type"),
        ] {
            let text = format!(
                "[listen]\naddress = \"127.0.0.1:6432\"\nproxy_protocol_from = [{entry}]\n"
            );
            let error = toml::from_str::<FileConfig>(&text).expect_err("refused");
            let message = error.to_string();
            assert!(message.contains(expected), "{message}");
            assert!(message.contains("line 3, column"), "{message}");
        }
    }

    #[test]
    fn env_file_lines() {
        let parsed = parse_env_file("# c\nA=1\nexport B=\"two\"\n\nC = x=y\n");
        assert_eq!(parsed["A"], "1");
        assert_eq!(parsed["B"], "two");
        assert_eq!(parsed["C"], "x=y");
    }
}
