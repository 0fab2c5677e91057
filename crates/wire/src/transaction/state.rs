//! Reading what a client's session holds beyond its transactions, in one
//! query, after a transaction that ran a command that can leave session
//! state.

use bytes::BytesMut;
use postgres_protocol::message::backend::Message;
use tokio::time::Instant;

use crate::error::UpstreamError;
use crate::identity::{CLAIMS_SETTING, SIGNATURE_SETTING};
use crate::upstream::{Attached, Upstream, append_statement, row_texts};

/// One query that lists what a session holds beyond a transaction: its
/// settings, prepared statements, channels, open cursors and temporary
/// relations (not counting this query's own unnamed portal). Custom
/// settings (`app.tenant`) are not in `pg_settings`, so those named in `$1`
/// (comma-separated: the identity's, the client's carried ones, and dotted
/// names its statements mentioned) are read one by one. Schema-qualified,
/// with explicit operators: the client's search_path cannot divert it.
const SESSION_STATE: &str = "\
select 's', name, pg_catalog.current_setting(name) from pg_catalog.pg_settings \
 where source operator(pg_catalog.=) 'session' \
union all select 'x', n, pg_catalog.current_setting(n, true) \
 from pg_catalog.unnest(pg_catalog.string_to_array($1::pg_catalog.text, ',')) n \
 where not exists (select from pg_catalog.pg_settings g where g.name operator(pg_catalog.=) n) \
union all select 'p', name, from_sql::pg_catalog.text from pg_catalog.pg_prepared_statements \
union all select 'l', c, null from pg_catalog.pg_listening_channels() c \
union all select 'c', name, null from pg_catalog.pg_cursors \
 where name operator(pg_catalog.<>) '' \
union all select 't', relname::pg_catalog.text, null from pg_catalog.pg_class \
 where relnamespace operator(pg_catalog.=) pg_catalog.pg_my_temp_schema()";

/// Settings that act on the backend while it sits in the pool, between the
/// client's transactions, where they mean nothing for the client and would
/// end the backend for everyone: not carried, and reset before the
/// connection goes back.
pub(super) const POOL_ONLY_SETTINGS: &[&str] = &["idle_session_timeout"];

/// Settings that are the proxy's or that a client could not have set.
fn carried(name: &str) -> bool {
    !(name.starts_with("authgres.")
        || name == "role"
        || name == "session_authorization"
        || POOL_ONLY_SETTINGS.contains(&name))
}

/// What a session holds beyond its transactions, as the server lists it.
#[derive(Debug, Default)]
pub(super) struct SessionState {
    /// Settings to carry to another connection.
    pub(super) settings: Vec<(String, String)>,
    /// The identity the session holds.
    pub(super) identity: Attached,
    /// Names of the statements prepared with the protocol's Parse.
    pub(super) protocol_statements: Vec<String>,
    /// Why the session cannot move to another connection, if it cannot.
    pub(super) pinned_by: Option<&'static str>,
    /// The client set a setting that must not stay on a pooled connection.
    pub(super) pool_only_setting: bool,
}

/// Runs [`SESSION_STATE`] on `conn`, reading the custom settings `names`
/// too.
pub(super) async fn read(
    conn: &mut Upstream,
    names: &[String],
    deadline: Instant,
) -> Result<SessionState, UpstreamError> {
    let names = names.join(",");
    let mut out = BytesMut::new();
    append_statement(&mut out, SESSION_STATE, &[Some(&names)])?;
    postgres_protocol::message::frontend::sync(&mut out);
    conn.send(&out).await?;
    let mut rows = Vec::new();
    let reply = conn
        .read_reply(deadline, |message| {
            if let Message::DataRow(row) = message {
                rows.push(row_texts(&row)?);
            }
            Ok(())
        })
        .await?;
    if let Some(error) = reply.error {
        conn.mark_broken();
        return Err(UpstreamError::Reset(error));
    }
    let mut state = SessionState::default();
    for row in rows {
        let Ok([Some(kind), Some(name), value]) = <[Option<String>; 3]>::try_from(row) else {
            conn.mark_broken();
            return Err(UpstreamError::Protocol("a malformed session state row"));
        };
        note(&mut state, &kind, name, value);
    }
    Ok(state)
}

fn note(state: &mut SessionState, kind: &str, name: String, value: Option<String>) {
    // A custom setting that was reset reads as empty.
    let value = match kind {
        "x" => value.filter(|v| !v.is_empty()),
        _ => value,
    };
    match (kind, value) {
        ("x", value) if name == CLAIMS_SETTING => state.identity.claims = value,
        ("x", value) if name == SIGNATURE_SETTING => state.identity.signature = value,
        ("x", Some(role)) if name == "role" && role != "none" => {
            state.pinned_by = Some("SET ROLE");
        }
        ("s", Some(_)) if POOL_ONLY_SETTINGS.contains(&name.as_str()) => {
            state.pool_only_setting = true;
        }
        ("s" | "x", Some(value)) if carried(&name) => state.settings.push((name, value)),
        ("p", Some(from_sql)) if from_sql == "true" => {
            state.pinned_by = Some("a statement prepared with SQL PREPARE");
        }
        ("p", _) => state.protocol_statements.push(name),
        ("l", _) => state.pinned_by = Some("LISTEN"),
        ("c", _) => state.pinned_by = Some("a cursor open across transactions"),
        ("t", _) => state.pinned_by = Some("temporary objects"),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noted(rows: &[(&str, &str, Option<&str>)]) -> SessionState {
        let mut state = SessionState::default();
        for (kind, name, value) in rows {
            note(&mut state, kind, (*name).into(), value.map(str::to_owned));
        }
        state
    }

    #[test]
    fn settings_are_carried_but_the_proxys_and_pool_only_ones_are_not() {
        let state = noted(&[
            ("s", "statement_timeout", Some("5s")),
            ("s", "idle_session_timeout", Some("200ms")),
            ("x", "app.tenant", Some("42")),
            ("x", "app.cleared", Some("")),
            ("x", CLAIMS_SETTING, Some("{}")),
            ("x", "role", Some("none")),
            ("p", "s1", Some("false")),
        ]);
        assert_eq!(
            state.settings,
            [
                ("statement_timeout".to_owned(), "5s".to_owned()),
                ("app.tenant".to_owned(), "42".to_owned())
            ]
        );
        assert!(state.pool_only_setting);
        assert_eq!(state.identity.claims.as_deref(), Some("{}"));
        assert_eq!(state.protocol_statements, ["s1"]);
        assert_eq!(state.pinned_by, None);
    }

    #[test]
    fn state_that_cannot_move_pins_the_client() {
        for (kind, name, value, why) in [
            ("x", "role", Some("admin"), "SET ROLE"),
            (
                "p",
                "q",
                Some("true"),
                "a statement prepared with SQL PREPARE",
            ),
            ("l", "chan", None, "LISTEN"),
            ("c", "cur", None, "a cursor open across transactions"),
            ("t", "tmp", None, "temporary objects"),
        ] {
            assert_eq!(
                noted(&[(kind, name, value)]).pinned_by,
                Some(why),
                "{kind} {name}"
            );
        }
    }
}
