//! `POST /sql`: the protocol of Neon's HTTP endpoint, as the
//! `@neondatabase/serverless` driver speaks it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use authgres_jwt::{FailureClass, VerifyError};
use authgres_wire::CleartextTokens;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::HttpState;
use crate::query::{self, BatchOptions, ExecError, Statement};

/// The request body: one statement, or a batch run as one transaction.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Body {
    Batch { queries: Vec<Statement> },
    Single(Statement),
}

/// An error answer: status and a JSON body with at least `message`.
struct Failure {
    status: StatusCode,
    body: Value,
}

impl Failure {
    fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: json!({"message": message.into(), "code": code}),
        }
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn flag(headers: &HeaderMap, name: &str) -> Option<bool> {
    header(headers, name).map(|v| v.eq_ignore_ascii_case("true"))
}

/// Handles one request.
pub async fn handle(
    State(state): State<Arc<HttpState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match run(&state, peer, &headers, &body).await {
        Ok(value) => match serde_json::to_vec(&value) {
            Ok(bytes) if bytes.len() > state.config.max_response_bytes => Failure::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "54000",
                format!(
                    "response is larger than the limit of {} bytes",
                    state.config.max_response_bytes
                ),
            )
            .into_response(),
            Ok(bytes) => (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                bytes,
            )
                .into_response(),
            Err(error) => Failure::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "XX000",
                error.to_string(),
            )
            .into_response(),
        },
        Err(failure) => failure.into_response(),
    }
}

async fn run(
    state: &HttpState,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<Value, Failure> {
    let bad = |message: String| Failure::new(StatusCode::BAD_REQUEST, "08P01", message);
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
    let proxy = &state.proxy;
    let config = proxy.config();
    let role_config = config.roles.get(&role).ok_or_else(|| {
        Failure::new(
            StatusCode::UNAUTHORIZED,
            "28000",
            format!("role \"{role}\" is not served by this proxy"),
        )
    })?;
    if !config.databases.is_empty() && !config.databases.contains(&database) {
        return Err(Failure::new(
            StatusCode::BAD_REQUEST,
            "3D000",
            format!("database \"{database}\" is not served by this proxy"),
        ));
    }
    let token = header(headers, "authorization")
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::to_owned)
        .or_else(|| url.password().map(decode))
        .filter(|t| !t.is_empty());
    let mut login_role = role.clone();
    let identity = if role_config.requires_token {
        let cleartext_ok = match config.cleartext_tokens {
            CleartextTokens::Allow => true,
            CleartextTokens::LoopbackOnly => peer.ip().is_loopback(),
            CleartextTokens::Refuse => false,
        };
        if !state.tls && !cleartext_ok {
            return Err(Failure::new(
                StatusCode::UNAUTHORIZED,
                "28000",
                "token logins must use HTTPS from non-loopback addresses",
            ));
        }
        let token = token.ok_or_else(|| {
            Failure::new(
                StatusCode::UNAUTHORIZED,
                "28000",
                format!("role \"{role}\" requires a token: send Authorization: Bearer <jwt>"),
            )
        })?;
        let identity = proxy
            .verifier()
            .verify(&token, &role, SystemTime::now())
            .await
            .map_err(token_failure)?;
        if identity.role != role {
            if !config.roles.contains_key(&identity.role) {
                return Err(Failure::new(
                    StatusCode::UNAUTHORIZED,
                    "28000",
                    format!("role \"{}\" is not served by this proxy", identity.role),
                ));
            }
            login_role = identity.role.clone();
        }
        Some(identity)
    } else {
        None
    };
    let body: Body = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "request body is not {{query, params}} or {{queries}}: {e}"
        ))
    })?;
    let array_mode = flag(headers, "neon-array-mode").unwrap_or(false);
    let raw = flag(headers, "neon-raw-text-output").unwrap_or(false);
    let (statements, batch) = match body {
        Body::Single(statement) => (vec![statement], None),
        Body::Batch { queries } => (
            queries,
            Some(BatchOptions {
                isolation: header(headers, "neon-batch-isolation-level").map(str::to_owned),
                read_only: flag(headers, "neon-batch-read-only"),
                deferrable: flag(headers, "neon-batch-deferrable"),
            }),
        ),
    };
    let password = config
        .roles
        .get(&login_role)
        .and_then(|r| r.password.as_deref());
    let mut pooled = state
        .pool
        .checkout(&database, &login_role, password, 0)
        .await
        .map_err(|error| {
            tracing::warn!(%error, "no upstream connection for /sql");
            Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "08001",
                "authgres could not get a database connection",
            )
        })?;
    let outcome = query::execute(
        pooled.conn(),
        proxy.claims_key(),
        identity.as_ref().map(|i| &*i.claims_json),
        &statements,
        batch.as_ref(),
        state.config.max_response_bytes,
    )
    .await;
    match outcome {
        Ok(results) => {
            pooled.release();
            let mut rendered: Vec<Value> = results
                .iter()
                .map(|r| query::result_json(r, array_mode, raw))
                .collect();
            Ok(match batch {
                Some(_) => json!({ "results": rendered }),
                None => rendered.pop().unwrap_or(Value::Null),
            })
        }
        Err(ExecError::Db(error)) => {
            pooled.release();
            Err(db_failure(&error))
        }
        Err(ExecError::Request(message)) => {
            pooled.release();
            Err(bad(message))
        }
        Err(ExecError::TooLarge(limit)) => {
            pooled.release();
            Err(Failure::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "54000",
                format!("response is larger than the limit of {limit} bytes"),
            ))
        }
        Err(ExecError::Upstream(error)) => {
            // The connection is in an unknown state: dropped, not reused.
            tracing::warn!(%error, "upstream failed during /sql");
            Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "08006",
                "the database connection failed",
            ))
        }
    }
}

fn token_failure(error: VerifyError) -> Failure {
    let (status, code) = match error.class() {
        FailureClass::BadToken => (StatusCode::UNAUTHORIZED, "28P01"),
        FailureClass::RoleNotAllowed => (StatusCode::UNAUTHORIZED, "28000"),
        FailureClass::KeysUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "08001"),
    };
    Failure::new(status, code, error.to_string())
}

/// A Postgres error as Neon reports it: HTTP 400 with every field.
fn db_failure(error: &query::DbError) -> Failure {
    let names: [(u8, &str); 17] = [
        (b'M', "message"),
        (b'C', "code"),
        (b'D', "detail"),
        (b'H', "hint"),
        (b'P', "position"),
        (b'p', "internalPosition"),
        (b'q', "internalQuery"),
        (b'S', "severity"),
        (b'W', "where"),
        (b't', "table"),
        (b'c', "column"),
        (b's', "schema"),
        (b'd', "dataType"),
        (b'n', "constraint"),
        (b'F', "file"),
        (b'L', "line"),
        (b'R', "routine"),
    ];
    let mut body = serde_json::Map::new();
    for (code, name) in names {
        if let Some(value) = error.field(code) {
            body.insert(name.to_owned(), Value::String(value.to_owned()));
        }
    }
    Failure {
        status: StatusCode::BAD_REQUEST,
        body: Value::Object(body),
    }
}
