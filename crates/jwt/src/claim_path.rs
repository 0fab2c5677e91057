//! A small JSONPath subset for picking a claim out of a token:
//! `$.role`, `$.metadata.db_role`, `$["https://hasura.io/jwt/claims"].role`.

use serde_json::Value;

/// A path of object keys from the claims root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimPath {
    segments: Vec<String>,
}

/// A path that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("claim path {path:?}: {reason} (expected e.g. $.role or $[\"https://ns\"].role)")]
pub struct BadClaimPath {
    path: String,
    reason: &'static str,
}

impl ClaimPath {
    /// Parses `$` followed by `.name` or `["name"]` / `['name']` segments.
    pub fn parse(path: &str) -> Result<Self, BadClaimPath> {
        let bad = |reason| BadClaimPath {
            path: path.to_owned(),
            reason,
        };
        let mut rest = path
            .strip_prefix('$')
            .ok_or_else(|| bad("must start with $"))?;
        let mut segments = Vec::new();
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('.') {
                let end = after.find(['.', '[', ']']).unwrap_or(after.len());
                let name = &after[..end];
                if name.is_empty() {
                    return Err(bad("empty segment"));
                }
                segments.push(name.to_owned());
                rest = &after[end..];
            } else if let Some(after) = rest.strip_prefix('[') {
                let quote = after.chars().next().filter(|c| *c == '"' || *c == '\'');
                let quote = quote.ok_or_else(|| bad("brackets need a quoted name"))?;
                let body = &after[1..];
                let end = body.find(quote).ok_or_else(|| bad("unterminated quote"))?;
                segments.push(body[..end].to_owned());
                rest = body[end + 1..]
                    .strip_prefix(']')
                    .ok_or_else(|| bad("missing ]"))?;
            } else {
                return Err(bad("expected . or ["));
            }
        }
        if segments.is_empty() {
            return Err(bad("names no claim"));
        }
        Ok(Self { segments })
    }

    /// The value at this path, if every segment exists.
    pub fn lookup<'a>(&self, claims: &'a serde_json::Map<String, Value>) -> Option<&'a Value> {
        let (first, rest) = self.segments.split_first()?;
        rest.iter()
            .try_fold(claims.get(first)?, |value, segment| value.get(segment))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_and_looks_up_paths() {
        let claims = json!({"role": "editor", "metadata": {"db_role": "reporting"},
            "https://hasura.io/jwt/claims": {"x-hasura-default-role": "user"}});
        let claims = claims.as_object().expect("object");
        let at = |p: &str| ClaimPath::parse(p).expect(p).lookup(claims).cloned();
        assert_eq!(at("$.role"), Some(json!("editor")));
        assert_eq!(at("$.metadata.db_role"), Some(json!("reporting")));
        assert_eq!(
            at("$[\"https://hasura.io/jwt/claims\"]['x-hasura-default-role']"),
            Some(json!("user"))
        );
        assert_eq!(at("$.metadata.missing"), None);
        assert_eq!(at("$.role.deeper"), None);
    }

    #[test]
    fn rejects_malformed_paths() {
        for path in ["role", "$", "$.", "$..a", "$[role]", "$[\"a\"", "$.a]"] {
            assert!(ClaimPath::parse(path).is_err(), "{path}");
        }
    }
}
