//! Bringing a backend back for its next user: prove it idle, roll back,
//! clear what the last client left, draw the next identity generation.
//!
//! The proof does not trust the proxy's own accounting: the reset starts
//! with a Sync (which ends any skip-to-Sync the server is in), rolls back,
//! then asks for a random marker that nobody else can know. Everything the
//! server sends before the marker's row is discarded; only then are the
//! reset's own replies read, each checked. A backend that does not produce
//! the marker before the deadline (it is still busy, or in COPY) is closed.
//!
//! What the reset clears is what `DISCARD ALL` clears, except cached plans
//! (they hold no client state and keep `auth.session()` planned) and
//! `SET SESSION AUTHORIZATION` (a login role without superuser cannot
//! change it), plus the role (`RESET ALL` leaves it), the random seed (a
//! client's `setseed()` would make the next client's `random()`
//! predictable), and the identity generation. The new generation is drawn
//! in a query of its own, after `RESET ALL`, so that a client's
//! `default_transaction_read_only` cannot make it fail.

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;

use super::attach::BEGIN_SESSION;
use super::{Attached, Owner, Upstream};
use crate::error::UpstreamError;

/// Clears what a client can leave in a session (see the module docs).
/// Schema-qualified where a client could shadow a name.
const CLEAR_SESSION: &str = "CLOSE ALL; RESET ROLE; RESET ALL; DEALLOCATE ALL; UNLISTEN *; \
                             SELECT pg_catalog.pg_advisory_unlock_all(); DISCARD TEMP; \
                             DISCARD SEQUENCES";
/// Prefix of the bindings `auth.begin_session()` returns.
const BINDING_PREFIX: &str = "authgres-v1:";

/// A reset sent and not yet read: its marker.
#[derive(Debug)]
pub struct PendingReset {
    marker: String,
}

impl Upstream {
    /// Appends a reset to `out`, to pipeline it after a request; read its
    /// replies with [`Upstream::finish_reset`].
    pub fn append_reset(&self, out: &mut BytesMut) -> Result<PendingReset, UpstreamError> {
        let marker = format!("authgres-reset:{}", crate::random::hex(16));
        // A seed in [-1, 1] from the proxy's random source.
        let seed = f64::from(crate::random::u32()) / f64::from(u32::MAX) * 2.0 - 1.0;
        frontend::sync(out);
        let queries = [
            "ROLLBACK".to_owned(),
            format!("SELECT '{marker}'"),
            format!("{CLEAR_SESSION}; SELECT pg_catalog.setseed({seed:.15})"),
            BEGIN_SESSION.to_owned(),
        ];
        for query in queries {
            frontend::query(&query, out).map_err(UpstreamError::Encode)?;
        }
        Ok(PendingReset { marker })
    }

    /// Reads a reset's replies (see the module docs); on success the
    /// connection is clean, with the next generation's binding drawn.
    pub async fn finish_reset(
        &mut self,
        pending: PendingReset,
        deadline: Instant,
    ) -> Result<(), UpstreamError> {
        let result = self.read_reset(&pending.marker, deadline).await;
        match result {
            Ok(binding) => {
                self.next_binding = Some(binding);
                self.owner = Owner::Nobody;
                self.shape = None;
                self.attached = Attached::default();
                // The previous client's, and it is gone.
                self.for_client.clear();
                Ok(())
            }
            Err(error) => {
                self.broken = true;
                Err(error)
            }
        }
    }

    async fn read_reset(
        &mut self,
        marker: &str,
        deadline: Instant,
    ) -> Result<String, UpstreamError> {
        // Whatever the server still had to say before the marker.
        let mut seen = false;
        while !seen {
            self.read_reply(deadline, |message| {
                if let Message::DataRow(row) = message {
                    seen |= super::first_text(&row).as_deref() == Some(marker);
                }
                Ok(())
            })
            .await?;
        }
        let clear = self.read_reply(deadline, |_| Ok(())).await?;
        if let Some(error) = clear.error {
            return Err(UpstreamError::Reset(error));
        }
        let mut binding = None;
        let drawn = self
            .read_reply(deadline, |message| {
                if let Message::DataRow(row) = message {
                    binding = super::first_text(&row);
                }
                Ok(())
            })
            .await?;
        if let Some(error) = drawn.error {
            return Err(self
                .begin_session_failed(error, deadline, UpstreamError::Reset)
                .await);
        }
        match binding {
            Some(binding) if drawn.status == super::IDLE && binding.starts_with(BINDING_PREFIX) => {
                Ok(binding)
            }
            _ => Err(UpstreamError::Protocol(
                "the reset did not end idle with a new generation",
            )),
        }
    }

