//! Runs one /sql request on a pooled upstream connection.
//!
//! One round trip, one pipelined write: `BEGIN` with the batch options (for
//! a batch), the signed claims set *transaction-locally*, each query as
//! Parse/Bind/Describe/Execute with text parameters, `COMMIT`, `Sync`; then
//! `ROLLBACK` and `DISCARD ALL`, so the connection goes back to the pool
//! with no transaction, setting, prepared statement, temp table, lock or
//! LISTEN of this request; and `auth.begin_session()`, which starts the
//! identity generation the *next* request on this connection signs for, so
//! nothing this request saw or set can verify there.

use authgres_wire::ClaimsKey;
use authgres_wire::upstream::{IDLE, RESET_SESSION, Upstream, UpstreamError};
use bytes::BytesMut;
use fallible_iterator::FallibleIterator as _;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use serde_json::{Map, Value};

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
    fn begin(&self) -> Result<String, String> {
        let mut sql = "BEGIN".to_owned();
        if let Some(level) = &self.isolation {
            let level = match level.as_str() {
                "Serializable" => "SERIALIZABLE",
                "RepeatableRead" => "REPEATABLE READ",
                "ReadCommitted" => "READ COMMITTED",
                "ReadUncommitted" => "READ UNCOMMITTED",
                other => return Err(format!("unknown Neon-Batch-Isolation-Level {other:?}")),
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
    pub rows: Vec<Vec<Option<String>>>,
    /// Command tag, first word (`SELECT`, `INSERT`, ...).
    pub command: String,
    /// Rows affected or returned, when the tag says.
    pub row_count: Option<u64>,
}

/// A Postgres error, all its fields by their protocol code.
#[derive(Debug, Default)]
pub struct DbError {
    /// Field code (`C`, `M`, `D`, ...) → value.
    pub fields: Vec<(u8, String)>,
}

impl DbError {
    /// The SQLSTATE.
    pub fn code(&self) -> &str {
        self.field(b'C').unwrap_or("XX000")
    }

    /// One field.
    pub fn field(&self, code: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_str())
    }
}

/// Why a request did not produce results.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Postgres reported an error (the request's fault, or a conflict).
    #[error("database error {}", .0.code())]
    Db(DbError),
    /// The request itself is not valid (bad batch option).
    #[error("{0}")]
    Request(String),
    /// Results exceeded the response limit.
    #[error("response exceeds {0} bytes")]
    TooLarge(usize),
    /// The connection failed; it must not be reused.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
}

impl From<std::io::Error> for ExecError {
    /// Encoding a message fails only on input it cannot carry (a NUL byte
    /// in the query text): the request's fault.
    fn from(error: std::io::Error) -> Self {
        Self::Request(format!("cannot send this request to Postgres: {error}"))
    }
}

