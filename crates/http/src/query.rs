//! Runs one /sql request on a pooled upstream connection.
//!
//! One round trip, the request pipelined ([`start`]): each query as
//! Parse/Bind/Describe/Execute with text parameters, inside the envelope
//! wire builds for running statements under an identity
//! ([`Upstream::envelope`]: `BEGIN` for a batch, the signed claims unless
//! the connection holds them already, then `COMMIT` and `Sync`). The
//! statements are encoded once, before a connection is
//! chosen ([`encode`]), so that the request's text can be freed as soon as
//! it is sent; results are read by [`finish`].
//!
//! Nothing a request saw or set reaches the next one. An anonymous
//! request's connection is reset in the same round trip. A request with a
//! token leaves its connection holding the token's session (the claims
//! attached, nothing else) for the next request of the same token, which
//! then skips the reset and the attach; only when it ended idle, without
//! an error, and neither its statements' text nor their command tags show
//! anything that can outlive the transaction (what transaction pooling's
//! [`Tracker`] looks for, plus session advisory locks, `setseed`,
//! `begin_session`, temporary tables and a `ROLLBACK` that may undo the
//! attach). Otherwise
//! the connection is reset before it goes back to the pool. Any other
//! identity gets the connection only after a reset.
//!
//! The request's statements run under `[http] statement_timeout`, the
//! proxy's own exchanges under the upstream `internal_query_timeout`. A
//! request abandoned while its statements run (the timeout passed, the
//! connection failed, the client hung up and the request's future was
//! dropped) has them cancelled on the server with a CancelRequest: a
//! backend keeps running a statement whose client is gone until it next
//! writes, and closing the socket does not stop it.

use std::sync::Arc;
use std::time::Duration;

use authgres_wire::{
    ClaimsKey, Envelope, PendingReset, RequestIdentity, ServerError, SessionShape, Tracker,
    Upstream, UpstreamError, UpstreamKey,
};
use bytes::BytesMut;
use fallible_iterator::FallibleIterator as _;
use postgres_protocol::message::backend::Message;
use serde_json::{Map, Value};
use tokio::time::{Instant, timeout_at};

/// One statement of a request.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Statement {
    /// SQL text with `$n` placeholders.
    pub query: String,
    /// Parameter values.
    #[serde(default)]
    pub params: Vec<Value>,
}

/// Options of a batch (`Neon-Batch-*` headers).
#[derive(Debug, Default, Clone)]
pub struct BatchOptions {
    /// `Serializable`, `ReadUncommitted`, `ReadCommitted`, `RepeatableRead`.
    pub isolation: Option<String>,
    /// `READ ONLY` when true, `READ WRITE` when false.
    pub read_only: Option<bool>,
    /// `DEFERRABLE` when true.
    pub deferrable: Option<bool>,
}

impl BatchOptions {
    /// The `BEGIN` statement these options make.
    pub fn begin(&self) -> Result<String, ExecError> {
        let mut sql = "BEGIN".to_owned();
        if let Some(level) = &self.isolation {
            let level = match level.as_str() {
                "Serializable" => "SERIALIZABLE",
                "RepeatableRead" => "REPEATABLE READ",
                "ReadCommitted" => "READ COMMITTED",
                "ReadUncommitted" => "READ UNCOMMITTED",
                other => return Err(ExecError::Isolation(other.to_owned())),
            };
            sql.push_str(" ISOLATION LEVEL ");
            sql.push_str(level);
        }
        match self.read_only {
            Some(true) => sql.push_str(" READ ONLY"),
            Some(false) => sql.push_str(" READ WRITE"),
            None => {}
        }
        if self.deferrable == Some(true) {
            sql.push_str(" DEFERRABLE");
        }
        Ok(sql)
    }
}

/// A column of a result.
#[derive(Debug, Clone)]
pub struct Field {
    /// Column name.
    pub name: String,
    /// OID of the source table, 0 if none.
    pub table_oid: u32,
    /// Column number in the source table, 0 if none.
    pub column_id: i16,
    /// Type OID.
    pub type_oid: u32,
    /// Type size.
    pub type_size: i16,
    /// Type modifier.
    pub type_modifier: i32,
}

