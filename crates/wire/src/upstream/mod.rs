//! One logged-in connection to the real Postgres, and the exchanges the
//! proxy runs on it itself.
//!
//! - [`connect`](connect()): TCP, TLS when configured, and the login
//!   ([`crate::proto::login`]) as a role, under `connect_timeout`;
//! - [`Upstream::read_reply`]: the one reader of replies up to a
//!   ReadyForQuery, with a deadline, used by every exchange below and by
//!   `/sql`;
//! - `reset`: proving the backend idle and clearing what a client left
//!   in it; `attach`: storing the signed identity.
//!
//! An exchange that fails or misses its deadline marks the connection
//! broken: a pool closes it instead of taking it back.

mod attach;
mod connect;
mod envelope;
mod repair;
mod reset;
mod shape;

use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::message::backend::{Header, Message};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::time::{Instant, timeout_at};

pub use attach::append_described;
pub(crate) use attach::append_statement;
pub use connect::{UpstreamConfig, connect};
pub use envelope::{Envelope, RequestIdentity};
pub use repair::{PINNED_STARTUP, ROLE_DEFAULTS_SQLSTATE};
pub use reset::PendingReset;
pub use shape::SessionShape;

use crate::error::UpstreamError;
use crate::proto::server_error::ServerError;
use crate::transport::UpstreamStream;

/// ReadyForQuery status outside a transaction block.
pub const IDLE: u8 = crate::proto::ledger::IDLE;

/// Where a cancel request for a backend goes. The secret never leaves the
/// proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamKey {
    /// The backend's process id.
    pub pid: i32,
    /// Its cancel key (shared: retargeting a session's cancel entry must
    /// not allocate).
    pub secret: Arc<[u8]>,
    /// The server it runs on (`host:port`): with `[databases]` a proxy
    /// talks to several.
    pub address: Arc<str>,
    /// How long reaching that server may take.
    pub connect_timeout: std::time::Duration,
}

/// Whose session state (identity, settings, statements) a pooled
/// connection holds. Only a reset or a fresh login makes it
/// [`Owner::Nobody`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// Clean: freshly logged in or reset.
    Nobody,
    /// This client's (transaction pooling, between its transactions).
    Client(u64),
    /// Someone's: it must be reset before anyone uses it.
    Unknown,
}

/// A process-unique id for a client of the pool (see [`Owner`]).
pub fn next_client_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The claims and signature attached for the current client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attached {
    /// The claims JSON, if any.
    pub claims: Option<String>,
    /// The signature over them.
    pub signature: Option<String>,
}

/// What the server answered to one request, up to its ReadyForQuery.
#[derive(Debug)]
pub struct Reply {
    /// The transaction status of the ReadyForQuery.
    pub status: u8,
    /// The first error reported, if any.
    pub error: Option<ServerError>,
}

/// A logged-in upstream connection.
pub struct Upstream {
    stream: UpstreamStream,
    /// Bytes read past the last message handled; the relay forwards them.
    inbox: BytesMut,
    key: UpstreamKey,
    /// The login role and database, for repairs of the role
    /// ([`repair`]) and for logs.
    role: String,
    database: String,
    /// The ParameterStatus values of the login, shared with the other
    /// connections that reported the same (`connect.rs`).
    parameters: Arc<[(String, String)]>,
    /// The binding of the identity generation the last reset drew, for the
    /// next user: a request then needs no round trip for it.
    next_binding: Option<String>,
    owner: Owner,
    /// The session its owner left, for another client of the same identity
    /// to take as it is ([`shape`]); `None` while none may.
    shape: Option<Arc<SessionShape>>,
    attached: Attached,
    /// Notifications (LISTEN) that arrived while the proxy ran its own
    /// queries, as the server sent them, for the client they belong to.
    for_client: BytesMut,
    /// An exchange failed or missed its deadline: never reuse.
    broken: bool,
}

impl Upstream {
    /// The backend's process id.
    pub fn pid(&self) -> i32 {
        self.key.pid
    }

    /// The role it logged in as.
    pub fn role(&self) -> &str {
        &self.role
    }

    /// Where a cancel request for this backend goes.
    pub fn cancel_key(&self) -> UpstreamKey {
        self.key.clone()
    }

    /// The ParameterStatus values of the login.
    pub fn parameters(&self) -> &[(String, String)] {
        &self.parameters
    }

    /// Whose session state the connection holds.
    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Records whose session state the connection holds now; one whose
    /// session no longer matches its owner's shape ([`Owner::Unknown`])
    /// is shared with nobody.
    pub fn set_owner(&mut self, owner: Owner) {
        if matches!(owner, Owner::Unknown | Owner::Nobody) {
            self.shape = None;
        }
        self.owner = owner;
    }

