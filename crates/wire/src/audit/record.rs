//! One session's audit lines: the fields fixed at login
//! ([`SessionAudit`]), and what a transaction adds to them as it runs
//! ([`Recorder`]): rows from CommandComplete tags, the first error's
//! SQLSTATE, and the statement text when it is logged.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use authgres_jwt::Identity;
use serde_json::Value;

use super::normalize;
use super::writer::Sink;
use super::{AuditConfig, Per, Statements};
use crate::proto::framer::TagSet;
use crate::transport::Transport;

/// What a session's lines say about who and where, as known at login.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// How the client reached the proxy.
    pub transport: Transport,
    /// Whether its connection is encrypted (TLS, or WebSocket over TLS).
    pub encrypted: bool,
    /// The verified identity; `None` for an anonymous role.
    pub identity: Option<&'a Identity>,
    /// The role it runs as upstream.
    pub role: &'a str,
    /// The database.
    pub database: &'a str,
    /// The client's address (as a trusted PROXY header named it).
    pub client: SocketAddr,
}

impl Facts<'_> {
    /// `tcp`, `tls`, `websocket` or `http`.
    fn transport_label(&self) -> &'static str {
        match (self.transport, self.encrypted) {
            (Transport::Wire, true) => "tls",
            (transport, _) => transport.label(),
        }
    }
}

/// What every line of one session shares: its fixed fields, serialized
/// once, and where lines go.
#[derive(Debug)]
pub struct SessionAudit {
    sink: Sink,
    per: Per,
    statements: Statements,
    max_statement_bytes: usize,
    /// `"transport":...,"client":...`, without braces.
    fields: Vec<u8>,
}

impl SessionAudit {
    /// The audit of a session described by `facts`, sending to `sink`.
    pub fn new(config: &AuditConfig, sink: Sink, facts: &Facts<'_>) -> Self {
        let identity = facts.identity;
        let text = |value: Option<&str>| value.map_or(Value::Null, Value::from);
        let fields = [
            ("transport", Value::from(facts.transport_label())),
            ("iss", text(identity.map(|i| &*i.issuer))),
            ("sub", text(identity.map(|i| i.subject.as_str()))),
            ("user_id", text(identity.map(|i| i.user_id.as_str()))),
            ("jti", text(identity.and_then(|i| i.token_id.as_deref()))),
            ("provider", text(identity.map(|i| &*i.provider))),
            ("tenant", text(identity.and_then(|i| i.tenant.as_deref()))),
            ("role", Value::from(facts.role)),
            ("database", Value::from(facts.database)),
            ("client", Value::from(facts.client.to_string())),
        ];
        let mut serialized = Vec::with_capacity(256);
        for (i, (name, value)) in fields.iter().enumerate() {
            if i > 0 {
                serialized.push(b',');
            }
            // Writing JSON into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut serialized, name);
            serialized.push(b':');
            let _ = serde_json::to_writer(&mut serialized, value);
        }
        Self {
            sink,
            per: config.per,
            statements: config.statements,
            max_statement_bytes: config.max_statement_bytes,
            fields: serialized,
        }
    }

    /// Whether a line is written per transaction or per statement.
    pub fn per(&self) -> Per {
        self.per
    }

    /// Whether lines carry statement text.
    pub fn logs_statements(&self) -> bool {
        self.statements != Statements::Off
    }
}

/// What one transaction (or statement) of a session adds to its line.
#[derive(Debug)]
pub struct Recorder {
    session: Arc<SessionAudit>,
    /// Rows the CommandComplete tags counted.
    rows: u64,
    /// The first error's SQLSTATE (`unknown` when its body was too long
    /// to read).
    sqlstate: Option<[u8; 5]>,
    /// The statements as a JSON array's elements (`"a","b"`).
    texts: Vec<u8>,
    /// Statement text left out for `max_statement_bytes`.
    cut: bool,
    /// Where a statement is normalized (kept between statements).
    scratch: String,
}

/// The SQLSTATE of an error whose body was not read.
const UNKNOWN: [u8; 5] = *b"?????";

impl Recorder {
    /// Client message bodies the relay keeps for it when statements are
    /// logged: Query and Parse.
    pub(crate) const CLIENT_BODIES: TagSet = TagSet::of(b"QP");
    /// Server message bodies it reads: CommandComplete, ErrorResponse.
    pub(crate) const SERVER_BODIES: TagSet = TagSet::of(b"CE");
    /// The longest server body kept for it: an ErrorResponse with a long
    /// message or detail still yields its SQLSTATE.
    pub(crate) const SERVER_CAPTURE: usize = 16 * 1024;

    /// A recorder for the next line of `session`.
    pub fn new(session: Arc<SessionAudit>) -> Self {
        Self {
            session,
            rows: 0,
            sqlstate: None,
            texts: Vec::new(),
            cut: false,
            scratch: String::new(),
        }
    }

