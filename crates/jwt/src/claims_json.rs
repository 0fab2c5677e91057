//! The claims as Postgres receives them: compact JSON, ASCII only (every
//! other character escaped), and never a NUL, which Postgres text and
//! jsonb cannot hold.

use serde_json::{Map, Value};

use crate::VerifyError;

/// Whether a NUL character is in any string or key of `value`.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map
            .iter()
            .any(|(key, value)| key.contains('\0') || holds_nul(value)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

/// Compact JSON with every non-ASCII character written as a `\u` escape.
/// Refuses NUL, which Postgres text (and so jsonb) cannot hold; the text
/// `\u0000` (a backslash, then `u0000`) is just text.
pub(crate) fn ascii_json(claims: &Map<String, Value>) -> Result<String, VerifyError> {
    if claims
        .iter()
        .any(|(key, value)| key.contains('\0') || holds_nul(value))
    {
        return Err(VerifyError::Malformed("claims contain a NUL character"));
    }
    let compact = serde_json::to_string(claims)
        .map_err(|_| VerifyError::Malformed("claims do not serialize"))?;
    let mut out = String::with_capacity(compact.len());
    for c in compact.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_become_ascii_json_that_parses_back_the_same() {
        let value = serde_json::json!({"sub": "usér_😀", "q": "it's \\ \"x\""});
        let ascii = ascii_json(value.as_object().expect("object")).expect("no NUL");
        assert!(ascii.is_ascii(), "{ascii}");
        assert_eq!(serde_json::from_str::<Value>(&ascii).expect("json"), value);
    }

    #[test]
    fn nul_in_claims_is_refused() {
        for value in [
            serde_json::json!({"sub": "a\u{0}b"}),
            serde_json::json!({"org": {"roles": ["x\u{0}"]}}),
            serde_json::json!({"k\u{0}": 1}),
        ] {
            assert!(
                ascii_json(value.as_object().expect("object")).is_err(),
                "{value}"
            );
        }
    }

    #[test]
    fn the_text_backslash_u0000_is_not_a_nul() {
        // Issue 13: a claim holding the six characters \u0000 was refused.
        let value = serde_json::json!({"sub": "user_1", "note": "\\u0000"});
        let ascii = ascii_json(value.as_object().expect("object")).expect("no NUL in it");
        assert_eq!(serde_json::from_str::<Value>(&ascii).expect("json"), value);
    }
}