    /// Records the session its owner leaves on it as `shape` (see
    /// [`shape`]).
    pub fn share_as(&mut self, shape: Option<Arc<SessionShape>>) {
        self.shape = shape;
    }

    /// Whether a client whose session would be `wanted` may take it as it
    /// is.
    pub fn serves(&self, wanted: &SessionShape) -> bool {
        self.owner != Owner::Unknown && self.shape.as_ref().is_some_and(|s| s.serves(wanted))
    }

    /// The identity attached for the current client.
    pub fn attached(&self) -> &Attached {
        &self.attached
    }

    /// Whether an exchange failed on it: it must be closed, not reused.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Marks the connection as not reusable (its state is unknown).
    pub fn mark_broken(&mut self) {
        self.broken = true;
    }

    /// The stream, for the relay.
    pub(crate) fn stream(&mut self) -> &mut UpstreamStream {
        &mut self.stream
    }

    /// Whether the server sent something, or closed, while the connection
    /// sat idle: an idle backend has nothing to say unless it is dying
    /// (shutdown, `pg_terminate_backend`, an idle-session timeout). Checks
    /// without waiting.
    pub fn spoke_while_idle(&mut self) -> bool {
        if !self.inbox.is_empty() {
            return true;
        }
        // Readiness is cleared by the read that found the socket empty, so
        // while it is clear nothing has arrived since: no peek, no waker.
        let tcp = self.stream.tcp();
        if crate::transport::read_readiness_clear(tcp) {
            return false;
        }
        // Set: something arrived, or a read that filled its buffer left it
        // set. A peek tells.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        tcp.poll_peek(&mut cx, &mut buf).is_ready()
    }

    /// What the server sent for the client while the proxy ran its own
    /// queries: notifications, then whatever arrived after the last reply
    /// read. The client must get these before anything the relay reads.
    pub fn take_for_client(&mut self) -> BytesMut {
        let mut bytes = std::mem::take(&mut self.for_client);
        bytes.extend_from_slice(&self.inbox);
        self.inbox.clear();
        bytes
    }

    /// Frees the buffers kept from the proxy's own exchanges (an idle
    /// session should hold none).
    pub fn shrink(&mut self) {
        if self.inbox.is_empty() {
            self.inbox = BytesMut::new();
        }
    }