    /// Resets the connection for the next user (see the module docs).
    pub async fn reset(&mut self, deadline: Instant) -> Result<(), UpstreamError> {
        let mut out = BytesMut::new();
        let pending = self.append_reset(&mut out)?;
        self.send(&out).await?;
        self.finish_reset(pending, deadline).await
    }

    /// Readies a pooled connection for `client`: one holding anyone else's
    /// session is reset first. Returns whether it already holds this
    /// client's session (identity, settings and statements in place).
    pub async fn claim(&mut self, client: u64, deadline: Instant) -> Result<bool, UpstreamError> {
        self.claim_as(client, None, deadline).await
    }

    /// [`Upstream::claim`], except that a session that is exactly what
    /// `client`'s would be (`wanted`, see [`super::shape`]) is taken as it
    /// is.
    pub async fn claim_as(
        &mut self,
        client: u64,
        wanted: Option<&super::SessionShape>,
        deadline: Instant,
    ) -> Result<bool, UpstreamError> {
        if self.claim_held(client, wanted) {
            return Ok(true);
        }
        if self.owner != Owner::Nobody {
            self.reset(deadline).await?;
        }
        // Whatever happens next happens in this client's session.
        self.owner = Owner::Client(client);
        Ok(false)
    }

    /// Claims the connection for `client` if it holds `client`'s session
    /// (or one exactly like `wanted`) as it is: no query, no wait. False
    /// leaves it unclaimed, for [`Upstream::claim_as`].
    pub fn claim_held(&mut self, client: u64, wanted: Option<&super::SessionShape>) -> bool {
        let held = match self.owner {
            Owner::Client(id) => id == client || wanted.is_some_and(|wanted| self.serves(wanted)),
            Owner::Nobody | Owner::Unknown => false,
        };
        if held {
            self.owner = Owner::Client(client);
        }
        held
    }

    /// Checks that the server still answers: an empty query.
    pub async fn ping(&mut self, deadline: Instant) -> Result<(), UpstreamError> {
        let mut out = BytesMut::new();
        frontend::query("", &mut out).map_err(UpstreamError::Encode)?;
        let reply = self.exchange(&out, deadline).await?;
        match reply.error {
            None => Ok(()),
            Some(error) => {
                self.broken = true;
                Err(UpstreamError::Reset(error))
            }
        }
    }

    /// Ends a connection whose backend may still be working for a client
    /// that is gone: closing the socket alone does not stop it (a backend
    /// notices a closed client only when it next writes), so a running
    /// statement would go on holding its locks and its memory, outside the
    /// pool's count. Sends Terminate behind whatever the client left
    /// queued, then cancels the backend's statement, again with growing
    /// pauses, until the server closes the connection (the backend
    /// reached the Terminate and exited) or `deadline` passes. Returns
    /// whether the backend was seen to end.
    pub async fn abandon(mut self, deadline: Instant) -> bool {
        // A backend blocked on a full socket may not take even these five
        // bytes until it is cancelled: cancel it all the same.
        let queued = (Instant::now() + std::time::Duration::from_secs(1)).min(deadline);
        if let Ok(Err(_)) = tokio::time::timeout_at(queued, self.send(&[b'X', 0, 0, 0, 4])).await {
            return true;
        }
        let mut pause = std::time::Duration::from_millis(50);
        loop {
            if let Err(error) = tokio::time::timeout_at(deadline, self.key.cancel())
                .await
                .unwrap_or(Err(UpstreamError::Deadline))
            {
                tracing::debug!(%error, pid = self.key.pid, "cancelling an abandoned backend failed");
            }
            let until = (Instant::now() + pause).min(deadline);
            if self.closed_by(until).await {
                return true;
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    pid = self.key.pid,
                    "a backend whose client left did not stop when cancelled; closing its \
                     connection (the server ends it when it next writes)"
                );
                return false;
            }
            pause = (pause * 2).min(std::time::Duration::from_secs(1));
        }
    }

    /// Reads and discards what the server sends until it closes the
    /// connection (true) or `until` passes (false).
    async fn closed_by(&mut self, until: Instant) -> bool {
        loop {
            self.inbox.clear();
            match tokio::time::timeout_at(until, self.stream.read_buf(&mut self.inbox)).await {
                Ok(Ok(0) | Err(_)) => return true,
                Ok(Ok(_)) => {}
                Err(_) => return false,
            }
        }
    }

    /// Closes the connection politely: Terminate ('X'), so the backend ends
    /// without logging an unexpected EOF. Best effort.
    pub async fn terminate(mut self) {
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            self.send(&[b'X', 0, 0, 0, 4]),
        )
        .await;
    }
}