/// Executes `statements` on `conn` with `claims` (if any) attached for the
/// transaction. Returns the results, and whether the connection is clean
/// enough to reuse.
pub async fn execute(
    conn: &mut Upstream,
    key: &ClaimsKey,
    claims: Option<&str>,
    statements: &[Statement],
    batch: Option<&BatchOptions>,
    max_bytes: usize,
) -> Result<Vec<StatementResult>, ExecError> {
    let begin = batch
        .map(BatchOptions::begin)
        .transpose()
        .map_err(ExecError::Request)?;
    // A connection that served anyone is reset before this request sees it.
    conn.claim(authgres_wire::upstream::next_client_id())
        .await?;
    let binding = match conn.next_binding.take() {
        Some(binding) => binding,
        None => conn.begin_session().await?,
    };
    let mut out = BytesMut::with_capacity(1024);
    let mut steps = Vec::new();
    if let Some(begin) = &begin {
        internal(begin, &[], &mut out)?;
        steps.push(Step::Internal);
    }
    if let Some(claims) = claims {
        let signature = key.sign(&binding, claims);
        internal(
            "select pg_catalog.set_config('authgres.claims', $1::pg_catalog.text, true), \
             pg_catalog.set_config('authgres.signature', $2::pg_catalog.text, true)",
            &[Some(claims), Some(signature.as_str())],
            &mut out,
        )?;
        steps.push(Step::Internal);
    }
    for statement in statements {
        let params: Vec<Option<String>> = statement
            .params
            .iter()
            .map(crate::render::param_text)
            .collect();
        frontend::parse("", &statement.query, std::iter::empty(), &mut out)?;
        bind(&params, &mut out)?;
        frontend::describe(b'P', "", &mut out)?;
        frontend::execute("", 0, &mut out)?;
        steps.push(Step::User);
    }
    if begin.is_some() {
        internal("COMMIT", &[], &mut out)?;
        steps.push(Step::Internal);
    }
    frontend::sync(&mut out);
    // Clean-up for the pool and the next request's generation, pipelined.
    frontend::query(RESET_SESSION, &mut out)?;
    conn.send(&mut out).await?;

    let mut results = Vec::new();
    let mut failure: Option<DbError> = None;
    let mut step = 0;
    let mut current = StatementResult::default();
    let mut size = 0usize;
    let mut too_large = false;
    let status;
    loop {
        match conn.next_message().await? {
            Message::ParseComplete | Message::BindComplete | Message::NoData => {}
            Message::RowDescription(body) => {
                let mut fields = body.fields();
                while let Some(field) = fields.next().map_err(UpstreamError::Io)? {
                    size += field.name().len() + 64;
                    current.fields.push(Field {
                        name: field.name().to_owned(),
                        table_oid: field.table_oid(),
                        column_id: field.column_id(),
                        type_oid: field.type_oid(),
                        type_size: field.type_size(),
                        type_modifier: field.type_modifier(),
                    });
                }
            }
            Message::DataRow(row) => {
                if steps.get(step) != Some(&Step::User) || too_large {
                    continue;
                }
                let buffer = row.buffer();
                let mut ranges = row.ranges();
                let mut values = Vec::new();
                while let Some(range) = ranges.next().map_err(UpstreamError::Io)? {
                    values.push(range.map(|r| {
                        size += r.len() + 4;
                        String::from_utf8_lossy(&buffer[r]).into_owned()
                    }));
                }
                if size > max_bytes {
                    too_large = true;
                    current.rows.clear();
                } else {
                    current.rows.push(values);
                }
            }
            Message::CommandComplete(body) => {
                let tag = body.tag().map_err(UpstreamError::Io)?;
                finish_step(&steps, &mut step, &mut current, &mut results, Some(tag));
            }
            Message::EmptyQueryResponse => {
                finish_step(&steps, &mut step, &mut current, &mut results, None);
            }
            Message::ErrorResponse(body) => {
                let mut error = DbError::default();
                let mut fields = body.fields();
                while let Some(field) = fields.next().map_err(UpstreamError::Io)? {
                    error.fields.push((
                        field.type_(),
                        String::from_utf8_lossy(field.value_bytes()).into_owned(),
                    ));
                }
                failure.get_or_insert(error);
            }
            Message::ReadyForQuery(body) => {
                status = body.status();
                break;
            }
            _ => {}
        }
    }
    let reset = conn.finish_reset(1).await;
    if status != IDLE {
        // The request left a transaction open or failed inside one: the
        // pipelined reset ran inside it. Roll back and reset again.
        conn.reset().await?;
    } else {
        reset?;
    }
    if let Some(error) = failure {
        return Err(ExecError::Db(error));
    }
    if too_large {
        return Err(ExecError::TooLarge(max_bytes));
    }
    Ok(results)
}

#[derive(Debug, PartialEq, Eq)]
enum Step {
    Internal,
    User,
}

fn finish_step(
    steps: &[Step],
    step: &mut usize,
    current: &mut StatementResult,
    results: &mut Vec<StatementResult>,
    tag: Option<&str>,
) {
    let mut done = std::mem::take(current);
    if steps.get(*step) == Some(&Step::User) {
        if let Some(tag) = tag {
            done.command = tag.split(' ').next().unwrap_or("").to_owned();
            done.row_count = tag.rsplit(' ').next().and_then(|n| n.parse().ok());
        }
        results.push(done);
    }
    *step += 1;
}

fn internal(sql: &str, params: &[Option<&str>], out: &mut BytesMut) -> Result<(), UpstreamError> {
    frontend::parse("", sql, std::iter::empty(), out)?;
    let owned: Vec<Option<String>> = params.iter().map(|p| p.map(str::to_owned)).collect();
    bind(&owned, out)?;
    frontend::execute("", 0, out)?;
    Ok(())
}

fn bind(params: &[Option<String>], out: &mut BytesMut) -> Result<(), UpstreamError> {
    frontend::bind(
        "",
        "",
        [0i16],
        params.iter(),
        |value, buf| match value {
            Some(text) => {
                buf.extend_from_slice(text.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            }
            None => Ok(postgres_protocol::IsNull::Yes),
        },
        [0i16],
        out,
    )
    .map_err(|e| match e {
        frontend::BindError::Conversion(e) => UpstreamError::Protocol(e.to_string()),
        frontend::BindError::Serialization(e) => UpstreamError::Io(e),
    })
}

/// A result as the Neon driver expects it.
pub fn result_json(result: &StatementResult, array_mode: bool, raw: bool) -> Value {
    let fields: Vec<Value> = result
        .fields
        .iter()
        .map(|f| {
            serde_json::json!({
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
                .iter()
                .zip(&result.fields)
                .map(|(value, field)| crate::render::render(value.as_deref(), field.type_oid, raw));
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
    serde_json::json!({
        "fields": fields,
        "command": result.command,
        "rowCount": result.row_count,
        "rows": rows,
        "rowAsArray": array_mode,
    })
}
