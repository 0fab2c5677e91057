//! `authgres serve` and `authgres check-config`.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use authgres_jwt::{KeySource, Verifier};
use authgres_wire::Proxy;

use crate::config::{Loaded, TokenPolicy};

/// Everything `serve` needs, built and checked from a config.
pub struct Prepared {
    pub proxy: Arc<Proxy>,
    pub verifier: Arc<Verifier>,
    pub address: String,
    /// HTTP listener settings, if `[http]` is configured.
    pub http: Option<PreparedHttp>,
}

/// The HTTP side, ready to bind.
pub struct PreparedHttp {
    pub address: String,
    pub state: Arc<authgres_http::HttpState>,
    pub tls: Option<tokio_rustls::TlsAcceptor>,
}

/// Builds the proxy from a loaded config; fails with what to fix.
pub fn prepare(loaded: &Loaded) -> anyhow::Result<Prepared> {
    let providers = loaded.providers()?;
    if providers.is_empty() {
        tracing::warn!("no [[providers]] configured: only token-less roles can log in");
    }
    let verifier = Arc::new(Verifier::with_token_cache(
        providers,
        loaded.file.identity.verified_token_cache,
    )?);
    let tls = loaded.tls()?;
    let wire_tls = tls.is_some();
    let proxy = Arc::new(Proxy::new(
        loaded.proxy_config()?,
        Arc::clone(&verifier),
        loaded.claims_key()?,
        tls,
    ));
    let http = match (loaded.http(), &loaded.file.http) {
        (Some(config), Some(file)) => {
            if file.tls && !wire_tls {
                anyhow::bail!("[http] tls = true needs [listen] tls_cert and tls_key");
            }
            let tls = if file.tls { loaded.http_tls()? } else { None };
            Some(PreparedHttp {
                address: file.address.clone(),
                state: authgres_http::HttpState::new(Arc::clone(&proxy), config, tls.is_some()),
                tls,
            })
        }
        _ => None,
    };
    Ok(Prepared {
        proxy,
        verifier,
        address: loaded.file.listen.address.clone(),
        http,
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
    // Warm the key caches without delaying the listener.
    let verifier = Arc::clone(&prepared.verifier);
    tokio::spawn(async move { verifier.prefetch(std::time::SystemTime::now()).await });
    run_listeners(prepared, listener).await
}

/// Serves the wire listener and, when configured, HTTP, until a signal.
pub async fn run_listeners(
    prepared: Prepared,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<()> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let wait = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    // Closing idle upstream connections on time; ends with the process.
    tokio::spawn(prepared.proxy.maintenance());
    let http = match prepared.http {
        Some(http) => {
            tokio::spawn(http.state.maintenance());
            let http_listener = tokio::net::TcpListener::bind(&http.address)
                .await
                .with_context(|| format!("listening for HTTP on {}", http.address))?;
            tracing::info!(address = %http.address, tls = http.tls.is_some(), "authgres HTTP listening");
            Some(tokio::spawn(authgres_http::serve(
                http.state,
                http_listener,
                http.tls,
                wait(stopped.clone()),
            )))
        }
        None => None,
    };
    let wire = tokio::spawn(authgres_wire::server::serve(
        prepared.proxy,
        listener,
        wait(stopped),
    ));
    shutdown_signal().await;
    tracing::info!("shutting down");
    let _ = stop.send(true);
    wire.await??;
    if let Some(http) = http {
        http.await??;
    }
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
    for p in &providers {
        println!(
            "provider {}: iss {} keys {} roles [{}]{}",
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
            }
        );
    }
    if loaded.secrets.get(&file.identity.claims_key_env).is_none() {
        missing.push(file.identity.claims_key_env.clone());
    } else {
        loaded.claims_key()?;
    }
    if missing.is_empty() {
        proxy?;
        println!("ok: the proxy can start with this config");
    } else {
        println!(
            "missing secrets: {} (run `authgres init-db` or set them)",
            missing.join(", ")
        );
    }
    Ok(())
}
