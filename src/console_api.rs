//! The console over HTTP, for automation: `POST /console` on the admin
//! listener runs one console command (the body, as typed in psql) and
//! answers JSON; and the admin API's credentials, which are the console
//! users' (HTTP Basic), required on `/console` always and on every other
//! route except the health probes when `[admin] require_auth` is set.

use authgres_wire::console::{self, Failed, command};
use authgres_wire::{ConsoleAccess, Proxy};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::json;

/// Why a request's credentials were refused.
#[derive(Debug, Clone, Copy)]
pub enum Refused {
    /// No `[console]`: there are no credentials to give.
    NoConsole,
    /// No credentials, or not a console user's.
    Unauthorized,
    /// A stats user asked for what only admin users may do.
    NotAdmin,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Self::NoConsole => (
                StatusCode::NOT_FOUND,
                "no [console] is configured: the admin API's credentials are the console users'\n",
            )
                .into_response(),
            Self::Unauthorized => {
                let mut response = (
                    StatusCode::UNAUTHORIZED,
                    "a console user's credentials are needed (HTTP Basic)\n",
                )
                    .into_response();
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"authgres\", charset=\"UTF-8\""),
                );
                response
            }
            Self::NotAdmin => (
                StatusCode::FORBIDDEN,
                "this is for admin users; this user may read only\n",
            )
                .into_response(),
        }
    }
}

/// The console users' credentials in `headers`, checked: what they may
/// run.
pub fn authorize(
    proxy: &Proxy,
    headers: &HeaderMap,
    needs_admin: bool,
) -> Result<ConsoleAccess, Refused> {
    let settings = proxy.settings();
    let console = settings.config.console.as_ref().ok_or(Refused::NoConsole)?;
    let access = basic_credentials(headers)
        .and_then(|(user, password)| console.authenticate(&user, &password));
    match access {
        None => Err(Refused::Unauthorized),
        Some(ConsoleAccess::Stats) if needs_admin => Err(Refused::NotAdmin),
        Some(access) => Ok(access),
    }
}

/// `user` and `password` of an `Authorization: Basic` header.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// Runs the console command in `body` for the user in `headers`.
pub async fn run(proxy: &Proxy, headers: &HeaderMap, body: &str) -> Response {
    let access = match authorize(proxy, headers, false) {
        Ok(access) => access,
        Err(refused) => return refused.into_response(),
    };
    let mut statements = command::statements(body);
    let (Some(statement), None) = (statements.next(), statements.next()) else {
        return failure(
            StatusCode::BAD_REQUEST,
            "42601",
            "send exactly one console command",
        );
    };
    let parsed = match command::parse(statement) {
        Ok(parsed) => parsed,
        Err(error) => return failure(StatusCode::BAD_REQUEST, "42601", &error.to_string()),
    };
    match console::run(proxy, access, &parsed).await {
        Ok(reply) => {
            tracing::info!(command = statement, "console command over HTTP");
            let table = reply.table.map(|table| {
                let columns: Vec<_> = table.columns.iter().map(|(name, _)| *name).collect();
                json!({ "columns": columns, "rows": table.rows })
            });
            let mut body = json!({ "command": reply.tag, "notices": reply.notices });
            if let Some(table) = table {
                body["columns"] = table["columns"].clone();
                body["rows"] = table["rows"].clone();
            }
            axum::Json(body).into_response()
        }
        Err(Failed { code, message }) => {
            let status = match code.code() {
                "42501" => StatusCode::FORBIDDEN,
                "57P01" | "XX000" => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            failure(status, code.code(), &message)
        }
    }
}

fn failure(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "code": code, "message": message })),
    )
        .into_response()
}
