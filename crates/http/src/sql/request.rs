//! What a `/sql` request asks for, read from its headers and body: pure
//! functions, so they are tested and fuzzed without a server.

use axum::http::{HeaderMap, StatusCode};

use super::Failure;
use crate::query::{BatchOptions, Statement};

/// The request body: one statement (`query`, `params`), or a batch run
/// as one transaction (`queries`, which wins when both are there).
///
/// One struct, not an untagged enum: serde reads an untagged body into a
/// buffer of its own and tries each shape in turn, and building the
/// failed attempt's error was a measurable part of every request. The
/// fields a batch ignores are read as any JSON, so that a batch is
/// accepted whatever they hold, as it was.
#[derive(serde::Deserialize)]
struct Body {
    queries: Option<Vec<Statement>>,
    query: Option<serde_json::Value>,
    params: Option<serde_json::Value>,
}

impl Body {
    /// The statement of a body without `queries`.
    fn single(self) -> Option<Statement> {
        let serde_json::Value::String(query) = self.query? else {
            return None;
        };
        let params = match self.params {
            // Absent, or null.
            None => Vec::new(),
            Some(serde_json::Value::Array(params)) => params,
            Some(_) => return None,
        };
        Some(Statement { query, params })
    }
}

/// Who a request logs in as and how it wants its results, from its
/// headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The role (the connection string's user).
    pub role: String,
    /// The database (the connection string's path).
    pub database: String,
    /// The bearer token, or the connection string's password.
    pub token: Option<String>,
    /// `Neon-Array-Mode`: rows as arrays.
    pub array_mode: bool,
    /// `Neon-Raw-Text-Output`: every value as text.
    pub raw: bool,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn flag(headers: &HeaderMap, name: &str) -> Option<bool> {
    header(headers, name).map(|v| v.eq_ignore_ascii_case("true"))
}

fn bad(message: String) -> Failure {
    Failure::new(StatusCode::BAD_REQUEST, "08P01", message)
}

/// Reads the target of a request from its headers.
pub fn target(headers: &HeaderMap) -> Result<Target, Failure> {
    let connection = header(headers, "neon-connection-string")
        .ok_or_else(|| bad("missing the Neon-Connection-String header".into()))?;
    let url = url::Url::parse(connection)
        .map_err(|e| bad(format!("Neon-Connection-String is not a URL: {e}")))?;
    let decode = |s: &str| {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let role = decode(url.username());
    let database = decode(url.path().trim_start_matches('/'));
    if role.is_empty() || database.is_empty() {
        return Err(bad(
            "Neon-Connection-String needs a user and a database".into()
        ));
    }
    let token = header(headers, "authorization")
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::to_owned)
        .or_else(|| url.password().map(decode));
    Ok(Target {
        role,
        database,
        token,
        array_mode: flag(headers, "neon-array-mode").unwrap_or(false),
        raw: flag(headers, "neon-raw-text-output").unwrap_or(false),
    })
}

/// The statements of a request body, and for a batch its options from
/// the `Neon-Batch-*` headers.
pub fn statements(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Vec<Statement>, Option<BatchOptions>), Failure> {
    let not_a_body = |why: &dyn std::fmt::Display| {
        bad(format!(
            "request body is not {{query, params}} or {{queries}}: {why}"
        ))
    };
    let body: Body = serde_json::from_slice(body).map_err(|e| not_a_body(&e))?;
    let Some(queries) = body.queries else {
        let statement = body
            .single()
            .ok_or_else(|| not_a_body(&"`query` must be a string and `params` an array"))?;
        return Ok((vec![statement], None));
    };
    Ok((
        queries,
        Some(BatchOptions {
            isolation: header(headers, "neon-batch-isolation-level").map(str::to_owned),
            read_only: flag(headers, "neon-batch-read-only"),
            deferrable: flag(headers, "neon-batch-deferrable"),
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("header value"));
        }
        map
    }

    #[test]
    fn the_connection_string_names_role_database_and_maybe_the_token() {
        let got = target(&headers(&[(
            "neon-connection-string",
            "postgresql://authenticated:pass%20word@db.example.com/app",
        )]))
        .expect("target");
        assert_eq!(
            (got.role.as_str(), got.database.as_str()),
            ("authenticated", "app")
        );
        assert_eq!(got.token.as_deref(), Some("pass word"));
        let got = target(&headers(&[
            (
                "neon-connection-string",
                "postgresql://authenticated@db/app",
            ),
            ("authorization", "Bearer tok"),
            ("neon-array-mode", "true"),
        ]))
        .expect("target");
        assert_eq!(got.token.as_deref(), Some("tok"));
        assert!(got.array_mode && !got.raw);
        for bad in ["", "not a url", "postgresql://db/app", "postgresql://u@db/"] {
            assert!(
                target(&headers(&[("neon-connection-string", bad)])).is_err(),
                "{bad}"
            );
        }
        assert!(target(&HeaderMap::new()).is_err());
    }

    #[test]
    fn single_statements_and_batches_with_their_options() {
        let none = HeaderMap::new();
        let (one, batch) =
            statements(&none, br#"{"query": "select $1", "params": [1]}"#).expect("single");
        assert_eq!(one.len(), 1);
        assert!(batch.is_none());
        let options = headers(&[("neon-batch-read-only", "true")]);
        let (two, batch) = statements(
            &options,
            br#"{"queries": [{"query": "select 1"}, {"query": "select 2"}]}"#,
        )
        .expect("batch");
        assert_eq!(two.len(), 2);
        assert_eq!(batch.and_then(|b| b.read_only), Some(true));
        assert!(statements(&none, b"[1, 2]").is_err());
        // A batch wins, whatever the single statement's fields hold.
        let (batch, options) = statements(
            &none,
            br#"{"queries": [{"query": "select 1"}], "query": 5}"#,
        )
        .expect("batch");
        assert_eq!((batch.len(), options.is_some()), (1, true));
        // No params, or null ones: none.
        for bare in [
            &br#"{"query": "select 1"}"#[..],
            br#"{"query": "select 1", "params": null}"#,
        ] {
            let (one, _) = statements(&none, bare).expect("no params");
            assert!(one[0].params.is_empty());
        }
        for refused in [
            &br#"{"query": 5}"#[..],
            br#"{"query": "select $1", "params": 1}"#,
            br#"{"params": [1]}"#,
            br#"{}"#,
        ] {
            assert!(statements(&none, refused).is_err(), "{refused:?}");
        }
    }
}