/// The outcome of one statement.
#[derive(Debug, Default)]
pub struct StatementResult {
    /// Columns (empty for statements without rows).
    pub fields: Vec<Field>,
    /// Rows as text values.
    pub rows: Rows,
    /// Command tag, first word (`SELECT`, `INSERT`, ...).
    pub command: String,
    /// Rows affected or returned, when the tag says.
    pub row_count: Option<u64>,
}

/// A result's rows: every value's text in one buffer, each value a range
/// of it (`None`: NULL), row after row, each row as wide as the result's
/// fields (none, for `SELECT FROM t`). Two allocations a result rather
/// than one a value.
#[derive(Debug, Default)]
pub struct Rows {
    text: String,
    values: Vec<Option<std::ops::Range<usize>>>,
    /// Values a row.
    width: usize,
    count: usize,
}

impl Rows {
    /// No rows yet, each to be `width` values.
    pub fn new(width: usize) -> Self {
        Self {
            width,
            ..Self::default()
        }
    }

    /// How many rows there are.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends a value to the row being read (bytes that are not UTF-8
    /// become U+FFFD); [`Rows::end_row`] ends the row.
    pub fn push_value(&mut self, value: Option<&[u8]>) {
        self.values.push(value.map(|bytes| {
            let start = self.text.len();
            self.text.push_str(&String::from_utf8_lossy(bytes));
            start..self.text.len()
        }));
    }

    /// Ends the row [`Rows::push_value`] appended to; false, and the row
    /// is not counted, when it is not as wide as the rows are.
    pub fn end_row(&mut self) -> bool {
        let whole = self.values.len() == (self.count + 1) * self.width;
        if whole {
            self.count += 1;
        }
        whole
    }

    /// Forgets every row.
    pub fn clear(&mut self) {
        self.text.clear();
        self.values.clear();
        self.count = 0;
    }

    /// The rows, in order.
    pub fn iter(&self) -> impl Iterator<Item = Row<'_>> {
        (0..self.count).map(|row| Row {
            text: &self.text,
            values: (self.values)
                .get(row * self.width..(row + 1) * self.width)
                .unwrap_or_default(),
        })
    }
}

/// One row of [`Rows`].
pub struct Row<'a> {
    text: &'a str,
    values: &'a [Option<std::ops::Range<usize>>],
}

impl<'a> Row<'a> {
    /// Its values' text, in column order (`None`: NULL).
    pub fn values(&self) -> impl Iterator<Item = Option<&'a str>> + use<'a> {
        let text = self.text;
        (self.values.iter()).map(move |range| range.clone().and_then(|range| text.get(range)))
    }
}

/// Why a request did not produce results.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Postgres reported an error (the request's fault, or a conflict).
    #[error("database error {}", .0.code())]
    Db(ServerError),
    /// A `Neon-Batch-Isolation-Level` that is not one of the four.
    #[error("unknown Neon-Batch-Isolation-Level {0:?}")]
    Isolation(String),
    /// The request cannot be sent to Postgres (a NUL byte in its text).
    #[error("cannot send this request to Postgres: {0}")]
    Encode(std::io::Error),
    /// Results exceeded the response limit.
    #[error("response exceeds {0} bytes")]
    TooLarge(usize),
    /// The request's statements ran past `statement_timeout` and were
    /// cancelled.
    #[error("the statements ran longer than {0:?} and were cancelled")]
    StatementTimeout(Duration),
    /// Readying the connection failed before anything of the request was
    /// sent: another connection may serve it.
    #[error("readying the connection failed: {0}")]
    Readying(UpstreamError),
    /// The connection failed; it is not reused.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

/// How long a request may take on its connection.
#[derive(Clone, Copy)]
pub struct Limits {
    /// Largest response, in bytes.
    pub max_bytes: usize,
    /// Deadline of each exchange the proxy runs on its own (readying the
    /// connection, the reset after the request).
    pub internal_timeout: Duration,
    /// Time the request's own statements may run, all together.
    pub statement_timeout: Duration,
}

/// ReadyForQuery status outside a transaction block.
const IDLE: u8 = b'I';