    /// Writes `bytes` to the server.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), UpstreamError> {
        if let Err(error) = self.stream.write_all(bytes).await {
            self.broken = true;
            return Err(UpstreamError::Io(error));
        }
        Ok(())
    }

    /// Sends `request` and reads its reply (see [`Upstream::read_reply`]),
    /// ignoring the messages before the ReadyForQuery.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        deadline: Instant,
    ) -> Result<Reply, UpstreamError> {
        self.send(request).await?;
        self.read_reply(deadline, |_| Ok(())).await
    }

    /// Reads messages up to the next ReadyForQuery, handing every other
    /// message but ErrorResponse to `visit` and keeping the first error.
    /// Fails, and marks the connection broken, when `deadline` passes first
    /// or the server breaks the protocol.
    pub async fn read_reply<F>(
        &mut self,
        deadline: Instant,
        visit: F,
    ) -> Result<Reply, UpstreamError>
    where
        F: FnMut(Message) -> Result<(), UpstreamError>,
    {
        self.read_reply_within(deadline, usize::MAX, visit).await
    }

    /// Like [`Upstream::read_reply`], but a message longer than
    /// `max_message` bytes is refused from its header, before any of it is
    /// buffered: the reply fails with [`UpstreamError::MessageTooLong`] and
    /// the connection is broken (the rest of the message is unread). For
    /// replies whose size a client controls (`/sql` results).
    pub async fn read_reply_within<F>(
        &mut self,
        deadline: Instant,
        max_message: usize,
        mut visit: F,
    ) -> Result<Reply, UpstreamError>
    where
        F: FnMut(Message) -> Result<(), UpstreamError>,
    {
        let mut error = None;
        loop {
            // The messages already read are handled without a wait (most
            // replies arrive whole), then more is read.
            while let Some(message) = self.next_buffered(max_message)? {
                match message {
                    Message::ReadyForQuery(body) => {
                        return Ok(Reply {
                            status: body.status(),
                            error,
                        });
                    }
                    Message::ErrorResponse(body) => {
                        if error.is_none() {
                            error = Some(error_of(&body));
                        }
                    }
                    message => {
                        if let Err(failure) = visit(message) {
                            self.broken = true;
                            return Err(failure);
                        }
                    }
                }
            }
            self.read_more(deadline).await?;
        }
    }

    /// The next message already read from the server, if a whole one is;
    /// a notification is not the reply of anything the proxy runs: it is
    /// kept for the client ([`Upstream::take_for_client`]). A malformed
    /// message breaks the connection.
    fn next_buffered(&mut self, max_message: usize) -> Result<Option<Message>, UpstreamError> {
        self.take_message(max_message)
            .inspect_err(|_| self.broken = true)
    }

    /// Reads more of what the server sent, waiting at most until
    /// `deadline`; a connection the server closed, that failed or that
    /// stayed silent past it is broken.
    async fn read_more(&mut self, deadline: Instant) -> Result<(), UpstreamError> {
        let failure = match timeout_at(deadline, self.stream.read_buf(&mut self.inbox)).await {
            Ok(Ok(0)) => UpstreamError::Closed,
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(error)) => UpstreamError::Io(error),
            Err(_) => UpstreamError::Deadline,
        };
        self.broken = true;
        Err(failure)
    }

    fn take_message(&mut self, max_message: usize) -> Result<Option<Message>, UpstreamError> {
        loop {
            let header = Header::parse(&self.inbox)
                .map_err(|_| UpstreamError::Protocol("a malformed message header"))?;
            let Some(header) = header else {
                return Ok(None);
            };
            let length = usize::try_from(header.len())
                .unwrap_or(usize::MAX)
                .saturating_add(1);
            if length > max_message {
                return Err(UpstreamError::MessageTooLong(length));
            }
            if self.inbox.len() < length {
                self.inbox.reserve(length - self.inbox.len());
                return Ok(None);
            }
            if header.tag() == b'A' {
                let raw = self.inbox.split_to(length);
                self.for_client.extend_from_slice(&raw);
                continue;
            }
            return Message::parse(&mut self.inbox)
                .map_err(|_| UpstreamError::Protocol("a malformed message"));
        }
    }
}

impl Upstream {
    /// What a failed `auth.begin_session()` means: when the login role
    /// carries session defaults of its own, they are cleared here and the
    /// failure becomes [`UpstreamError::RoleDefaults`] (another connection
    /// is worth trying); otherwise `other` wraps the server's error. The
    /// connection is broken either way.
    async fn begin_session_failed(
        &mut self,
        error: ServerError,
        deadline: Instant,
        other: fn(ServerError) -> UpstreamError,
    ) -> UpstreamError {
        self.broken = true;
        if error.code() != ROLE_DEFAULTS_SQLSTATE {
            return other(error);
        }
        let database = self.database.clone();
        match self.clear_role_defaults(&database, deadline).await {
            Ok(()) => {
                tracing::warn!(
                    role = %self.role,
                    "a client set session defaults on the login role (ALTER ROLE ... SET); \
                     cleared them, and closed the backend that started under them"
                );
                UpstreamError::RoleDefaults {
                    role: self.role.clone(),
                }
            }
            Err(repair) => repair,
        }
    }
}

/// The fields of an ErrorResponse body.
pub(crate) fn error_of(
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> ServerError {
    use fallible_iterator::FallibleIterator as _;
    let mut fields = Vec::new();
    let mut iter = body.fields();
    while let Ok(Some(field)) = iter.next() {
        fields.push((
            field.type_(),
            String::from_utf8_lossy(field.value_bytes()).into_owned(),
        ));
    }
    ServerError::from_fields(fields)
}

/// The first column of a DataRow as text, if it has one that is not NULL.
pub(crate) fn first_text(row: &postgres_protocol::message::backend::DataRowBody) -> Option<String> {
    use fallible_iterator::FallibleIterator as _;
    let range = row.ranges().next().ok()???;
    row.buffer()
        .get(range)
        .map(|bytes| String::from_utf8_lossy(bytes).into_owned())
}

/// Every column of a DataRow as text.
pub(crate) fn row_texts(
    row: &postgres_protocol::message::backend::DataRowBody,
) -> Result<Vec<Option<String>>, UpstreamError> {
    use fallible_iterator::FallibleIterator as _;
    let buffer = row.buffer();
    row.ranges()
        .map(|range| {
            Ok(range
                .and_then(|r| buffer.get(r))
                .map(|b| String::from_utf8_lossy(b).into_owned()))
        })
        .collect()
        .map_err(|_| UpstreamError::Protocol("a malformed DataRow"))
}
