//! A session that holds its upstream connection to the end (session
//! pooling, a login of its own, or a transaction-pooled client pinned to
//! its connection): relay until a side leaves, then reset the connection
//! and return it to the pool if the backend is proven settled, or close it.
//!
//! With `enforce_token_expiry`, the session ends at the first idle
//! transaction boundary after its token's `exp`.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::handshake::{Greeted, Login};
use super::lease::Lease;
use super::{ClientIo, Session, refuse};
use crate::error::{ProtocolViolation, SessionError};
use crate::relay::{self, Relay, Stop};

/// Serves a session that keeps its connection, from its greeting on.
pub(super) async fn serve<S: ClientIo>(
    session: Session<'_, S>,
    login: &Login,
    greeted: Greeted,
) -> Result<(), SessionError> {
    let expires = session.expiry(login);
    let Greeted { lease, cancel } = greeted;
    let mut relay = Relay::new(None);
    relay.watch(session.proxy.config.client_limits);
    let result = Box::pin(relay_to_end(session, relay, lease, expires)).await;
    drop(cancel);
    result
}

impl<S: ClientIo> Session<'_, S> {
    /// When the session must end, if its token's expiry is enforced.
    pub(super) fn expiry(&self, login: &Login) -> Option<SystemTime> {
        login
            .admitted
            .identity
            .as_ref()
            .filter(|_| self.proxy.config.enforce_token_expiry)
            .map(|identity| crate::transaction::expiry_time(identity.expires_at))
    }
}

/// Relays until the session ends, then resets and returns the connection
/// to the pool if it can be reused. `relay` may have followed part of the
/// session already (a transaction-pooled client pinned to its connection).
pub(super) async fn relay_to_end<S: ClientIo>(
    mut session: Session<'_, S>,
    mut relay: Relay,
    mut lease: Lease,
    expires: Option<SystemTime>,
) -> Result<(), SessionError> {
    let pipelined = std::mem::take(&mut session.inbox);
    let client = &mut session.client;
    let conn = lease.conn();
    relay.forward(&pipelined, conn.stream()).await?;
    drop(pipelined);
    let stopped = match expires {
        None => relay.run(client, conn.stream()).await,
        Some(at) => {
            let left = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let ended = tokio::select! {
                stopped = relay.run(client, conn.stream()) => Some(stopped),
                () = tokio::time::sleep(left) => None,
            };
            match ended {
                Some(stopped) => stopped,
                None => {
                    relay.stop_at_idle(true);
                    relay.run(client, conn.stream()).await
                }
            }
        }
    };
    let reusable = matches!(
        stopped,
        Ok(Stop::ClientClosed | Stop::ClientTerminated | Stop::Idle | Stop::IdleInTransaction)
    ) && relay.between_requests();
    let limits = session.proxy.config.client_limits;
    let ended = match stopped {
        Ok(Stop::UpstreamClosed | Stop::ClientClosed | Stop::ClientTerminated) => None,
        // Only an expired token stops a session that holds its connection.
        Ok(Stop::Idle) => {
            tracing::info!("session ended: its token expired");
            Some(SessionError::TokenExpired)
        }
        Ok(Stop::Violation(violation)) => Some(ProtocolViolation::Relay(violation).into()),
        Ok(Stop::IdleInTransaction) => Some(SessionError::IdleInTransaction(
            limits.idle_in_transaction.unwrap_or_default(),
        )),
        Ok(Stop::ClientStalled) => Some(SessionError::ClientStalled(
            limits.stalled_reader.unwrap_or_default(),
        )),
        Err(ref error) => Some(SessionError::ClientIo(std::io::Error::new(
            error.kind(),
            error.to_string(),
        ))),
    };
    if let Some(why) = relay.lost() {
        tracing::debug!(
            why,
            "upstream connection closed: its state could not be followed"
        );
    }
    // The backend goes back, or is closed, before anything waits on a
    // client that may not be reading.
    finish(session.proxy, lease, reusable).await;
    if matches!(stopped, Ok(Stop::UpstreamClosed)) {
        // The server's last words (a FATAL) are the client's.
        let _ = tokio::time::timeout(super::ERROR_WRITE_TIMEOUT, relay.flush_client(client)).await;
    }
    match ended {
        Some(error) => {
            session.proxy.report(&error);
            refuse(client, &error).await;
            Ok(())
        }
        None => {
            relay::close_client(client).await;
            Ok(())
        }
    }
}

/// Returns a connection the session is done with: reset and back to the
/// pool when `reusable`, otherwise closed.
pub(super) async fn finish(proxy: &super::Proxy, lease: Lease, reusable: bool) {
    match lease {
        Lease::Pooled(mut pooled) if reusable => {
            let deadline = Instant::now() + proxy.config.pool_limits.internal_query_timeout;
            match pooled.conn().reset(deadline).await {
                Ok(()) => pooled.release(),
                Err(error) => {
                    tracing::debug!(%error, "upstream connection not reusable after its reset")
                }
            }
        }
        Lease::Pooled(_) => {}
        Lease::Own(upstream) => upstream.terminate().await,
    }
}