/// Who a request runs as.
#[derive(Clone, Copy)]
pub struct Caller<'a> {
    /// The key the claims are signed with.
    pub key: &'a ClaimsKey,
    /// The verified claims (JSON); `None` for an anonymous role.
    pub claims: Option<&'a str>,
    /// The request's owner tag for its connection (a fresh
    /// [`authgres_wire::next_client_id`]).
    pub client: u64,
    /// Its session, which a connection may keep for the next request of
    /// the same token (`None`: anonymous, reset after every request).
    pub shape: Option<&'a Arc<SessionShape>>,
}

/// A request's own statements in the extended protocol, encoded once
/// before a connection is chosen, so the request's text (and the body it
/// came from) can be freed as soon as it is sent.
pub struct Encoded {
    bytes: BytesMut,
    count: usize,
    /// Whether a statement's text shows it may leave session state
    /// ([`may_touch_session`]).
    touches: bool,
}

/// Encodes `statements` (Parse/Bind/Describe/Execute each, text
/// parameters).
pub fn encode(statements: &[Statement]) -> Result<Encoded, ExecError> {
    // Sized once: growing the buffer of a large request by doubling would
    // hold one and a half copies of it more.
    let text: usize = statements
        .iter()
        .map(|s| s.query.len() + s.params.iter().map(param_size).sum::<usize>())
        .sum();
    let mut bytes = BytesMut::with_capacity(text + 64 * statements.len());
    let mut touches = false;
    for statement in statements {
        touches |= may_touch_session(&statement.query);
        let params: Vec<Option<String>> = statement
            .params
            .iter()
            .map(crate::render::param_text)
            .collect();
        let params: Vec<Option<&str>> = params.iter().map(Option::as_deref).collect();
        authgres_wire::append_described(&mut bytes, &statement.query, &params)
            .map_err(encode_error)?;
    }
    Ok(Encoded {
        bytes,
        count: statements.len(),
        touches,
    })
}

/// Whether a statement's text shows that it may leave session state no
/// command tag reveals: a call of `set_config` (as transaction pooling's
/// [`Tracker`] finds it), a session advisory lock (not the `xact` ones), a
/// random seed, a new identity generation (`auth.begin_session()`, after
/// which the attached claims no longer verify), or the word
/// `temp`/`temporary` or a name in `pg_temp` (`SELECT ... INTO TEMP`,
/// `CREATE TEMP TABLE ... AS` and `CREATE TABLE pg_temp.t AS` complete as
/// `SELECT`); a name or string spelled with Unicode escapes (`U&"..."`)
/// may be any of these. False alarms cost a reset.
fn may_touch_session(text: &str) -> bool {
    Tracker::text_mentions(
        text.as_bytes(),
        &[
            b"set_config",
            b"advisory_lock",
            b"setseed",
            b"begin_session",
            b"pg_temp",
        ],
        &[b"temp", b"temporary"],
    )
}

/// Whether a statement's command tag shows it may have left session state:
/// one transaction pooling tracks, or a `ROLLBACK` (also to a savepoint),
/// which may have undone the identity attached in the same transaction.
fn tag_touches_session(tag: &str) -> bool {
    Tracker::leaves_session_state(tag.as_bytes()) || tag == "ROLLBACK"
}

/// About the size of a parameter's text on the wire.
fn param_size(value: &Value) -> usize {
    match value {
        Value::String(text) => text.len() + 8,
        _ => 32,
    }
}

/// Room for what a server message holds beside its values (its header, a
/// DataRow's column lengths): a message longer than the response limit by
/// more than this carries more values than the response may hold.
const MESSAGE_OVERHEAD: usize = 64 * 1024;

/// What a row adds to the answer besides its values (`[]`/`{}` and a
/// comma), counted toward the response limit as its values are.
const ROW_OVERHEAD: usize = 4;

/// Above this, a request's statements are written on their own rather
/// than copied between the proxy's own messages.
const COPY_LIMIT: usize = 64 * 1024;

