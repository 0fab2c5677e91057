//! Values in /sql responses, by Neon's rules.
//!
//! Raw-text mode (`Neon-Raw-Text-Output: true`, what the driver sends): every
//! value is Postgres' text output as a JSON string, NULL as `null`; the
//! driver parses by `dataTypeID`. Typed mode: booleans become JSON
//! booleans, int2/int4/oid/float4/float8 numbers (NaN and ±Infinity stay
//! strings), json/jsonb are embedded, arrays become JSON arrays with their
//! elements rendered the same way; everything else (int8, numeric, dates,
//! ...) stays a string, so no precision is lost.

use serde_json::Value;

/// Type OIDs with special rendering in typed mode.
mod oid {
    pub const BOOL: u32 = 16;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const OID: u32 = 26;
    pub const JSON: u32 = 114;
    pub const FLOAT4: u32 = 700;
    pub const FLOAT8: u32 = 701;
    pub const JSONB: u32 = 3802;
}

/// Element type of the array types that get typed rendering; any other
/// array type's elements render as strings.
fn array_element(type_oid: u32) -> Option<u32> {
    Some(match type_oid {
        1000 => oid::BOOL,
        1005 => oid::INT2,
        1007 => oid::INT4,
        1028 => oid::OID,
        199 => oid::JSON,
        1021 => oid::FLOAT4,
        1022 => oid::FLOAT8,
        3807 => oid::JSONB,
        // text-like and other arrays: elements as strings
        1009 | 1015 | 1014 | 1016 | 1231 | 1115 | 1182 | 1183 | 1185 | 2951 | 1001 | 1002
        | 1003 | 1187 | 3905 | 3907 | 3911 | 3913 | 3927 => 0,
        _ => return None,
    })
}

/// Renders one text-format value.
pub fn render(text: Option<&str>, type_oid: u32, raw: bool) -> Value {
    let Some(text) = text else {
        return Value::Null;
    };
    if raw {
        return Value::String(text.to_owned());
    }
    if let Some(element) = array_element(type_oid) {
        return match parse_array(text) {
            Some(array) => array_to_json(&array, element),
            None => Value::String(text.to_owned()),
        };
    }
    scalar(text, type_oid)
}

fn scalar(text: &str, type_oid: u32) -> Value {
    match type_oid {
        oid::BOOL => Value::Bool(text == "t"),
        oid::INT2 | oid::INT4 | oid::OID => text
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(text.to_owned())),
        oid::FLOAT4 | oid::FLOAT8 => match text.parse::<f64>() {
            Ok(f) if f.is_finite() => serde_json::Number::from_f64(f)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(text.to_owned())),
            _ => Value::String(text.to_owned()),
        },
        oid::JSON | oid::JSONB => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned()))
        }
        _ => Value::String(text.to_owned()),
    }
}

/// A parsed array literal: nested lists of optional element texts.
#[derive(Debug, PartialEq)]
enum ArrayItem {
    Null,
    Text(String),
    Nested(Vec<ArrayItem>),
}

fn array_to_json(items: &[ArrayItem], element: u32) -> Value {
    Value::Array(
        items
            .iter()
            .map(|item| match item {
                ArrayItem::Null => Value::Null,
                ArrayItem::Text(text) if element == 0 => Value::String(text.clone()),
                ArrayItem::Text(text) => scalar(text, element),
                ArrayItem::Nested(inner) => array_to_json(inner, element),
            })
            .collect(),
    )
}

/// Parses Postgres' array output: `{1,2,NULL}`, `{"a b","c\"d"}`,
/// `{{1,2},{3,4}}`, with an optional `[1:2]=` dimension prefix.
fn parse_array(text: &str) -> Option<Vec<ArrayItem>> {
    let text = match text.find("={") {
        Some(i) if text.starts_with('[') => &text[i + 1..],
        _ => text,
    };
    let mut chars = text.chars().peekable();
    let items = parse_level(&mut chars)?;
    chars.next().is_none().then_some(items)
}

