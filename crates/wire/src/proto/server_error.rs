//! ErrorResponse and NoticeResponse bodies: a list of (field code, text)
//! pairs, each text NUL-terminated, the list ended by a zero byte
//! ([fields](https://www.postgresql.org/docs/current/protocol-error-fields.html)).

/// An error the server reported, every field kept by its code (`C` the
/// SQLSTATE, `M` the message, `D` detail, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerError {
    fields: Vec<(u8, String)>,
}

impl ServerError {
    /// Parses an ErrorResponse body; fields that are not valid UTF-8 are
    /// kept lossily, a body cut short keeps the fields before the cut.
    pub fn parse(body: &[u8]) -> Self {
        let mut fields = Vec::new();
        let mut rest = body;
        while let Some((&code, tail)) = rest.split_first() {
            if code == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            let (text, tail) = tail.split_at(end);
            fields.push((code, String::from_utf8_lossy(text).into_owned()));
            rest = tail.get(1..).unwrap_or_default();
        }
        Self { fields }
    }

    /// An error from fields already split.
    pub(crate) fn from_fields(fields: Vec<(u8, String)>) -> Self {
        Self { fields }
    }

    /// A field by its code.
    pub fn field(&self, code: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, text)| text.as_str())
    }

    /// Every field, in the order the server sent them.
    pub fn fields(&self) -> &[(u8, String)] {
        &self.fields
    }

    /// The SQLSTATE (`XX000` when the server sent none).
    pub fn code(&self) -> &str {
        self.field(b'C').unwrap_or("XX000")
    }

    /// The primary message.
    pub fn message(&self) -> &str {
        self.field(b'M').unwrap_or_default()
    }
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code(), self.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_by_code_and_cut_bodies() {
        let error = ServerError::parse(b"SERROR\0C42P01\0Mrelation \"x\" does not exist\0\0");
        assert_eq!(error.code(), "42P01");
        assert_eq!(error.message(), "relation \"x\" does not exist");
        assert_eq!(error.to_string(), "42P01 relation \"x\" does not exist");
        let cut = ServerError::parse(b"C28P01\0Mbad");
        assert_eq!((cut.code(), cut.message()), ("28P01", "bad"));
        assert_eq!(ServerError::parse(b"").code(), "XX000");
    }
}