/// A request sent on a connection and its reply not yet read.
pub struct InFlight {
    steps: Vec<Step>,
    /// The reset pipelined after an anonymous request.
    reset: Option<PendingReset>,
    /// The session a request with a token may leave on the connection.
    keep: Option<Arc<SessionShape>>,
    /// Whether the statements' text shows they may leave session state.
    touches: bool,
    running: Running,
    deadline: Instant,
}

/// Readies `conn` and sends the request: `BEGIN` (for a batch), the claims
/// (if any, and not attached already), the statements, `COMMIT`, `Sync`
/// and, for an anonymous request, the reset. The statements' time
/// (`statement_timeout`) starts here;
/// read their results with [`finish`]. If the returned request is dropped
/// before that (the client hung up), its statements are cancelled on the
/// server, and the connection, dropped too, is closed.
pub async fn start(
    conn: &mut Upstream,
    caller: Caller<'_>,
    statements: &Encoded,
    batch: Option<&BatchOptions>,
    limits: Limits,
) -> Result<InFlight, ExecError> {
    let begin = batch.map(BatchOptions::begin).transpose()?;
    let internal = Instant::now() + limits.internal_timeout;
    let identity = RequestIdentity {
        key: caller.key,
        claims: caller.claims,
        begin: begin.as_deref(),
        client: caller.client,
        shape: caller.shape.map(|shape| &**shape),
    };
    // A connection that served anyone but the same token's earlier
    // requests is reset before this request sees it.
    let Envelope {
        mut head,
        tail,
        replies_before,
        replies_after,
        reset,
    } = conn
        .envelope(identity, internal)
        .await
        .map_err(ExecError::Readying)?;
    let steps = std::iter::repeat_n(Step::Internal, replies_before)
        .chain(std::iter::repeat_n(Step::User, statements.count))
        .chain(std::iter::repeat_n(Step::Internal, replies_after))
        .collect();

    let running = Running::new(conn.cancel_key());
    let deadline = Instant::now() + limits.statement_timeout;
    let sending = timeout_at(deadline, async {
        // A server that stops reading is abandoned like a slow statement.
        if statements.bytes.len() <= COPY_LIMIT {
            head.extend_from_slice(&statements.bytes);
            head.extend_from_slice(&tail);
            conn.send(&head).await?;
        } else {
            conn.send(&head).await?;
            conn.send(&statements.bytes).await?;
            conn.send(&tail).await?;
        }
        Ok::<(), UpstreamError>(())
    })
    .await;
    match sending {
        Ok(Ok(())) => Ok(InFlight {
            steps,
            reset,
            keep: caller.shape.cloned(),
            touches: statements.touches,
            running,
            deadline,
        }),
        Ok(Err(error)) => {
            // The connection is broken and will be closed; what reached
            // the server must not run on.
            running.cancel().await;
            Err(ExecError::Upstream(error))
        }
        Err(_elapsed) => {
            // Half a message sent: nothing can prove this connection idle.
            conn.mark_broken();
            running.cancel().await;
            Err(ExecError::StatementTimeout(limits.statement_timeout))
        }
    }
}

