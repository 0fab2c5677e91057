//! One request's statements run under one identity on a pooled
//! connection, in one round trip: what `/sql` sends.
//!
//! ```text
//! [BEGIN ...]  [attach claims]  ─ head
//! the client's statements        ─ the caller's
//! [COMMIT]  Sync  [reset]        ─ tail
//! ```
//!
//! An anonymous request (no claims) ends with the reset in its tail, as
//! every request once did: it rolls back whatever the statements left
//! open, clears the session and draws the binding the *next* request signs
//! for.
//!
//! A request with a token has a [`SessionShape`] (its verified claims, and
//! for `/sql` which key signs them), and the connection is claimed for it as a
//! transaction-pooled client's is ([`Upstream::claim_as`]): one holding
//! exactly such a session, left by an earlier request of the same token,
//! is taken as it is and the head attaches nothing; any other connection
//! is reset if anyone used it, and the claims are attached *for the
//! session*, signed for the binding the reset drew. Its tail has no
//! reset: once the replies are read, the caller either resets the
//! connection (the request failed, or could have left session state:
//! `SET`, `set_config`, `LISTEN`, ...) or hands it back with
//! [`Upstream::share_as`] for the next request of the same token. Another
//! identity, or an anonymous request, gets it only after a reset, which
//! draws a new generation, so the claims attached here no longer verify.

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::time::Instant;

use super::Attached;
use super::attach::{AttachScope, append_attach, append_statement};
use super::{PendingReset, SessionShape, Upstream};
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
    /// The request's owner tag for the connection ([`super::Owner`]): a
    /// fresh [`super::next_client_id`].
    pub client: u64,
    /// What its session is (its claims, see [`SessionShape`]); `None`
    /// for an anonymous request, which is reset in its tail.
    pub shape: Option<&'a SessionShape>,
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
    /// The reset in the tail, to read once the request's replies are read
    /// ([`Upstream::finish_reset`]); `None` for a request with a
    /// [`SessionShape`], which leaves the connection in its session (see
    /// the module docs).
    pub reset: Option<PendingReset>,
}

impl Upstream {
    /// Claims the connection for a new request (resetting it if it holds
    /// anyone's session but one exactly like the request's, within
    /// `deadline`) and builds the envelope that runs the request's
    /// statements as `identity`.
    pub async fn envelope(
        &mut self,
        identity: RequestIdentity<'_>,
        deadline: Instant,
    ) -> Result<Envelope, UpstreamError> {
        let held = (self.claim_as(identity.client, identity.shape, deadline)).await?;
        let mut head = BytesMut::with_capacity(1024);
        let mut replies_before = 0;
        if let Some(begin) = identity.begin {
            append_statement(&mut head, begin, &[])?;
            replies_before += 1;
        }
        if !held {
            let binding = self.take_binding(deadline).await?;
            self.attached = Attached::default();
            if let Some(claims) = identity.claims {
                let scope = match identity.shape {
                    Some(_) => AttachScope::Session,
                    None => AttachScope::Transaction,
                };
                let attached = append_attach(&mut head, identity.key, &binding, claims, scope)?;
                if scope == AttachScope::Session {
                    // Once the request succeeds; one that fails is reset.
                    self.attached = attached;
                }
                replies_before += 1;
            }
        }
        let mut tail = BytesMut::with_capacity(1024);
        let mut replies_after = 0;
        if identity.begin.is_some() {
            append_statement(&mut tail, "COMMIT", &[])?;
            replies_after += 1;
        }
        frontend::sync(&mut tail);
        let reset = match identity.shape {
            Some(_) => None,
            None => Some(self.append_reset(&mut tail)?),
        };
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
