//! Row-level security policies that call `auth.*()` once per row.
//!
//! `user_id = auth.user_id()` calls the function for every row the policy
//! filters; `user_id = (select auth.user_id())` makes it an initplan that
//! runs once per statement. On the native path a call costs well under a
//! microsecond and either form is fine; on the portable path each call
//! costs microseconds, so init-db names the policies written the first
//! way, with the statement that rewrites them.

use anyhow::Context as _;

use super::sql::quote_ident;

/// The identity functions a policy may call.
const FUNCTIONS: &[&str] = &[
    "session",
    "jwt",
    "user_id",
    "uid",
    "issuer",
    "session_claims",
];

/// What Postgres prints before a scalar subquery's target when it
/// deparses `(select auth.user_id())`: `( SELECT auth.user_id() AS ...)`.
const WRAPPED_PREFIX: &str = "SELECT ";

/// Warnings naming each policy that calls `auth.*()` outside a scalar
/// subquery, with the `ALTER POLICY` that wraps the calls.
pub async fn unwrapped(client: &tokio_postgres::Client) -> anyhow::Result<Vec<String>> {
    let rows = client
        .query(
            "select schemaname::text, tablename::text, policyname::text, qual, with_check \
               from pg_catalog.pg_policies \
              where qual ~ 'auth\\.\\w+\\(\\)' or with_check ~ 'auth\\.\\w+\\(\\)' \
              order by 1, 2, 3",
            &[],
        )
        .await
        .context("listing row-level security policies")?;
    let mut found = Vec::new();
    for row in rows {
        let (schema, table, policy): (String, String, String) =
            (row.get(0), row.get(1), row.get(2));
        let using: Option<String> = row.get(3);
        let check: Option<String> = row.get(4);
        let using = using.as_deref().and_then(wrap);
        let check = check.as_deref().and_then(wrap);
        if using.is_none() && check.is_none() {
            continue;
        }
        let mut statement = format!(
            "ALTER POLICY {} ON {}.{}",
            quote_ident(&policy),
            quote_ident(&schema),
            quote_ident(&table)
        );
        if let Some(using) = using {
            statement.push_str(&format!(" USING ({using})"));
        }
        if let Some(check) = check {
            statement.push_str(&format!(" WITH CHECK ({check})"));
        }
        found.push(format!("  {statement};"));
    }
    if found.is_empty() {
        return Ok(found);
    }
    found.insert(
        0,
        "warning: these row-level security policies call auth.*() once per row, which the \
         portable identity path makes costly on large tables; wrap each call in a scalar \
         subquery, `(select auth.user_id())`, so it runs once per statement:"
            .to_owned(),
    );
    Ok(found)
}

/// `expression` with each unwrapped `auth.NAME()` call wrapped in a
/// scalar subquery; `None` when there is none.
fn wrap(expression: &str) -> Option<String> {
    let mut out = String::with_capacity(expression.len() + 16);
    let mut rest = expression;
    let mut changed = false;
    while let Some(at) = rest.find("auth.") {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let call = FUNCTIONS
            .iter()
            .map(|name| format!("auth.{name}()"))
            .find(|call| from.starts_with(call.as_str()));
        let wrapped = out.ends_with(WRAPPED_PREFIX);
        let boundary = !out.ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == '.');
        match call {
            Some(call) if !wrapped && boundary => {
                out.push_str(&format!("(select {call})"));
                rest = &from[call.len()..];
                changed = true;
            }
            _ => {
                out.push_str("auth.");
                rest = &from["auth.".len()..];
            }
        }
    }
    out.push_str(rest);
    changed.then_some(out)
}

#[cfg(test)]
mod tests {
    use super::wrap;

    #[test]
    fn unwrapped_calls_are_wrapped_and_wrapped_ones_left_alone() {
        assert_eq!(
            wrap("(user_id = auth.user_id())").as_deref(),
            Some("(user_id = (select auth.user_id()))")
        );
        assert_eq!(
            wrap("(( SELECT auth.user_id() AS user_id) = user_id)"),
            None
        );
        assert_eq!(
            wrap("((auth.jwt() ->> 'org'::text) = org AND owner = ( SELECT auth.uid() AS uid))")
                .as_deref(),
            Some(
                "(((select auth.jwt()) ->> 'org'::text) = org AND owner = ( SELECT auth.uid() AS uid))"
            )
        );
        assert_eq!(wrap("(x = myauth.user_id())"), None);
        assert_eq!(wrap("(x = auth.user_idx())"), None);
    }
}