/// Reads the results of a request [`start`] sent, within its statement
/// timeout; past it, or when an error leaves them behind, the statements
/// are cancelled on the server, and the connection is reused only once
/// the reset proves it idle. A request with a token that left nothing in
/// the session leaves its connection as it is ([`settle`]).
pub async fn finish(
    conn: &mut Upstream,
    request: InFlight,
    limits: Limits,
) -> Result<Vec<StatementResult>, ExecError> {
    let InFlight {
        steps,
        reset,
        keep,
        touches,
        running,
        deadline,
    } = request;
    let mut collect = Collect::new(&steps, limits.max_bytes, touches);
    // The outer deadline comes first: the inner one only bounds the read.
    let read_by = deadline + limits.internal_timeout;
    // A message larger than the whole response can never be answered:
    // refused from its header, before it is buffered.
    let max_message = limits.max_bytes.saturating_add(MESSAGE_OVERHEAD);
    let reading = conn.read_reply_within(read_by, max_message, |message| collect.message(message));
    let reply = match timeout_at(deadline, reading).await {
        Ok(Ok(reply)) => {
            running.finished();
            reply
        }
        Ok(Err(error)) => {
            // The connection is broken and will be closed; what it was
            // running must not run on.
            running.cancel().await;
            return Err(match error {
                UpstreamError::MessageTooLong(_) => ExecError::TooLarge(limits.max_bytes),
                error => ExecError::Upstream(error),
            });
        }
        Err(_elapsed) => {
            if !running.cancel().await {
                // No cancel delivered: nothing can prove it idle.
                conn.mark_broken();
            } else if let Err(error) =
                settle(conn, reset, None, Instant::now() + limits.internal_timeout).await
            {
                // The reset skips whatever the cancelled statements still
                // had to say; a backend that does not come back idle is
                // closed (finish_reset marked it broken).
                tracing::debug!(%error, "a timed-out /sql connection did not come back idle");
            }
            return Err(ExecError::StatementTimeout(limits.statement_timeout));
        }
    };
    let clean =
        reply.error.is_none() && reply.status == IDLE && !collect.touched && !collect.too_large;
    let keep = keep.filter(|_| clean);
    settle(conn, reset, keep, Instant::now() + limits.internal_timeout).await?;
    if let Some(error) = reply.error {
        return Err(ExecError::Db(error));
    }
    if collect.too_large {
        return Err(ExecError::TooLarge(limits.max_bytes));
    }
    Ok(collect.results)
}

/// Brings a connection whose request's replies are all read back for the
/// next request, within `deadline`: an anonymous request's by reading the
/// reset in its tail; one with a token left `keep` (it ended clean) as it
/// is, holding that session for the next request of the same token;
/// otherwise by a reset, read before the connection can go back.
async fn settle(
    conn: &mut Upstream,
    reset: Option<PendingReset>,
    keep: Option<Arc<SessionShape>>,
    deadline: Instant,
) -> Result<(), UpstreamError> {
    match (reset, keep) {
        (Some(pending), _) => conn.finish_reset(pending, deadline).await,
        (None, Some(shape)) => {
            conn.share_as(Some(shape));
            Ok(())
        }
        (None, None) => conn.reset(deadline).await,
    }
}

/// A request's statements sent and their reply not yet read: if this is
/// dropped first (the request was abandoned), they are cancelled on the
/// server, so nothing runs on for a client that is gone.
struct Running {
    target: Option<UpstreamKey>,
}

impl Running {
    fn new(key: UpstreamKey) -> Self {
        Self { target: Some(key) }
    }

    /// The reply was read: nothing is left running.
    fn finished(mut self) {
        self.target = None;
    }

    /// Cancels the statements now; returns whether the server took the
    /// CancelRequest.
    async fn cancel(mut self) -> bool {
        let Some(key) = self.target.take() else {
            return true;
        };
        match key.cancel().await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(%error, "could not cancel an abandoned /sql statement");
                false
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(key) = self.target.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            if let Err(error) = key.cancel().await {
                tracing::warn!(%error, "could not cancel an abandoned /sql statement");
            }
        });
    }
}

/// An encoding failure of a statement the request supplied.
fn encode_error(error: UpstreamError) -> ExecError {
    match error {
        UpstreamError::Encode(error) => ExecError::Encode(error),
        other => ExecError::Upstream(other),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Internal,
    User,
}

/// Collects a request's results from the server's messages.
struct Collect<'a> {
    steps: &'a [Step],
    step: usize,
    current: StatementResult,
    results: Vec<StatementResult>,
    size: usize,
    max_bytes: usize,
    too_large: bool,
    /// Whether a statement may have left session state (its text, then
    /// its command tag).
    touched: bool,
}

impl<'a> Collect<'a> {
    /// Ready to collect the replies to `steps`, within `max_bytes`;
    /// `touched` when the statements' text already shows they may leave
    /// session state.
    fn new(steps: &'a [Step], max_bytes: usize, touched: bool) -> Self {
        Self {
            steps,
            step: 0,
            current: StatementResult::default(),
            results: Vec::new(),
            size: 0,
            max_bytes,
            too_large: false,
            touched,
        }
    }