    /// The session's audit.
    pub fn session(&self) -> &SessionAudit {
        &self.session
    }

    /// Adds a statement's text (normalized or cut as configured).
    pub fn statement(&mut self, sql: &str) {
        let session = &self.session;
        let room = session.max_statement_bytes.saturating_sub(self.texts.len());
        if room == 0 {
            self.cut |= !sql.is_empty();
            return;
        }
        self.scratch.clear();
        let cut = match session.statements {
            Statements::Off => return,
            Statements::Normalized => normalize::normalize(sql, &mut self.scratch, room),
            Statements::Full => normalize::bounded(sql, &mut self.scratch, room),
        };
        self.cut |= cut;
        if !self.texts.is_empty() {
            self.texts.push(b',');
        }
        let _ = serde_json::to_writer(&mut self.texts, self.scratch.as_str());
    }

    /// Adds rows returned or affected.
    pub fn rows(&mut self, rows: u64) {
        self.rows = self.rows.saturating_add(rows);
    }

    /// Notes an error: the first one's SQLSTATE is the line's.
    pub fn error(&mut self, sqlstate: &str) {
        if self.sqlstate.is_none() {
            self.sqlstate = Some(sqlstate.as_bytes().try_into().unwrap_or(UNKNOWN));
        }
    }

    /// Follows a client message the relay framed: the text of a Query or
    /// a Parse, when statements are logged.
    pub(crate) fn client_message(&mut self, tag: u8, body: Option<&[u8]>) {
        if !self.session.logs_statements() || !matches!(tag, b'Q' | b'P') {
            return;
        }
        let Some(body) = body else {
            self.cut = true;
            return;
        };
        let mut fields = body.split(|&b| b == 0);
        let text = match tag {
            b'P' => fields.nth(1),
            _ => fields.next(),
        };
        if let Some(text) = text {
            self.statement(&String::from_utf8_lossy(text));
        }
    }

    /// Follows a server message the relay framed: a CommandComplete's
    /// rows, an ErrorResponse's SQLSTATE.
    pub(crate) fn server_message(&mut self, tag: u8, body: Option<&[u8]>) {
        match (tag, body) {
            (b'C', Some(body)) => self.rows(command_rows(body)),
            (b'E', Some(body)) => self.error(error_code(body).unwrap_or("?????")),
            (b'E', None) => self.error("?????"),
            _ => {}
        }
    }

    /// Writes the line of what was recorded, which took `took`, and starts
    /// the next; `ended` says why a transaction ended unfinished (the
    /// relay stopped inside it).
    pub fn finish(&mut self, took: Duration, ended: Option<&str>) {
        let session = &self.session;
        let mut line = Vec::with_capacity(session.fields.len() + self.texts.len() + 160);
        let time = humantime::format_rfc3339_micros(SystemTime::now());
        let _ = write!(line, "{{\"time\":\"{time}\",");
        line.extend_from_slice(&session.fields);
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let _ = write!(line, ",\"duration_us\":{micros},\"rows\":{}", self.rows);
        match self
            .sqlstate
            .as_ref()
            .and_then(|code| std::str::from_utf8(code).ok())
        {
            Some(code) => {
                line.extend_from_slice(b",\"sqlstate\":");
                let _ = serde_json::to_writer(&mut line, code);
            }
            None => line.extend_from_slice(b",\"sqlstate\":null"),
        }
        if session.logs_statements() {
            line.extend_from_slice(b",\"statements\":[");
            line.extend_from_slice(&self.texts);
            line.push(b']');
            if self.cut {
                line.extend_from_slice(b",\"statements_cut\":true");
            }
        }
        if let Some(ended) = ended {
            line.extend_from_slice(b",\"ended\":");
            let _ = serde_json::to_writer(&mut line, ended);
        }
        line.extend_from_slice(b"}\n");
        session.sink.send(line);
        self.rows = 0;
        self.sqlstate = None;
        self.texts.clear();
        self.cut = false;
    }
}

