//! `authgres check-config`: loads a config the way `serve` would and
//! prints what it means, section by section; missing secrets are reported,
//! not fatal (`init-db` may not have run yet).

use std::path::Path;

use authgres_jwt::{KeySource, ProviderConfig};

use crate::config::{Loaded, TokenPolicy};

/// Validates a config and prints what it means. Missing secrets are
/// reported, not fatal: `init-db` may not have run yet.
pub fn check_config(config: &Path) -> anyhow::Result<()> {
    let loaded = Loaded::from_path(config)?;
    let providers = loaded.providers()?;
    let file = &loaded.file;
    let tls = loaded.tls()?.is_some();
    // Builds the upstream TLS settings too, so a bad CA file fails here.
    let proxy = loaded.proxy_config();
    println!("config {}", config.display());
    println!(
        "listen   {} (TLS {}), tokens over cleartext: {:?}",
        file.listen.address,
        if tls { "on" } else { "off" },
        file.listen.cleartext_tokens
    );
    if let Some(warning) = listen_warning(&file.listen.address, tls, file.listen.cleartext_tokens) {
        println!("warning: {warning}");
    }
    print_proxy_protocol("listen", &file.listen.proxy_protocol_from);
    if let Some(http) = &file.http {
        println!(
            "http     {} (TLS {})",
            http.address,
            if http.tls { "on" } else { "off" }
        );
        print_proxy_protocol("http", &http.proxy_protocol_from);
    }
    if let Some(admin) = &file.admin {
        let limits = admin.limits()?;
        println!(
            "admin    {} (/metrics /healthz /readyz /pools /clients /identities /tenants, \
             POST /reload), at most {} connections",
            admin.address(&loaded),
            limits.max_connections
        );
    }
    if let Some(audit) = file.audit.as_ref().filter(|a| a.enabled) {
        println!(
            "audit    one line per {}, statement text {}, to {} (a full queue drops, counted)",
            format!("{:?}", audit.per).to_lowercase(),
            format!("{:?}", audit.statements).to_lowercase(),
            audit.output
        );
    }
    print_upstream(file);
    let missing = print_roles_and_providers(&loaded, &providers);
    if loaded.secrets.get(&file.identity.claims_key_env).is_some() {
        loaded.claims_key()?;
    }
    if missing.is_empty() {
        proxy?;
        println!("ok: the proxy can start with this config");
        Ok(())
    } else {
        anyhow::bail!(
            "missing secrets: {} (run `authgres init-db` or set them)",
            missing.join(", ")
        )
    }
}

/// The upstream server and its databases.
fn print_upstream(file: &crate::config::FileConfig) {
    println!(
        "upstream {}:{} (TLS {:?}), databases: {}",
        file.upstream.host,
        file.upstream.port,
        file.upstream.tls,
        if file.upstream.databases.is_empty() {
            "any".to_owned()
        } else {
            file.upstream.databases.join(", ")
        }
    );
}

/// Each role with its password's state, and each provider; returns the
/// secrets that are missing.
fn print_roles_and_providers(loaded: &Loaded, providers: &[ProviderConfig]) -> Vec<String> {
    let file = &loaded.file;
    let mut missing = Vec::new();
    for (name, role) in &file.roles {
        let password = match &role.password_env {
            Some(var) if loaded.secrets.get(var).is_some() => "set",
            Some(var) => {
                missing.push(var.clone());
                "MISSING"
            }
            None => "none (trust)",
        };
        println!(
            "role     {name}: {}, upstream password {password}",
            match role.token {
                TokenPolicy::Required => "token required",
                TokenPolicy::None => "anonymous (no token)",
            }
        );
    }
    for p in providers {
        println!(
            "provider {}: iss {} keys {} roles [{}]{}{}",
            p.name,
            p.issuer,
            match &p.keys {
                KeySource::Jwks(url) => url.clone(),
                KeySource::Discovery => "via OIDC discovery".to_owned(),
                KeySource::SharedSecretOnly => "shared secret only".to_owned(),
            },
            p.roles.join(", "),
            if p.audience.is_empty() {
                String::new()
            } else {
                format!(" aud [{}]", p.audience.join(", "))
            },
            match (&p.user_ids.prefix, p.user_ids.shared) {
                (Some(prefix), _) => format!(" user ids {prefix:?} + sub"),
                (None, true) => " user ids sub (shared)".to_owned(),
                (None, false) => String::new(),
            }
        );
    }
    if loaded.secrets.get(&file.identity.claims_key_env).is_none() {
        missing.push(file.identity.claims_key_env.clone());
    }
    missing
}

/// Names the peers a listener takes a PROXY protocol v2 header from, and
/// the trust that gives them.
fn print_proxy_protocol(section: &str, trusted: &[crate::config::Trusted]) {
    if trusted.is_empty() {
        return;
    }
    let blocks: Vec<String> = trusted.iter().map(|t| t.0.to_string()).collect();
    println!(
        "{section:<8} PROXY protocol v2 header required from {} (they may claim any client \
         address)",
        blocks.join(", ")
    );
}

/// What check-config says of a Postgres listener reachable from other
/// hosts without a certificate: every remote token login is refused
/// (unless cleartext tokens are allowed, when they travel in the clear).
fn listen_warning(
    address: &str,
    tls: bool,
    cleartext: authgres_wire::CleartextTokens,
) -> Option<String> {
    let loopback = address
        .parse::<std::net::SocketAddr>()
        .map(|a| a.ip().is_loopback())
        .unwrap_or_else(|_| address.starts_with("localhost:"));
    if tls || loopback {
        return None;
    }
    Some(match cleartext {
        authgres_wire::CleartextTokens::Allow => format!(
            "{address} is reachable from other hosts without TLS, and cleartext_tokens = \
             \"allow\": tokens travel unencrypted; set [listen] tls_cert and tls_key"
        ),
        _ => format!(
            "{address} is reachable from other hosts without TLS: every token login from \
             another host will be refused; set [listen] tls_cert and tls_key"
        ),
    })
}