    fn message(&mut self, message: Message) -> Result<(), UpstreamError> {
        let malformed = |_| UpstreamError::Protocol("a malformed result message");
        match message {
            Message::RowDescription(body) => {
                let mut fields = body.fields();
                while let Some(field) = fields.next().map_err(malformed)? {
                    self.size += field.name().len() + 64;
                    self.current.fields.push(Field {
                        name: field.name().to_owned(),
                        table_oid: field.table_oid(),
                        column_id: field.column_id(),
                        type_oid: field.type_oid(),
                        type_size: field.type_size(),
                        type_modifier: field.type_modifier(),
                    });
                }
                self.current.rows = Rows::new(self.current.fields.len());
            }
            Message::DataRow(row) => {
                if self.steps.get(self.step) != Some(&Step::User) || self.too_large {
                    return Ok(());
                }
                // A row costs its brackets and comma in the answer even
                // without values (`SELECT FROM t`).
                self.size += ROW_OVERHEAD;
                let buffer = row.buffer();
                let mut ranges = row.ranges();
                while let Some(range) = ranges.next().map_err(malformed)? {
                    let value = range.and_then(|r| buffer.get(r));
                    self.size += value.map_or(0, <[u8]>::len) + 4;
                    self.current.rows.push_value(value);
                }
                if !self.current.rows.end_row() {
                    return Err(UpstreamError::Protocol(
                        "a data row as wide as no row description",
                    ));
                }
                if self.size > self.max_bytes {
                    self.too_large = true;
                    self.current.rows.clear();
                }
            }
            Message::CommandComplete(body) => {
                let tag = body.tag().map_err(malformed)?;
                if self.steps.get(self.step) == Some(&Step::User) {
                    self.touched |= tag_touches_session(tag);
                }
                self.finish_step(Some(tag));
            }
            Message::EmptyQueryResponse => self.finish_step(None),
            _ => {}
        }
        Ok(())
    }

    fn finish_step(&mut self, tag: Option<&str>) {
        let mut done = std::mem::take(&mut self.current);
        if self.steps.get(self.step) == Some(&Step::User) {
            if let Some(tag) = tag {
                done.command = tag.split(' ').next().unwrap_or("").to_owned();
                done.row_count = tag.rsplit(' ').next().and_then(|n| n.parse().ok());
            }
            self.results.push(done);
        }
        self.step += 1;
    }
}

/// Appends the JSON of a result as the Neon driver expects it to `out`:
/// written straight from the result, keys in the order `serde_json`'s
/// sorted maps gave them, with no `Value` tree built on the way (most of
/// a small request's time went there).
pub fn write_result(out: &mut Vec<u8>, result: &StatementResult, array_mode: bool, raw: bool) {
    out.extend_from_slice(b"{\"command\":");
    write_str(out, &result.command);
    out.extend_from_slice(b",\"fields\":[");
    for (i, field) in result.fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"columnID\":");
        write_int(out, field.column_id);
        out.extend_from_slice(b",\"dataTypeID\":");
        write_int(out, field.type_oid);
        out.extend_from_slice(b",\"dataTypeModifier\":");
        write_int(out, field.type_modifier);
        out.extend_from_slice(b",\"dataTypeSize\":");
        write_int(out, field.type_size);
        out.extend_from_slice(b",\"format\":\"text\",\"name\":");
        write_str(out, &field.name);
        out.extend_from_slice(b",\"tableID\":");
        write_int(out, field.table_oid);
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"rowAsArray\":");
    out.extend_from_slice(if array_mode { b"true" } else { b"false" });
    out.extend_from_slice(b",\"rowCount\":");
    match result.row_count {
        Some(count) => write_int(out, count),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"rows\":[");
    for (i, row) in result.rows.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if array_mode {
            out.push(b'[');
            for (j, (value, field)) in row.values().zip(&result.fields).enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                write_value(out, value, field.type_oid, raw);
            }
            out.push(b']');
        } else {
            // Keys sorted, a name twice keeping its last value: what a
            // JSON object built by name gives.
            let mut object = Map::new();
            for (value, field) in row.values().zip(&result.fields) {
                let value = crate::render::render(value, field.type_oid, raw);
                object.insert(field.name.clone(), value);
            }
            write_json(out, &object);
        }
    }
    out.extend_from_slice(b"]}");
}

