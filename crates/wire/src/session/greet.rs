//! The greeting: the client is told it is in (AuthenticationOk, the
//! server's parameters, the proxy's own cancel key, ReadyForQuery), and
//! its cancel key is registered, pointing at its backend unless it pools
//! by transaction.

use bytes::BytesMut;

use super::lease::Lease;
use super::{ClientIo, Session, write_flush};
use crate::cancel::CancelGuard;
use crate::config::PoolMode;
use crate::error::SessionError;
use crate::proto::backend;

/// A session after its greeting: the leased connection and the entry that
/// routes the client's cancel requests.
pub(super) struct Greeted {
    pub(super) lease: Lease,
    pub(super) cancel: CancelGuard,
}

impl<S: ClientIo> Session<'_, S> {
    /// Tells the client it is in: AuthenticationOk, the server's
    /// parameters, the proxy's own cancel key, ReadyForQuery, then anything
    /// the upstream sent past its ReadyForQuery.
    pub(super) async fn greet(
        &mut self,
        leased: (Lease, Vec<(String, String)>),
        mode: PoolMode,
        authenticated: bool,
    ) -> Result<Greeted, SessionError> {
        let (mut lease, parameters) = leased;
        let conn = lease.conn();
        // In transaction pooling the client has no backend between
        // transactions: its cancel key points nowhere until one starts.
        let target = (mode != PoolMode::Transaction).then(|| conn.cancel_key());
        let cancel = self.proxy.cancels.register(target, &mut crate::random::u64);
        let mut out = BytesMut::with_capacity(512);
        backend::authentication_ok(&mut out);
        for (name, value) in &parameters {
            backend::parameter_status(name, value, &mut out);
        }
        backend::backend_key_data(cancel.pid, cancel.key, &mut out);
        backend::ready_for_query_idle(&mut out);
        out.extend_from_slice(&conn.take_for_client());
        write_flush(&mut self.client, &out)
            .await
            .map_err(SessionError::ClientIo)?;
        // Idle sessions are many: hold no handshake buffers while relaying.
        conn.shrink();
        tracing::info!(
            upstream_pid = conn.pid(),
            authenticated,
            pool_mode = ?mode,
            "session started"
        );
        Ok(Greeted { lease, cancel })
    }
}