/// The rows a CommandComplete tag counts: its last word when that is a
/// number (`INSERT 0 5`, `SELECT 3`, `COPY 10`), else none (`BEGIN`).
fn command_rows(body: &[u8]) -> u64 {
    let tag = body.strip_suffix(&[0]).unwrap_or(body);
    let last = tag.rsplit(|&b| b == b' ').next().unwrap_or_default();
    std::str::from_utf8(last)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The SQLSTATE (field `C`) of an ErrorResponse body.
fn error_code(body: &[u8]) -> Option<&str> {
    let mut rest = body;
    while let Some((&kind, after)) = rest.split_first() {
        if kind == 0 {
            return None;
        }
        let end = after.iter().position(|&b| b == 0)?;
        let (value, tail) = after.split_at(end);
        if kind == b'C' {
            return std::str::from_utf8(value).ok().filter(|v| v.len() == 5);
        }
        rest = tail.get(1..).unwrap_or_default();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::writer::Counters;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn tags_count_their_rows_and_errors_give_their_code() {
        assert_eq!(command_rows(b"INSERT 0 5\0"), 5);
        assert_eq!(command_rows(b"SELECT 3\0"), 3);
        assert_eq!(command_rows(b"UPDATE 12"), 12);
        assert_eq!(command_rows(b"BEGIN\0"), 0);
        assert_eq!(command_rows(b"CREATE TABLE\0"), 0);
        let body = b"SERROR\0VERROR\0C42P01\0Mrelation \"x\" does not exist\0\0";
        assert_eq!(error_code(body), Some("42P01"));
        assert_eq!(error_code(b"SERROR\0\0"), None);
        assert_eq!(error_code(b"SERROR"), None);
    }

    #[tokio::test]
    async fn full_text_is_kept_as_sent_up_to_the_bound_and_off_keeps_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let mut config = AuditConfig {
            per: Per::Statement,
            statements: Statements::Full,
            max_statement_bytes: 24,
            output: super::super::Output::File(path.clone()),
            queue: 8,
        };
        let hub = super::super::Hub::new(Counters::new(Counter::default(), Counter::default()));
        hub.configure(Some(&config));
        let facts = Facts {
            transport: Transport::Http,
            encrypted: false,
            identity: None,
            role: "anonymous",
            database: "app",
            client: "127.0.0.1:5000".parse().expect("address"),
        };
        let sink = hub.sink().expect("writer runs");
        let session = Arc::new(SessionAudit::new(&config, sink.clone(), &facts));
        let mut full = Recorder::new(session);
        full.statement("select 'kept as sent' /* and this */");
        full.finish(Duration::from_micros(1), None);
        config.statements = Statements::Off;
        let mut off = Recorder::new(Arc::new(SessionAudit::new(&config, sink, &facts)));
        off.statement("select 'never logged'");
        off.finish(Duration::from_micros(1), None);
        assert!(hub.flush(Duration::from_secs(5)).await);
        let text = std::fs::read_to_string(&path).expect("log");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        assert_eq!(
            lines[0]["statements"],
            serde_json::json!(["select 'kept as sent' /*"])
        );
        assert_eq!(lines[0]["statements_cut"], true);
        assert_eq!(lines[0]["transport"], "http");
        assert!(lines[1].get("statements").is_none(), "{text}");
        assert!(!text.contains("never logged"));
    }

    #[tokio::test]
    async fn a_line_carries_the_identity_rows_code_and_normalized_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let config = AuditConfig {
            per: Per::Transaction,
            statements: Statements::Normalized,
            max_statement_bytes: 30,
            output: super::super::Output::File(path.clone()),
            queue: 8,
        };
        let hub = super::super::Hub::new(Counters::new(Counter::default(), Counter::default()));
        hub.configure(Some(&config));
        let sink = hub.sink().expect("writer runs");
        let facts = Facts {
            transport: Transport::Wire,
            encrypted: true,
            identity: None,
            role: "anonymous",
            database: "app",
            client: "127.0.0.1:5000".parse().expect("address"),
        };
        let mut recorder = Recorder::new(Arc::new(SessionAudit::new(&config, sink, &facts)));
        recorder.client_message(b'Q', Some(b"insert into t values ('secret', 42)\0"));
        recorder.server_message(b'C', Some(b"INSERT 0 1\0"));
        recorder.server_message(b'E', Some(b"SERROR\0C23505\0\0"));
        recorder.server_message(b'E', Some(b"SERROR\0C25P02\0\0"));
        recorder.client_message(b'P', Some(b"s1\0select 'more text than fits'\0\0\0"));
        recorder.finish(Duration::from_micros(1500), None);
        recorder.finish(Duration::from_micros(7), Some("client_closed"));
        assert!(hub.flush(Duration::from_secs(5)).await);
        let text = std::fs::read_to_string(&path).expect("log");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect();
        let [first, second] = &lines[..] else {
            panic!("two lines: {text}");
        };
        assert_eq!(first["transport"], "tls");
        assert_eq!(first["sub"], Value::Null);
        assert_eq!(first["jti"], Value::Null);
        assert_eq!(first["role"], "anonymous");
        assert_eq!(first["client"], "127.0.0.1:5000");
        assert_eq!(first["duration_us"], 1500);
        assert_eq!(first["rows"], 1);
        assert_eq!(first["sqlstate"], "23505");
        assert_eq!(
            first["statements"],
            serde_json::json!(["insert into t values (?, ?)", "s"])
        );
        assert_eq!(first["statements_cut"], true);
        assert!(!text.contains("secret"));
        assert_eq!(second["rows"], 0);
        assert_eq!(second["sqlstate"], Value::Null);
        assert_eq!(second["statements"], serde_json::json!([]));
        assert_eq!(second["ended"], "client_closed");
        let time = first["time"].as_str().expect("time");
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
    }
}