/// One value of a row: raw text as a JSON string as it is, typed values
/// by the rules of [`crate::render`].
fn write_value(out: &mut Vec<u8>, text: Option<&str>, type_oid: u32, raw: bool) {
    match text {
        None => out.extend_from_slice(b"null"),
        Some(text) if raw => write_str(out, text),
        Some(text) => write_json(out, &crate::render::render(Some(text), type_oid, raw)),
    }
}

fn write_str(out: &mut Vec<u8>, text: &str) {
    write_json(out, text);
}

fn write_int(out: &mut Vec<u8>, n: impl serde::Serialize) {
    write_json(out, &n);
}

fn write_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Writing to a Vec fails only for a value that cannot be JSON, and
    // strings, integers and `Value`s always can.
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"null");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The response as it was built before: a `Value` tree, serialized.
    fn as_value(result: &StatementResult, array_mode: bool, raw: bool) -> Value {
        let fields: Vec<Value> = result
            .fields
            .iter()
            .map(|f| {
                json!({
                    "name": f.name,
                    "tableID": f.table_oid,
                    "columnID": f.column_id,
                    "dataTypeID": f.type_oid,
                    "dataTypeSize": f.type_size,
                    "dataTypeModifier": f.type_modifier,
                    "format": "text",
                })
            })
            .collect();
        let rows: Vec<Value> = result
            .rows
            .iter()
            .map(|row| {
                let values = row
                    .values()
                    .zip(&result.fields)
                    .map(|(value, field)| crate::render::render(value, field.type_oid, raw));
                if array_mode {
                    Value::Array(values.collect())
                } else {
                    let mut object = Map::new();
                    for (value, field) in values.zip(&result.fields) {
                        object.insert(field.name.clone(), value);
                    }
                    Value::Object(object)
                }
            })
            .collect();
        json!({
            "fields": fields,
            "command": result.command,
            "rowCount": result.row_count,
            "rows": rows,
            "rowAsArray": array_mode,
        })
    }

    fn field(name: &str, type_oid: u32) -> Field {
        Field {
            name: name.to_owned(),
            table_oid: 16429,
            column_id: -2,
            type_oid,
            type_size: -1,
            type_modifier: -1,
        }
    }

    #[test]
    fn what_may_leave_session_state_is_seen_in_text_or_tag() {
        for text in [
            "select set_config('a.b', '1', false)",
            "SELECT PG_CATALOG.SET_CONFIG('a.b', '1', false)",
            "select pg_advisory_lock(1)",
            "select pg_try_advisory_lock_shared(1)",
            "select setseed(0.5)",
            "select auth.begin_session()",
            "select 1 into TEMP t",
            "create temporary table t as select 1",
            "select 1 into pg_temp.t",
            "create table PG_TEMP.t as select 1",
            "select * from pg_temp_3.t",
            r#"select U&"set\005Fconfig"('a.b', '1', false)"#,
            r#"create table U&"pg\005Ftemp".t as select 1"#,
        ] {
            assert!(may_touch_session(text), "{text}");
        }
        for text in [
            "select * from todos where user_id = auth.user_id()",
            "select pg_advisory_xact_lock(1)",
            "select temperature, temp_c from temps",
        ] {
            assert!(!may_touch_session(text), "{text}");
        }
        for tag in [
            "SET",
            "RESET",
            "DISCARD ALL",
            "LISTEN",
            "ROLLBACK",
            "CREATE TABLE",
        ] {
            assert!(tag_touches_session(tag), "{tag}");
        }
        for tag in ["SELECT 1", "INSERT 0 1", "COMMIT", "BEGIN", "SETTINGS"] {
            assert!(!tag_touches_session(tag), "{tag}");
        }
    }

    fn rows(width: usize, values: &[&[Option<&str>]]) -> Rows {
        let mut rows = Rows::new(width);
        for row in values {
            for value in *row {
                rows.push_value(value.map(str::as_bytes));
            }
            assert!(rows.end_row(), "{width} values a row");
        }
        rows
    }

    /// A server message from its type and body.
    fn message(tag: u8, body: &[u8]) -> Message {
        let mut bytes = BytesMut::new();
        bytes.extend_from_slice(&[tag]);
        let len = i32::try_from(body.len() + 4).expect("small");
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(body);
        Message::parse(&mut bytes).expect("parses").expect("whole")
    }

    #[test]
    fn rows_without_columns_count_toward_the_response_limit() {
        let steps = [Step::User];
        let mut collect = Collect::new(&steps, 1000, false);
        // `SELECT FROM generate_series(1, 1000)`: no fields, rows of none.
        let no_fields = message(b'T', &0i16.to_be_bytes());
        collect.message(no_fields).expect("row description");
        for _ in 0..1000 {
            let row = message(b'D', &0i16.to_be_bytes());
            collect.message(row).expect("row");
        }
        assert!(collect.too_large, "1,000 rows answered within 1,000 bytes");
        assert!(collect.current.rows.is_empty());
    }

    #[test]
    fn a_data_row_wider_or_narrower_than_its_description_is_refused() {
        let steps = [Step::User];
        let collect = || Collect::new(&steps, 1000, false);
        // One text column named "a".
        let mut description = 1i16.to_be_bytes().to_vec();
        description.extend_from_slice(b"a\0");
        description.extend_from_slice(&0u32.to_be_bytes());
        description.extend_from_slice(&0i16.to_be_bytes());
        description.extend_from_slice(&25u32.to_be_bytes());
        description.extend_from_slice(&(-1i16).to_be_bytes());
        description.extend_from_slice(&(-1i32).to_be_bytes());
        description.extend_from_slice(&0i16.to_be_bytes());
        let row = |values: &[&[u8]]| {
            let mut body = i16::try_from(values.len())
                .expect("few")
                .to_be_bytes()
                .to_vec();
            for value in values {
                body.extend_from_slice(&i32::try_from(value.len()).expect("short").to_be_bytes());
                body.extend_from_slice(value);
            }
            message(b'D', &body)
        };
        let mut fits = collect();
        fits.message(message(b'T', &description))
            .expect("row description");
        fits.message(row(&[b"x"])).expect("as wide as described");
        assert_eq!(fits.current.rows.len(), 1);
        for values in [&[][..], &[&b"x"[..], &b"y"[..]][..]] {
            let mut collect = collect();
            collect
                .message(message(b'T', &description))
                .expect("row description");
            assert!(
                matches!(
                    collect.message(row(values)),
                    Err(UpstreamError::Protocol(_))
                ),
                "{} values for one column",
                values.len()
            );
        }
    }

    #[test]
    fn results_are_written_as_the_value_tree_serialized_them() {
        let result = StatementResult {
            fields: vec![
                field("id", 20),
                field("task \"quoted\"\n", 25),
                field("done", 16),
                field("doc", 3802),
                field("ints", 1007),
                field("id", 23),
            ],
            rows: rows(
                6,
                &[
                    &[
                        Some("1"),
                        Some("tab\there \u{1}é"),
                        Some("t"),
                        Some(r#"{"b": [1, 2], "a": null}"#),
                        Some("{1,NULL,3}"),
                        Some("7"),
                    ],
                    &[None, None, None, None, None, None],
                ],
            ),
            command: "SELECT".into(),
            row_count: Some(2),
        };
        // `SELECT FROM generate_series(1, 3)`: rows without columns.
        let no_columns = StatementResult {
            rows: rows(0, &[&[], &[], &[]]),
            command: "SELECT".into(),
            row_count: Some(3),
            ..StatementResult::default()
        };
        let empty = StatementResult {
            command: "INSERT".into(),
            ..StatementResult::default()
        };
        assert_eq!(no_columns.rows.iter().count(), 3);
        for result in [&result, &empty, &no_columns] {
            for (array_mode, raw) in [(true, true), (true, false), (false, true), (false, false)] {
                let mut out = Vec::new();
                write_result(&mut out, result, array_mode, raw);
                let expected =
                    serde_json::to_vec(&as_value(result, array_mode, raw)).expect("json");
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&expected),
                    "array_mode {array_mode}, raw {raw}"
                );
            }
        }
    }
}