fn parse_level(chars: &mut std::iter::Peekable<std::str::Chars<'_>>) -> Option<Vec<ArrayItem>> {
    if chars.next()? != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
        return Some(items);
    }
    loop {
        let item = match chars.peek()? {
            '{' => ArrayItem::Nested(parse_level(chars)?),
            '"' => {
                chars.next();
                let mut text = String::new();
                loop {
                    match chars.next()? {
                        '\\' => text.push(chars.next()?),
                        '"' => break,
                        c => text.push(c),
                    }
                }
                ArrayItem::Text(text)
            }
            _ => {
                let mut text = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    text.push(c);
                    chars.next();
                }
                if text == "NULL" {
                    ArrayItem::Null
                } else {
                    ArrayItem::Text(text)
                }
            }
        };
        items.push(item);
        match chars.next()? {
            ',' => continue,
            '}' => return Some(items),
            _ => return None,
        }
    }
}

/// A JSON parameter as Postgres text: strings as they are, numbers and
/// booleans as their JSON text, arrays as array literals, objects as JSON.
pub fn param_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Array(items) => Some(array_literal(items)),
        Value::Object(_) => Some(value.to_string()),
    }
}

fn array_literal(items: &[Value]) -> String {
    let parts: Vec<String> = items
        .iter()
        .map(|item| match item {
            Value::Null => "NULL".to_owned(),
            Value::Array(inner) => array_literal(inner),
            other => {
                let text = param_text(other).unwrap_or_default();
                format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
            }
        })
        .collect();
    format!("{{{}}}", parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn raw_mode_keeps_text() {
        assert_eq!(render(Some("t"), oid::BOOL, true), json!("t"));
        assert_eq!(render(None, oid::BOOL, true), Value::Null);
    }

    #[test]
    fn typed_scalars() {
        assert_eq!(render(Some("t"), oid::BOOL, false), json!(true));
        assert_eq!(render(Some("-7"), oid::INT4, false), json!(-7));
        assert_eq!(render(Some("1.5"), oid::FLOAT8, false), json!(1.5));
        assert_eq!(render(Some("NaN"), oid::FLOAT8, false), json!("NaN"));
        assert_eq!(
            render(Some("-Infinity"), oid::FLOAT4, false),
            json!("-Infinity")
        );
        assert_eq!(
            render(Some("9007199254740993"), 20, false),
            json!("9007199254740993")
        );
        assert_eq!(
            render(Some("{\"a\": [1]}"), oid::JSONB, false),
            json!({"a": [1]})
        );
        assert_eq!(render(Some("12.50"), 1700, false), json!("12.50"));
    }

    #[test]
    fn typed_arrays() {
        assert_eq!(render(Some("{1,NULL,3}"), 1007, false), json!([1, null, 3]));
        assert_eq!(
            render(Some("{{1,2},{3,4}}"), 1007, false),
            json!([[1, 2], [3, 4]])
        );
        assert_eq!(
            render(Some(r#"{"a b","c\"d",NULL,"NULL",x}"#), 1009, false),
            json!(["a b", "c\"d", null, "NULL", "x"])
        );
        assert_eq!(render(Some("{t,f}"), 1000, false), json!([true, false]));
        assert_eq!(render(Some("[0:1]={5,6}"), 1007, false), json!([5, 6]));
        assert_eq!(render(Some("{}"), 1007, false), json!([]));
    }

    #[test]
    fn params_become_text() {
        assert_eq!(param_text(&json!(null)), None);
        assert_eq!(param_text(&json!(42)), Some("42".into()));
        assert_eq!(param_text(&json!(true)), Some("true".into()));
        assert_eq!(param_text(&json!({"k": 1})), Some("{\"k\":1}".into()));
        assert_eq!(
            param_text(&json!([1, "a\"b", null, [2]])),
            Some(r#"{"1","a\"b",NULL,{"2"}}"#.into())
        );
        // What the array literal means to Postgres round-trips through the parser.
        let literal = param_text(&json!(["x,y", "back\\slash"])).expect("text");
        assert_eq!(
            render(Some(&literal), 1009, false),
            json!(["x,y", "back\\slash"])
        );
    }
}
