//! What a `/sql` request asks for, read from its headers and body: pure
//! functions, so they are tested and fuzzed without a server.

use axum::http::{HeaderMap, HeaderName, StatusCode, header};

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

/// The headers a request is read from, named once: a lookup by a string
/// parses and checks the name on every request.
mod names {
    use axum::http::HeaderName;

    pub(super) const CONNECTION_STRING: HeaderName =
        HeaderName::from_static("neon-connection-string");
    pub(super) const ARRAY_MODE: HeaderName = HeaderName::from_static("neon-array-mode");
    pub(super) const RAW_TEXT_OUTPUT: HeaderName = HeaderName::from_static("neon-raw-text-output");
    pub(super) const BATCH_ISOLATION_LEVEL: HeaderName =
        HeaderName::from_static("neon-batch-isolation-level");
    pub(super) const BATCH_READ_ONLY: HeaderName = HeaderName::from_static("neon-batch-read-only");
    pub(super) const BATCH_DEFERRABLE: HeaderName =
        HeaderName::from_static("neon-batch-deferrable");
}

fn header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn flag(headers: &HeaderMap, name: &HeaderName) -> Option<bool> {
    header(headers, name).map(|v| v.eq_ignore_ascii_case("true"))
}

fn bad(message: String) -> Failure {
    Failure::new(StatusCode::BAD_REQUEST, "08P01", message)
}

/// Reads the target of a request from its headers.
pub fn target(headers: &HeaderMap) -> Result<Target, Failure> {
    let connection = header(headers, &names::CONNECTION_STRING)
        .ok_or_else(|| bad("missing the Neon-Connection-String header".into()))?;
    let parts = ConnectionString::read(connection)
        .map_err(|why| bad(format!("Neon-Connection-String is not a URL: {why}")))?;
    let role = decode(parts.user);
    let database = decode(parts.database);
    if role.is_empty() || database.is_empty() {
        return Err(bad(
            "Neon-Connection-String needs a user and a database".into()
        ));
    }
    let token = header(headers, &header::AUTHORIZATION)
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::to_owned)
        .or_else(|| parts.password.filter(|p| !p.is_empty()).map(decode));
    Ok(Target {
        role,
        database,
        token,
        array_mode: flag(headers, &names::ARRAY_MODE).unwrap_or(false),
        raw: flag(headers, &names::RAW_TEXT_OUTPUT).unwrap_or(false),
    })
}

/// What `/sql` reads of a connection string
/// (`scheme://[user[:password]@]host[:port][/database][?options]`), its
/// parts still percent-encoded. Read by hand, not by a URL parser: the
/// host is not used (the proxy connects where it is configured to), and
/// parsing and checking it, to throw it away, was a tenth of a request's
/// work. The parts are where RFC 3986 (and the WHATWG URL standard, for
/// these) puts them: the authority ends at the first `/`, `?` or `#`; the
/// user information is what comes before its last `@`, the user what
/// comes before its first `:`.
#[derive(Debug, PartialEq, Eq)]
struct ConnectionString<'a> {
    user: &'a str,
    password: Option<&'a str>,
    /// The path, its leading slashes removed.
    database: &'a str,
}

impl<'a> ConnectionString<'a> {
    fn read(text: &'a str) -> Result<Self, &'static str> {
        let (scheme, rest) = text.split_once(':').ok_or("it has no scheme")?;
        let scheme_ok = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
        if !scheme_ok {
            return Err("it has no scheme");
        }
        let rest = rest
            .strip_prefix("//")
            .ok_or("it has no `//user@host` part")?;
        let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
        let userinfo = authority
            .rsplit_once('@')
            .map_or("", |(userinfo, _)| userinfo);
        let (user, password) = match userinfo.split_once(':') {
            Some((user, password)) => (user, Some(password)),
            None => (userinfo, None),
        };
        let path = path.split(['?', '#']).next().unwrap_or_default();
        Ok(Self {
            user,
            password,
            database: path.trim_start_matches('/'),
        })
    }
}

/// A percent-encoded part of a connection string, decoded (bytes that
/// are not UTF-8 become U+FFFD).
fn decode(part: &str) -> String {
    percent_encoding::percent_decode_str(part)
        .decode_utf8_lossy()
        .into_owned()
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
            isolation: header(headers, &names::BATCH_ISOLATION_LEVEL).map(str::to_owned),
            read_only: flag(headers, &names::BATCH_READ_ONLY),
            deferrable: flag(headers, &names::BATCH_DEFERRABLE),
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
    fn connection_strings_are_read_as_a_url_parser_reads_them() {
        let users = ["alice", "a%40b", "a b", "a+b", "%C3%BC", "a%2Fb", ""];
        let passwords = [
            None,
            Some(""),
            Some("p:w"),
            Some("p%2Fw"),
            Some("t.o-k_e~n"),
        ];
        let hosts = ["h", "h:5432", "[::1]:5432", "10.0.0.1", "db.example.com"];
        let paths = ["", "/", "/app", "/app%2Fx", "/a%20b", "/app/x"];
        let tails = [
            "",
            "?sslmode=require",
            "#top",
            "?options=-c%20x&sslmode=disable",
        ];
        let mut compared = 0;
        for user in users {
            for password in passwords {
                for host in hosts {
                    for path in paths {
                        for tail in tails {
                            let userinfo = match (user, password) {
                                ("", None) => String::new(),
                                (user, None) => format!("{user}@"),
                                (user, Some(password)) => format!("{user}:{password}@"),
                            };
                            let text = format!("postgresql://{userinfo}{host}{path}{tail}");
                            let ours = ConnectionString::read(&text).expect(&text);
                            let Ok(url) = url::Url::parse(&text) else {
                                continue;
                            };
                            let theirs = (
                                decode(url.username()),
                                url.password().map(decode).filter(|p| !p.is_empty()),
                                decode(url.path().trim_start_matches('/')),
                            );
                            let ours = (
                                decode(ours.user),
                                ours.password.filter(|p| !p.is_empty()).map(decode),
                                decode(ours.database),
                            );
                            assert_eq!(ours, theirs, "{text}");
                            compared += 1;
                        }
                    }
                }
            }
        }
        assert!(compared > 4000, "{compared}");
        // Its last `@` ends the user information; a `+` is itself (it was
        // read as a space, as in a form, before the parts were cut by
        // hand), and so is an `&`.
        let read = ConnectionString::read("postgres://u+1:p@ss@h/d?x=@").expect("read");
        assert_eq!(
            (read.user, read.password, read.database),
            ("u+1", Some("p@ss"), "d")
        );
        for refused in [
            "",
            "not a url",
            "1x://u@h/d",
            "postgresql:u@h/d",
            "://u@h/d",
        ] {
            assert!(ConnectionString::read(refused).is_err(), "{refused}");
        }
    }

    #[test]
    fn a_plus_or_an_ampersand_in_a_part_is_itself() {
        let got = target(&headers(&[(
            "neon-connection-string",
            "postgresql://app+reader:a+b&c@db/orders+2024",
        )]))
        .expect("target");
        assert_eq!(
            (
                got.role.as_str(),
                got.database.as_str(),
                got.token.as_deref()
            ),
            ("app+reader", "orders+2024", Some("a+b&c"))
        );
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
