//! `authgres serve` and `authgres check-config`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use authgres_jwt::Verifier;
use authgres_wire::Proxy;

use crate::config::Loaded;

/// Everything `serve` needs, built and checked from a config.
pub struct Prepared {
    pub proxy: Arc<Proxy>,
    pub address: String,
}

/// Builds the proxy from a loaded config; fails with what to fix.
pub fn prepare(loaded: &Loaded) -> anyhow::Result<Prepared> {
    let providers = loaded.providers()?;
    if providers.is_empty() {
        tracing::warn!("no [[providers]] configured: only token-less roles can log in");
    }
    let verifier = Arc::new(Verifier::new(providers)?);
    let proxy = Proxy::new(
        loaded.proxy_config()?,
        verifier,
        loaded.claims_key()?,
        loaded.tls()?,
    );
    Ok(Prepared {
        proxy: Arc::new(proxy),
        address: loaded.file.listen.address.clone(),
    })
}

/// Runs the proxy until Ctrl-C or SIGTERM.
pub async fn serve(config: &Path) -> anyhow::Result<()> {
    let loaded = Loaded::from_path(config)?;
    let prepared = prepare(&loaded)?;
    let listener = tokio::net::TcpListener::bind(&prepared.address)
        .await
        .with_context(|| format!("listening on {}", prepared.address))?;
    tracing::info!(address = %prepared.address, "authgres listening");
    authgres_wire::server::serve(prepared.proxy, listener, shutdown_signal()).await?;
    tracing::info!("shutting down");
    Ok(())
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

/// Validates a config and prints what it means.
pub fn check_config(config: &Path) -> anyhow::Result<()> {
    let loaded = Loaded::from_path(config)?;
    let providers = loaded.providers()?;
    let proxy = loaded.proxy_config()?;
    let claims = loaded.claims_key().map(|_| "set").unwrap_or("MISSING");
    let tls = loaded.tls()?.is_some();
    println!("config {} is valid", config.display());
    println!(
        "listen   {} (TLS {}), tokens over cleartext: {:?}",
        loaded.file.listen.address,
        if tls { "on" } else { "off" },
        proxy.cleartext_tokens
    );
    println!(
        "upstream {}:{} databases: {}",
        proxy.upstream.host,
        proxy.upstream.port,
        if proxy.databases.is_empty() {
            "any".to_owned()
        } else {
            proxy.databases.join(", ")
        }
    );
    let mut roles: Vec<_> = proxy.roles.iter().collect();
    roles.sort_by_key(|(name, _)| name.as_str());
    for (name, role) in roles {
        println!(
            "role     {name}: {}, upstream password {}",
            if role.requires_token {
                "token required"
            } else {
                "anonymous (no token)"
            },
            if role.password.is_some() {
                "set"
            } else {
                "none (trust)"
            }
        );
    }
    for p in &providers {
        println!(
            "provider {}: iss {} keys {} roles [{}]{}",
            p.name,
            p.issuer,
            p.jwks_url,
            p.roles.join(", "),
            if p.audience.is_empty() {
                String::new()
            } else {
                format!(" aud [{}]", p.audience.join(", "))
            }
        );
    }
    println!("claims key {claims}");
    Ok(())
}
