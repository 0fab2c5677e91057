//! Statement text with its literals taken out, for the audit log's
//! `statements = "normalized"`: string literals (standard, `E''` with
//! backslash escapes, `B''`, `X''`, `N''`, `U&''`, dollar-quoted) and
//! numeric constants become `?`, comments are dropped, whitespace runs
//! become one space. Identifiers (quoted or not, digits inside them
//! included) and bind parameters (`$1`) stay as written.
//!
//! It is a lexer, not a parser: it follows the lexical rules of
//! <https://www.postgresql.org/docs/current/sql-syntax-lexical.html> far
//! enough to know where literals and comments begin and end. It assumes
//! `standard_conforming_strings = on` (the default since PostgreSQL 9.1):
//! in a plain `'...'` literal a backslash is an ordinary character. An
//! unterminated literal or comment swallows the rest of the text, so a
//! malformed statement never leaks what follows its quote.

/// Appends the normalized form of `sql` to `out`, at most `limit` bytes of
/// it (cut at a character boundary); returns whether it was cut.
pub fn normalize(sql: &str, out: &mut String, limit: usize) -> bool {
    let start = out.len();
    let bytes = sql.as_bytes();
    let mut lexer = Lexer {
        sql,
        bytes,
        at: 0,
        out,
        start,
        space: false,
    };
    lexer.run();
    let cut = lexer.out.len() - start > limit;
    if cut {
        let mut end = start + limit;
        while !lexer.out.is_char_boundary(end) {
            end -= 1;
        }
        lexer.out.truncate(end);
    }
    cut
}

/// Appends `sql` as sent, at most `limit` bytes of it (cut at a character
/// boundary); returns whether it was cut.
pub fn bounded(sql: &str, out: &mut String, limit: usize) -> bool {
    let mut end = sql.len().min(limit);
    while !sql.is_char_boundary(end) {
        end -= 1;
    }
    out.push_str(sql.get(..end).unwrap_or_default());
    end < sql.len()
}

/// The literal placeholder.
const PLACEHOLDER: &str = "?";

/// Whether `b` may continue an unquoted identifier (any non-ASCII byte
/// may: Postgres allows letters of any script).
fn identifier_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80
}

/// Whether `b` may start an unquoted identifier or keyword.
fn identifier_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

struct Lexer<'a> {
    sql: &'a str,
    bytes: &'a [u8],
    at: usize,
    out: &'a mut String,
    /// Where this statement's text starts in `out`.
    start: usize,
    /// Whitespace (or a comment) was skipped since the last token.
    space: bool,
}

