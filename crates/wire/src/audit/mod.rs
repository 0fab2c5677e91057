//! The audit log (`[audit]`, opt-in): one JSON line per transaction, or
//! per statement, saying who ran it: the token's `iss`, `sub` and `jti`,
//! the provider, the user id and tenant, the role and database, the
//! client's address and transport, how long it took, the rows it touched
//! and the SQLSTATE of its first error; the statement text only when
//! configured, normalized ([`normalize`]) or as sent.
//!
//! A session builds its [`SessionAudit`] once, at login (the fields that
//! never change, serialized then); the relay feeds a [`Recorder`] the
//! CommandComplete and ErrorResponse bodies it already frames (and the
//! Query and Parse bodies when statements are logged) and hands a
//! finished line to the writer ([`Sink`]) at each transaction's end. With
//! `[audit]` absent nothing is built and the relay captures nothing more
//! than it did. `/sql` builds the same line per request.
//!
//! A full queue drops lines rather than slowing clients down; every lost
//! line is counted in `authgres_audit_dropped_total` and warned about
//! (limited). An audit that must never lose a line needs the database's
//! own log (pgaudit) beside this one.

pub mod normalize;
mod record;
mod writer;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

pub use record::{Facts, Recorder, SessionAudit};
pub use writer::{Output, Sink};

pub(crate) use writer::Counters;

#[cfg(test)]
mod relay_tests;
use writer::Writer;

/// Every audit default, in one place.
pub mod defaults {
    /// Lines waiting for the writer before new ones are dropped.
    pub const QUEUE: usize = 16 * 1024;
    /// The most statement text one line carries, in bytes.
    pub const MAX_STATEMENT_BYTES: usize = 4096;
}

/// `[audit]`: what is logged, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// A line per transaction or per statement.
    pub per: Per,
    /// Whether and how statement text is logged.
    pub statements: Statements,
    /// The most statement text one line carries, in bytes.
    pub max_statement_bytes: usize,
    /// Where lines go.
    pub output: Output,
    /// Lines waiting for the writer before new ones are dropped (fixed
    /// at start).
    pub queue: usize,
}

/// How often a session writes a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Per {
    /// At each transaction's end (a statement outside a transaction block
    /// is one): what `SHOW STATS` counts as `xact_count`.
    Transaction,
    /// At each request cycle's end: a simple Query, or the
    /// extended-protocol messages up to a Sync (`query_count`).
    Statement,
}

/// Whether a line carries the statement text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Statements {
    /// Never: the default, so no literal (a password, an email) reaches
    /// the log.
    Off,
    /// With literals replaced by `?` and comments dropped.
    Normalized,
    /// As sent, cut to `max_statement_bytes`.
    Full,
}

/// The proxy's audit writer, started when `[audit]` first appears and
/// pointed at the configured output on every reload.
pub(crate) struct Hub {
    writer: Mutex<Option<Writer>>,
    counters: Arc<Counters>,
}

impl Hub {
    pub(crate) fn new(counters: Counters) -> Self {
        Self {
            writer: Mutex::new(None),
            counters: Arc::new(counters),
        }
    }

    /// Follows `config`: starts the writer, or opens its output again (a
    /// rotated file, or a new path). Without `[audit]` the writer stays as
    /// it is, idle: sessions stop sending it lines.
    pub(crate) fn configure(&self, config: Option<&AuditConfig>) {
        let Some(config) = config else {
            return;
        };
        let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        match writer.as_mut() {
            Some(running) => running.reopen(config.output.clone()),
            None => match Writer::start(
                config.output.clone(),
                config.queue,
                Arc::clone(&self.counters),
            ) {
                Ok(started) => *writer = Some(started),
                Err(error) => tracing::error!(
                    %error,
                    "the audit log could not be opened: its lines are dropped and counted"
                ),
            },
        }
    }

    /// A sink for a new session, when `[audit]` is on and the writer runs.
    pub(crate) fn sink(&self) -> Option<Sink> {
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        writer.as_ref().map(Writer::sink)
    }

    /// Where the writer writes, if it runs.
    pub(crate) fn output(&self) -> Option<Output> {
        let writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        writer.as_ref().map(|w| w.output().clone())
    }

    /// Waits, up to `wait`, until every line queued so far is on disk
    /// (or stdout); true when there was nothing to wait for.
    pub(crate) async fn flush(&self, wait: Duration) -> bool {
        match self.sink() {
            Some(sink) => sink.flush(wait).await,
            None => true,
        }
    }
}
