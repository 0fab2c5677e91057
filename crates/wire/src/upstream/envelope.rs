//! One request's statements run under one identity on a pooled
//! connection, in one round trip: what `/sql` sends.
//!
//! ```text
//! [BEGIN ...]  attach claims (transaction-local)  ─ head
//! the client's statements                          ─ the caller's
//! [COMMIT]  Sync  reset                            ─ tail
//! ```
//!
//! The claims are signed for the binding the connection's last reset drew
//! and last only for the transaction; the reset in the tail rolls back
//! whatever the statements left open, clears the session and draws the
//! binding the *next* request signs for, so nothing this request saw or
//! set can verify there.

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::time::Instant;

use super::attach::{AttachScope, append_attach, append_statement};
use super::{PendingReset, Upstream, next_client_id};
use crate::error::UpstreamError;
use crate::identity::ClaimsKey;

/// Room made in the read buffer for a request's replies before it is
/// sent: the replies to a small request, its reset's included, arrive
/// together (about 1.2 KiB for a single-row select) and are read in one
/// call, not one call per message the buffer happens to fit (six, seen).
const REPLY_ROOM: usize = 8 * 1024;

/// What a request runs as, and inside what.
#[derive(Debug, Clone, Copy)]
pub struct RequestIdentity<'a> {
    /// The key the claims are signed with.
    pub key: &'a ClaimsKey,
    /// The verified claims (JSON); `None` for an anonymous role.
    pub claims: Option<&'a str>,
    /// The `BEGIN` statement of a batch, which runs in one transaction.
    pub begin: Option<&'a str>,
}

/// The proxy's messages around a request's statements.
#[derive(Debug)]
pub struct Envelope {
    /// Sent before the statements.
    pub head: BytesMut,
    /// Sent after them.
    pub tail: BytesMut,
    /// Replies to the proxy's own statements (each up to its
    /// CommandComplete) before the statements' replies.
    pub replies_before: usize,
    /// The same after the statements' replies, up to the ReadyForQuery of
    /// the Sync.
    pub replies_after: usize,
    /// The reset to read once the request's replies are read
    /// ([`Upstream::finish_reset`]).
    pub reset: PendingReset,
}

impl Upstream {
    /// Claims the connection for a new request (resetting it if it served
    /// anyone, within `deadline`) and builds the envelope that runs the
    /// request's statements as `identity`.
    pub async fn envelope(
        &mut self,
        identity: RequestIdentity<'_>,
        deadline: Instant,
    ) -> Result<Envelope, UpstreamError> {
        self.claim(next_client_id(), deadline).await?;
        let binding = self.take_binding(deadline).await?;
        let mut head = BytesMut::with_capacity(1024);
        let mut replies_before = 0;
        if let Some(begin) = identity.begin {
            append_statement(&mut head, begin, &[])?;
            replies_before += 1;
        }
        if let Some(claims) = identity.claims {
            let scope = AttachScope::Transaction;
            append_attach(&mut head, identity.key, &binding, claims, scope)?;
            replies_before += 1;
        }
        let mut tail = BytesMut::with_capacity(1024);
        let mut replies_after = 0;
        if identity.begin.is_some() {
            append_statement(&mut tail, "COMMIT", &[])?;
            replies_after += 1;
        }
        frontend::sync(&mut tail);
        let reset = self.append_reset(&mut tail)?;
        self.inbox.reserve(REPLY_ROOM);
        Ok(Envelope {
            head,
            tail,
            replies_before,
            replies_after,
            reset,
        })
    }
}