impl Lexer<'_> {
    fn peek(&self, ahead: usize) -> Option<u8> {
        self.bytes.get(self.at + ahead).copied()
    }

    /// Emits `text` as the next token, after one space if any separated
    /// it from the one before.
    fn emit(&mut self, text: &str) {
        if self.space && self.out.len() > self.start {
            self.out.push(' ');
        }
        self.space = false;
        self.out.push_str(text);
    }

    /// Emits the source from `from` to the current position.
    fn emit_source(&mut self, from: usize) {
        let text = self.sql.get(from..self.at).unwrap_or_default();
        if self.space && self.out.len() > self.start {
            self.out.push(' ');
        }
        self.space = false;
        self.out.push_str(text);
    }

    fn run(&mut self) {
        while let Some(b) = self.peek(0) {
            match b {
                b' ' | b'\t' | b'\n' | b'\r' | b'\x0c' => {
                    self.space = true;
                    self.at += 1;
                }
                b'-' if self.peek(1) == Some(b'-') => self.line_comment(),
                b'/' if self.peek(1) == Some(b'*') => self.block_comment(),
                b'\'' => self.quoted(false),
                b'"' => self.quoted_identifier(),
                b'$' => self.dollar(),
                b'0'..=b'9' => self.number(),
                b'.' if self.peek(1).is_some_and(|n| n.is_ascii_digit()) => self.number(),
                _ if identifier_start(b) => self.word(),
                _ => {
                    let from = self.at;
                    // Every other byte that reaches here is ASCII.
                    self.at += 1;
                    self.emit_source(from);
                }
            }
        }
    }

    fn line_comment(&mut self) {
        while let Some(b) = self.peek(0) {
            self.at += 1;
            if b == b'\n' {
                break;
            }
        }
        self.space = true;
    }

    /// `/* ... */`, nested as Postgres nests them.
    fn block_comment(&mut self) {
        let mut depth = 0usize;
        while let Some(b) = self.peek(0) {
            match (b, self.peek(1)) {
                (b'/', Some(b'*')) => {
                    depth += 1;
                    self.at += 2;
                }
                (b'*', Some(b'/')) => {
                    depth -= 1;
                    self.at += 2;
                    if depth == 0 {
                        break;
                    }
                }
                _ => self.at += 1,
            }
        }
        self.space = true;
    }

    /// A `'...'` literal from its opening quote; `escapes`: an `E''`
    /// string, where a backslash escapes the next character.
    fn quoted(&mut self, escapes: bool) {
        self.at += 1;
        while let Some(b) = self.peek(0) {
            match b {
                b'\\' if escapes => self.at += 2,
                b'\'' if self.peek(1) == Some(b'\'') => self.at += 2,
                b'\'' => {
                    self.at += 1;
                    break;
                }
                _ => self.at += 1,
            }
        }
        self.at = self.at.min(self.bytes.len());
        self.emit(PLACEHOLDER);
    }

    /// A `"quoted identifier"`, kept as written.
    fn quoted_identifier(&mut self) {
        let from = self.at;
        self.at += 1;
        while let Some(b) = self.peek(0) {
            self.at += 1;
            if b == b'"' {
                if self.peek(0) == Some(b'"') {
                    self.at += 1;
                } else {
                    break;
                }
            }
        }
        self.emit_source(from);
    }

    /// `$1` (a parameter, kept), `$tag$...$tag$` (a literal), or a lone
    /// `$`.
    fn dollar(&mut self) {
        let from = self.at;
        if self.peek(1).is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
            while self.peek(0).is_some_and(|b| b.is_ascii_digit()) {
                self.at += 1;
            }
            self.emit_source(from);
            return;
        }
        let mut end = self.at + 1;
        while self
            .bytes
            .get(end)
            .is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'_' || b >= 0x80)
        {
            end += 1;
        }
        let tag_starts_well = self
            .bytes
            .get(self.at + 1)
            .is_none_or(|b| !b.is_ascii_digit());
        if self.bytes.get(end) != Some(&b'$') || !tag_starts_well {
            self.at += 1;
            self.emit_source(from);
            return;
        }
        let delimiter = self.sql.get(from..=end).unwrap_or("$$");
        let body = end + 1;
        self.at = match self.sql.get(body..).and_then(|rest| rest.find(delimiter)) {
            Some(found) => body + found + delimiter.len(),
            None => self.bytes.len(),
        };
        self.emit(PLACEHOLDER);
    }

    /// A numeric constant: digits, a point, an exponent with its sign,
    /// `0x`/`0o`/`0b` prefixes and `_` separators (Postgres 16).
    fn number(&mut self) {
        while let Some(b) = self.peek(0) {
            match b {
                b'e' | b'E' if matches!(self.peek(1), Some(b'+' | b'-')) => self.at += 2,
                _ if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' => self.at += 1,
                _ => break,
            }
        }
        self.emit(PLACEHOLDER);
    }

    /// A keyword or identifier, kept; or the prefix of a literal (`E''`,
    /// `B''`, `X''`, `N''`, `U&''`), which goes with it.
    fn word(&mut self) {
        let from = self.at;
        while self.peek(0).is_some_and(identifier_byte) {
            self.at += 1;
        }
        let word = self.sql.get(from..self.at).unwrap_or_default();
        let next = self.peek(0);
        match word {
            "E" | "e" if next == Some(b'\'') => self.quoted(true),
            "B" | "b" | "X" | "x" | "N" | "n" if next == Some(b'\'') => self.quoted(false),
            "U" | "u" if next == Some(b'&') && self.peek(1) == Some(b'\'') => {
                self.at += 1;
                self.quoted(false);
            }
            _ => self.emit_source(from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(sql: &str) -> String {
        let mut out = String::new();
        normalize(sql, &mut out, 10_000);
        out
    }

    #[test]
    fn string_literals_of_every_kind_become_placeholders() {
        assert_eq!(
            norm("select * from t where a = 'x''y' and b = E'it\\'s \\\\' and c = e'\\''"),
            "select * from t where a = ? and b = ? and c = ?"
        );
        assert_eq!(
            norm("values (B'101', X'1F', n'nat', U&'d\\0061t', u&'x')"),
            "values (?, ?, ?, ?, ?)"
        );
        // A backslash is ordinary in a standard string: the literal ends
        // at the next quote.
        assert_eq!(norm("select 'a\\', 'b'"), "select ?, ?");
    }

    #[test]
    fn dollar_quotes_are_literals_and_parameters_stay() {
        assert_eq!(
            norm("select $$it's 'quoted'$$, $tag$ $$ inner $$ $tag$, $1, $23"),
            "select ?, ?, $1, $23"
        );
        assert_eq!(norm("do $body$ begin raise 'secret'; end $body$"), "do ?");
    }

    #[test]
    fn comments_are_dropped_wherever_they_are() {
        assert_eq!(
            norm("select 1 -- password 'hunter2'\n, 2 /* a /* nested 'x' */ b */ from t"),
            "select ? , ? from t"
        );
        assert_eq!(norm("select 1 /* unterminated 'secret"), "select ?");
        assert_eq!(norm("select 2 -- trailing"), "select ?");
    }

    #[test]
    fn numbers_become_placeholders_but_not_inside_identifiers() {
        assert_eq!(
            norm("select 42, 1.5e-3, .5, 0x1F, 1_000, -7 from tab_9 t2 where col1 = 3"),
            "select ?, ?, ?, ?, ?, -? from tab_9 t2 where col1 = ?"
        );
        assert_eq!(
            norm("select a$1, \"col 2's\", \"q\"\"7\" from \"T3\""),
            "select a$1, \"col 2's\", \"q\"\"7\" from \"T3\""
        );
        assert_eq!(norm("select arr[1:2]"), "select arr[?:?]");
    }

    #[test]
    fn unterminated_literals_swallow_the_rest() {
        assert_eq!(norm("select 'abc, secret from t"), "select ?");
        assert_eq!(norm("select E'abc\\"), "select ?");
        assert_eq!(norm("select $q$ never closed"), "select ?");
        assert_eq!(norm("select \"open ident"), "select \"open ident");
    }

    #[test]
    fn whitespace_folds_and_non_ascii_survives() {
        assert_eq!(
            norm("  select\n\t'héllo',   naïve\r\nfrom  t  "),
            "select ?, naïve from t"
        );
        assert_eq!(norm("select $€"), "select $€");
    }

    #[test]
    fn the_limit_cuts_at_a_character_boundary() {
        let mut out = String::new();
        assert!(normalize("select naïve from t", &mut out, 10));
        assert_eq!(out, "select na");
        let mut out = String::new();
        assert!(bounded("select 'é'", &mut out, 9));
        assert_eq!(out, "select '");
        let mut out = String::new();
        assert!(!bounded("select 1", &mut out, 9));
        assert_eq!(out, "select 1");
    }
}
