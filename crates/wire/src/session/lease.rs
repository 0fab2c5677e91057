//! An upstream connection for a session, readied for its client: a login
//! of its own (`pool_mode = "none"`), or one from the pool with the
//! client's identity attached and its startup settings applied, after a
//! reset if anyone else used it.
//!
//! A pooled connection can turn out dead (the server restarted, the
//! backend was terminated) or fail its reset; nothing of the client's has
//! been sent on it yet, so the checkout tries another, or a new login,
//! until `checkout_timeout`.

use std::sync::Arc;

use tokio::time::Instant;

use super::handshake::SessionLogin;
use crate::config::PoolMode;
use crate::error::{SessionError, UpstreamError};
use crate::identity::ClaimsKey;
use crate::pool::{CheckoutError, Fairness, PoolKey, Pooled, UpstreamPool};
use crate::proxy::{Proxy, Settings};
use crate::transaction::PooledClient;
use crate::upstream::Upstream;

/// The upstream connection a session uses.
pub(super) enum Lease {
    /// From the pool: reset and returned when the client leaves cleanly.
    Pooled(Pooled),
    /// A login of its own, closed when the client leaves (boxed, as the
    /// pool boxes its connections).
    Own(Box<Upstream>),
}

impl Lease {
    pub(super) fn conn(&mut self) -> &mut Upstream {
        match self {
            Self::Pooled(pooled) => pooled.conn(),
            Self::Own(upstream) => upstream,
        }
    }
}

/// A connection checked out of the pool, readied for its client.
pub(super) struct Readied {
    pub(super) pooled: Pooled,
    /// The ParameterStatus values the client should see.
    pub(super) parameters: Vec<(String, String)>,
    /// When it was ready: what the client sends next starts then.
    pub(super) at: Instant,
}

/// How a pooled connection is readied for a client.
pub(super) enum Readying<'a> {
    /// At login: the identity attached and the startup settings applied.
    Login {
        claims: Option<&'a str>,
        settings: &'a [(String, String)],
    },
    /// For a transaction-pooled client's next transaction: its session
    /// restored unless the connection holds it already.
    Transaction(&'a PooledClient),
}

/// A connection for `login`, readied, with the ParameterStatus values the
/// client should see.
pub(super) async fn lease(
    proxy: &Proxy,
    settings: &Settings,
    login: &SessionLogin,
    mode: PoolMode,
) -> Result<(Lease, Vec<(String, String)>), SessionError> {
    let admitted = &login.admitted;
    if mode == PoolMode::None {
        // A second login when the first found the role's defaults changed
        // by a client (they are cleared by then: `upstream::repair`).
        let mut attempts = 2;
        loop {
            attempts -= 1;
            let mut conn = own_login(proxy, settings, login).await?;
            let deadline = Instant::now() + settings.config.pool_limits.internal_query_timeout;
            match conn
                .attach(&settings.claims_key, login.claims(), &[], deadline)
                .await
            {
                Ok(parameters) => return Ok((Lease::Own(Box::new(conn)), parameters)),
                Err(UpstreamError::RoleDefaults { .. }) if attempts > 0 => {}
                Err(error) => return Err(error.into()),
            }
        }
    }
    let readying = Readying::Login {
        claims: login.claims(),
        settings: &login.settings,
    };
    let pool = proxy.pool_for(admitted.destination.server.as_ref());
    let Readied {
        pooled, parameters, ..
    } = checkout(
        &pool,
        settings,
        &pool.key(&admitted.database, &admitted.role),
        (login.client_id, Fairness::new(&login.fair_key)),
        readying,
        Instant::now(),
    )
    .await?;
    Ok((Lease::Pooled(pooled), parameters))
}

/// A connection of the client's own (`pool_mode = "none"`), logged in
/// with its startup parameters.
async fn own_login(
    proxy: &Proxy,
    settings: &Settings,
    login: &SessionLogin,
) -> Result<Upstream, SessionError> {
    let admitted = &login.admitted;
    let config = &settings.config;
    let connected = proxy
        .pool_for(admitted.destination.server.as_ref())
        .log_in_unpooled(
            &admitted.database,
            &admitted.role,
            config.password(&admitted.role),
            &login.forwarded,
        )
        .await;
    Ok(connected?)
}

/// A pooled connection of `pool` for (`database`, `role`) readied for
/// `client` (its pool id, and whose turn it takes in a busy pool), trying
/// others while the one it got fails before anything of the client's was
/// sent on it; with the ParameterStatus values the client should see and
/// when it was ready. `started` is the caller's clock reading: a checkout
/// that finds a connection free and its session in place reads none of
/// its own.
///
/// Not an async fn, which would keep its arguments twice: this future is
/// part of every pooled transaction's.
#[allow(
    clippy::manual_async_fn,
    reason = "an async fn would keep its arguments twice"
)]
pub(super) fn checkout<'a>(
    pool: &'a Arc<UpstreamPool>,
    settings: &'a Settings,
    key: &'a PoolKey,
    (client, fair): (u64, Fairness<'a>),
    readying: Readying<'a>,
    started: Instant,
) -> impl std::future::Future<Output = Result<Readied, SessionError>> + Send + 'a {
    async move {
        let password = || settings.config.password(key.role());
        let mut now = started;
        loop {
            let wanted = match &readying {
                Readying::Transaction(pooled_client) => pooled_client.shape(),
                Readying::Login { .. } => None,
            };
            let mut pooled = pool
                .checkout_keyed(key, password, (client, wanted), fair, now)
                .await
                .map_err(|error| match error {
                    CheckoutError::Timeout(waited) => SessionError::PoolExhausted {
                        database: key.database().to_owned(),
                        role: key.role().to_owned(),
                        waited,
                    },
                    CheckoutError::Upstream(error) => SessionError::Upstream(error),
                })?;
            let deadline = pooled.ready_by();
            let claims_key = &settings.claims_key;
            match ready(claims_key, pooled.conn(), client, &readying, deadline).await {
                Ok((parameters, queried)) => {
                    let ready_at = if queried {
                        Instant::now()
                    } else {
                        pooled.taken()
                    };
                    return Ok(Readied {
                        pooled,
                        parameters,
                        at: ready_at,
                    });
                }
                // Until `checkout_timeout` from the first attempt.
                Err(error) if UpstreamPool::attempts(&key.limits(), started).another(&error) => {
                    now = Instant::now();
                }
                Err(error) => {
                    // A refused client setting leaves the connection clean:
                    // reset it for the next client all the same.
                    // Boxed: rare, and a reset's future is larger than the
                    // rest of a checkout's.
                    if !pooled.conn().is_broken()
                        && Box::pin(pooled.conn().reset(deadline)).await.is_ok()
                    {
                        pooled.release();
                    }
                    return Err(error.into());
                }
            }
        }
    }
}

/// Readies `conn` for the client: its ParameterStatus values, and
/// whether queries ran to do it.
async fn ready(
    claims_key: &ClaimsKey,
    conn: &mut Upstream,
    client: u64,
    readying: &Readying<'_>,
    deadline: Instant,
) -> Result<(Vec<(String, String)>, bool), UpstreamError> {
    match readying {
        // Boxed: once a session, and a future larger than a
        // transaction's checkout.
        Readying::Login { claims, settings } => {
            Box::pin(async {
                conn.claim(client, deadline).await?;
                let parameters = conn.attach(claims_key, *claims, settings, deadline).await?;
                Ok((parameters, true))
            })
            .await
        }
        Readying::Transaction(pooled_client) => pooled_client
            .take(conn, claims_key, deadline)
            .await
            .map(|queried| (Vec::new(), queried)),
    }
}
