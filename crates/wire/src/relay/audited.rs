//! The relay's part in the audit log: an audited session's framers keep
//! the bodies its lines are made from (CommandComplete, ErrorResponse, and
//! Query and Parse when statements are logged), and a transaction the
//! session ends inside still gets its line, even when the relay is given
//! up rather than run to its stop. The per-message and
//! per-transaction hooks are one `Option` check each in `relay.rs`; an
//! unaudited relay frames exactly as before.

use super::{Relay, framers};
use crate::audit::{Per, Recorder, SessionAudit};

impl Relay {
    /// Makes the relay audited when `audit` is: its framers then keep the
    /// bodies its lines are made from.
    pub(super) fn audit_with(&mut self, audit: Option<&std::sync::Arc<SessionAudit>>) {
        let Some(session) = audit else {
            return;
        };
        let recorder = Recorder::new(std::sync::Arc::clone(session));
        let statements = recorder.session().logs_statements();
        (self.client_frames, self.server_frames) =
            framers(self.tracker.is_some(), Some(statements));
        self.audit = Some(Box::new(recorder));
    }

    /// Writes the audit line of a transaction (or statement) the session
    /// ended inside, saying how it ended.
    pub(super) fn audit_unfinished(&mut self, ended: &'static str) {
        let Some(audit) = self.audit.as_deref_mut() else {
            return;
        };
        let open = match audit.session().per() {
            Per::Transaction => self.transaction_started.take(),
            Per::Statement => self.query_started.take(),
        };
        if let Some(started) = open {
            audit.finish(started.elapsed(), Some(ended));
        }
    }
}

/// A relay given up inside a transaction without [`Relay::run`] returning
/// (a forced drain, `KILL_CLIENT`, a failed forward) still writes its line.
impl Drop for Relay {
    fn drop(&mut self) {
        self.audit_unfinished("interrupted");
    }
}
