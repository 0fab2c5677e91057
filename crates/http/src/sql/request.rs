//! What a `/sql` request asks for, read from its headers and body: pure
//! functions, so they are tested and fuzzed without a server.

use axum::http::{HeaderMap, StatusCode};

use super::Failure;
use crate::query::{BatchOptions, Statement};

/// The request body: one statement, or a batch run as one transaction.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Body {
    Batch { queries: Vec<Statement> },
    Single(Statement),
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
    let body: Body = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "request body is not {{query, params}} or {{queries}}: {e}"
        ))
    })?;
    Ok(match body {
        Body::Single(statement) => (vec![statement], None),
        Body::Batch { queries } => (
            queries,
            Some(BatchOptions {
                isolation: header(headers, "neon-batch-isolation-level").map(str::to_owned),
                read_only: flag(headers, "neon-batch-read-only"),
                deferrable: flag(headers, "neon-batch-deferrable"),
            }),
        ),
    })
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
    }
}
