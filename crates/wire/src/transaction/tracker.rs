//! What a client's session holds beyond one transaction, followed from the
//! messages passing through the relay (transaction pooling).
//!
//! In transaction pooling a client's transactions may run on different
//! upstream connections. The [`Tracker`] keeps what must follow the client
//! there: its named prepared statements (the Parse messages that created
//! them, kept once the ledger retires them as done, dropped when a Close of
//! them is). It also notes commands whose effect outlives the transaction
//! (SET, PREPARE, LISTEN, ..., or a query that calls `set_config`), after
//! which the session asks the server what the client's session now holds
//! (see `state.rs`), and the dotted names the client's statements mention:
//! Postgres lists no custom settings (`app.tenant`), so these are the ones
//! it is asked about.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::proto::framer::TagSet;
use crate::proto::ledger::{InFlight, Outcome};

/// Most bytes of Parse messages kept per client; past it the client keeps
/// its upstream connection instead.
const MAX_STATEMENT_BYTES: usize = 4 * 1024 * 1024;
/// What keeping one statement costs beyond its message (map entry, name).
const STATEMENT_OVERHEAD: usize = 96;

/// Most dotted names kept from one transaction's statements.
const MAX_MENTIONED: usize = 64;
/// Longest dotted name looked at (two identifiers of Postgres's 63 bytes).
const MAX_NAME: usize = 127;

/// Command tags whose effect can outlive the transaction that ran them.
const SESSION_COMMANDS: &[&[u8]] = &[
    b"DO",
    b"CALL",
    b"SET",
    b"RESET",
    b"DISCARD",
    b"PREPARE",
    b"DEALLOCATE",
    b"LISTEN",
    b"UNLISTEN",
    b"DECLARE CURSOR",
    b"CREATE TABLE",
    b"CREATE VIEW",
    b"CREATE SEQUENCE",
    b"CREATE FUNCTION",
    b"CREATE TYPE",
    b"CREATE INDEX",
    b"LOAD",
];

/// A Parse or Close sent and not yet retired by the ledger.
#[derive(Debug)]
enum Pending {
    /// Parse of a named statement (name, whole message), or of the unnamed.
    Parse(Option<(String, Vec<u8>)>),
    /// Close of a named statement, or of a portal / the unnamed statement.
    Close(Option<String>),
}

/// A client's named statements and session-state commands.
#[derive(Debug, Default)]
pub struct Tracker {
    /// By name. A B-tree, not a hash map: names are the client's, and a
    /// tracker lives in every idle transaction-pooled client, where a
    /// hash map's random state would cost it 24 bytes more.
    statements: BTreeMap<String, Vec<u8>>,
    statement_bytes: usize,
    /// Parse and Close messages in the order sent; the ledger retires them
    /// in the same order.
    in_flight: VecDeque<Pending>,
    touched: bool,
    mentioned: BTreeSet<String>,
    untrackable: Option<&'static str>,
}

impl Tracker {
    /// Client messages whose bodies the tracker reads: Parse (to replay),
    /// Close (which statement), Query (what its text mentions).
    pub const CLIENT_BODIES: TagSet = TagSet::of(b"PCQ");
    /// Server messages the tracker reads: CommandComplete's tag.
    pub const SERVER_REPORTED: TagSet = TagSet::of(b"C");
    /// Server message bodies it reads.
    pub const SERVER_BODIES: TagSet = TagSet::of(b"C");

    /// Notes a client message (its body when captured: Parse, Close, Query).
    pub fn client_message(&mut self, tag: u8, body: Option<&[u8]>) {
        if let (b'Q' | b'P', Some(text)) = (tag, body) {
            self.read_statement(text);
        }
        match tag {
            b'P' => match body {
                Some(body) => {
                    let name = cstr(body).unwrap_or_default();
                    let parse = (!name.is_empty()).then(|| {
                        let mut message = Vec::with_capacity(body.len() + 5);
                        message.push(b'P');
                        let length = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
                        message.extend_from_slice(&length.to_be_bytes());
                        message.extend_from_slice(body);
                        (name.to_owned(), message)
                    });
                    self.in_flight.push_back(Pending::Parse(parse));
                }
                None => {
                    self.untrackable = Some("a prepared statement too large to track");
                    self.in_flight.push_back(Pending::Parse(None));
                }
            },
            b'C' => {
                let name = body
                    .filter(|body| body.first() == Some(&b'S'))
                    .and_then(|body| cstr(&body[1..]))
                    .filter(|name| !name.is_empty())
                    .map(str::to_owned);
                self.in_flight.push_back(Pending::Close(name));
            }
            _ => {}
        }
    }

    /// Notes how the server dealt with a client message, as the ledger
    /// retires it: a Parse done keeps its statement, a Close done drops
    /// one; failed and skipped ones change nothing.
    pub fn retired(&mut self, request: InFlight, outcome: Outcome) {
        if !matches!(request, InFlight::Parse | InFlight::Close) {
            return;
        }
        match (self.in_flight.pop_front(), request, outcome) {
            (Some(Pending::Parse(Some((name, message)))), InFlight::Parse, Outcome::Done) => {
                self.commit(name, message);
            }
            (Some(Pending::Close(Some(name))), InFlight::Close, Outcome::Done) => {
                self.forget(&name)
            }
            (Some(Pending::Parse(_)), InFlight::Parse, _)
            | (Some(Pending::Close(_)), InFlight::Close, _) => {}
            _ => self.untrackable = Some("replies out of order"),
        }
    }

    /// Notes a server message (its body when captured: CommandComplete).
    pub fn server_message(&mut self, tag: u8, body: Option<&[u8]>) {
        if tag != b'C' {
            return;
        }
        let command = body.map(|b| b.strip_suffix(b"\0").unwrap_or(b));
        if command.is_some_and(Self::leaves_session_state) {
            self.touched = true;
        }
    }

    /// Whether a command tag (a CommandComplete's, without its NUL) names
    /// a command whose effect can outlive the transaction that ran it.
    /// `/sql` asks too, to know which requests must be reset after.
    pub fn leaves_session_state(command: &[u8]) -> bool {
        SESSION_COMMANDS.iter().any(|session_command| {
            command
                .strip_prefix(*session_command)
                .is_some_and(|rest| rest.first().is_none_or(|&b| b == b' '))
        })
    }

    /// Whether a statement's text calls `set_config`, whose effect can
    /// outlive the transaction with no command tag to show it. Read
    /// conservatively: the name anywhere in the text, in any case, or a
    /// name spelled with Unicode escapes (`U&"..."`), which may spell it.
    pub fn calls_set_config(text: &[u8]) -> bool {
        words(text).any(|(word, shape)| shape == Shape::Escapes || names_set_config(word))
    }

    /// Whether `text` holds one of `parts` inside a name, or one of
    /// `names` as a whole name (or a whole part of a dotted one), in any
    /// case; or a name or string spelled with Unicode escapes (`U&"..."`,
    /// `U&'...'`), which may spell any of them. One pass over the text's
    /// words: the parts are made of word bytes only, so none spans two
    /// words. `/sql` asks it of each statement.
    pub fn text_mentions(text: &[u8], parts: &[&[u8]], names: &[&[u8]]) -> bool {
        words(text).any(|(word, shape)| {
            parts.iter().any(|part| holds(word, part))
                || match shape {
                    Shape::Plain => names.iter().any(|name| word.eq_ignore_ascii_case(name)),
                    Shape::Dotted => (word.split(|b| *b == b'.'))
                        .any(|part| names.iter().any(|name| part.eq_ignore_ascii_case(name))),
                    Shape::Escapes => true,
                }
        })
    }

    /// Notes what a statement's text says about session state: a call of
    /// `set_config`, and the dotted names that may be custom settings. One
    /// pass over the text, which every transaction-pooled statement pays.
    fn read_statement(&mut self, text: &[u8]) {
        for (word, shape) in words(text) {
            if !self.touched && (shape == Shape::Escapes || names_set_config(word)) {
                self.touched = true;
            }
            if shape != Shape::Dotted
                || self.mentioned.len() >= MAX_MENTIONED
                || word.len() > MAX_NAME
            {
                continue;
            }
            if let Some(name) = setting_name(word) {
                self.mentioned.insert(name);
            }
        }
        // A name with a quoted part is not one word: `"app"."tenant"`.
        if text.contains(&b'"') {
            for name in quoted_names(text) {
                if self.mentioned.len() >= MAX_MENTIONED {
                    break;
                }
                self.mentioned.insert(name);
            }
        }
    }

    /// The dotted names statements mentioned since the last call.
    pub fn take_mentioned(&mut self) -> BTreeSet<String> {
        std::mem::take(&mut self.mentioned)
    }

    /// Forgets the dotted names statements mentioned (most transactions
    /// mention none: an empty set is left alone, as even dropping one
    /// costs a walk).
    pub fn forget_mentioned(&mut self) {
        if !self.mentioned.is_empty() {
            self.mentioned.clear();
        }
    }

    fn commit(&mut self, name: String, message: Vec<u8>) {
        self.forget(&name);
        self.statement_bytes += message.len() + STATEMENT_OVERHEAD;
        if self.statement_bytes > MAX_STATEMENT_BYTES {
            self.untrackable = Some("prepared statements past the tracking limit");
        }
        self.statements.insert(name, message);
    }

    fn forget(&mut self, name: &str) {
        if let Some(message) = self.statements.remove(name) {
            self.statement_bytes -= message.len() + STATEMENT_OVERHEAD;
        }
    }

    /// The Parse messages that recreate the client's named statements.
    pub fn statements(&self) -> impl Iterator<Item = &[u8]> {
        self.statements.values().map(Vec::as_slice)
    }

    /// Keeps only the statements the server still has (after a DEALLOCATE).
    pub fn retain_statements(&mut self, present: &[String]) {
        let gone: Vec<String> = self
            .statements
            .keys()
            .filter(|name| !present.contains(name))
            .cloned()
            .collect();
        for name in gone {
            self.forget(&name);
        }
    }

    /// Whether a command that can leave session state ran since the flag
    /// was last taken.
    pub fn touched(&self) -> bool {
        self.touched
    }

    /// Whether a command that can leave session state ran since the last
    /// call; clears the flag.
    pub fn take_touched(&mut self) -> bool {
        std::mem::take(&mut self.touched)
    }

    /// Why the client's state cannot be carried to another connection, if
    /// it cannot.
    pub fn untrackable(&self) -> Option<&'static str> {
        self.untrackable
    }
}

/// The NUL-terminated string at the start of `bytes`, if it is UTF-8.
fn cstr(bytes: &[u8]) -> Option<&str> {
    let end = bytes.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&bytes[..end]).ok()
}

/// Bytes that can be part of a name, dotted or not: ASCII letters and
/// digits, `_`, `$` and `.`.
const WORD_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut c: u8 = 0;
    loop {
        table[c as usize] = c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c == b'.';
        if c == u8::MAX {
            break table;
        }
        c += 1;
    }
};

/// How a run of word bytes found by [`words`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A name or part of one, without a dot.
    Plain,
    /// A name with a dot in it (`schema.name`, a custom setting).
    Dotted,
    /// The `U` of `U&"..."` or `U&'...'`: a quoted name or string whose
    /// Unicode escapes can spell any name without its letters
    /// (`U&"set\005Fconfig"`), read as naming anything.
    Escapes,
}

/// The runs of [`WORD_BYTES`] in `text`, each with its [`Shape`]. Every
/// letter of `set_config` is a word byte, so the name never spans two
/// words; a name spelled with escapes is seen by its `U&` prefix.
fn words(text: &[u8]) -> impl Iterator<Item = (&[u8], Shape)> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let rest = text.get(at..)?;
        let start = at + rest.iter().position(|&b| WORD_BYTES[usize::from(b)])?;
        let mut dotted = false;
        let len = text
            .get(start..)
            .unwrap_or_default()
            .iter()
            .take_while(|&&b| {
                dotted |= b == b'.';
                WORD_BYTES[usize::from(b)]
            })
            .count();
        at = start + len;
        let word = text.get(start..at).unwrap_or_default();
        let last = word.rsplit(|b| *b == b'.').next().unwrap_or_default();
        let shape = if last.eq_ignore_ascii_case(b"u")
            && matches!(text.get(at..at + 2), Some([b'&', b'"' | b'\'']))
        {
            // `U&"..."`, also as the last part of a dotted name.
            Shape::Escapes
        } else if dotted {
            Shape::Dotted
        } else {
            Shape::Plain
        };
        Some((word, shape))
    })
}

/// `word` as a custom setting's name, if it can be one: dotted parts,
/// each of word bytes and starting with a letter or `_`, in lower case
/// (setting names are case-insensitive).
fn setting_name(word: &[u8]) -> Option<String> {
    let is_name = word.len() <= MAX_NAME
        && word.contains(&b'.')
        && word.split(|b| *b == b'.').all(|part| {
            part.first()
                .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_')
                && part.iter().all(|&b| WORD_BYTES[usize::from(b)])
        });
    let name = std::str::from_utf8(word).ok().filter(|_| is_name)?;
    Some(name.to_ascii_lowercase())
}

/// The dotted names in `text` with a part in double quotes (`"app"."x"`,
/// `app."x"`, `"app.x"`) or spelled with Unicode escapes
/// (`U&"app\002Ex"`), unquoted and decoded, that can be a custom
/// setting's name ([`setting_name`]), at most [`MAX_MENTIONED`] of them. A
/// part that cannot be decoded ends its name unread.
fn quoted_names(text: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut name = Vec::new();
    let mut quoted = false;
    let mut at = 0;
    // A name is parts joined by dots: after a part, a dot or its end.
    let mut after_part = false;
    while at < text.len() && names.len() < MAX_MENTIONED {
        if after_part {
            after_part = false;
            if text.get(at) == Some(&b'.') {
                name.push(b'.');
                at += 1;
                continue;
            }
            if quoted && let Some(found) = setting_name(&name) {
                names.push(found);
            }
            (name, quoted) = (Vec::new(), false);
            continue;
        }
        match name_part(text, at) {
            Some((part, was_quoted, end)) => {
                name.extend_from_slice(&part);
                quoted |= was_quoted;
                at = end;
                after_part = true;
            }
            None => {
                (name, quoted) = (Vec::new(), false);
                at += 1;
            }
        }
    }
    if quoted && let Some(found) = setting_name(&name) {
        names.push(found);
    }
    names
}

/// The part of a name at `at`: a run of word bytes, a `"quoted"` name or
/// a `U&"escaped"` one (with its `UESCAPE`, if any), as the server reads
/// it, whether it was quoted, and where it ends.
fn name_part(text: &[u8], at: usize) -> Option<(Vec<u8>, bool, usize)> {
    let rest = text.get(at..)?;
    let escaped = matches!(rest, [b'u' | b'U', b'&', b'"', ..]);
    let open = if escaped { 2 } else { 0 };
    if rest.get(open) != Some(&b'"') {
        let len = rest
            .iter()
            .take_while(|&&b| b != b'.' && WORD_BYTES[usize::from(b)])
            .count();
        return (len > 0).then(|| (rest[..len].to_vec(), false, at + len));
    }
    // Up to the closing quote; `""` is a quote inside the name.
    let mut part = Vec::new();
    let mut i = open + 1;
    loop {
        match (rest.get(i)?, rest.get(i + 1)) {
            (b'"', Some(b'"')) => {
                part.push(b'"');
                i += 2;
            }
            (b'"', _) => break,
            (&b, _) => {
                part.push(b);
                i += 1;
            }
        }
    }
    let mut end = i + 1;
    if escaped {
        let mut escape = b'\\';
        // `UESCAPE 'c'` after the name chooses another escape character.
        let after = rest.get(end..).unwrap_or_default();
        let spaces = after.iter().take_while(|b| b.is_ascii_whitespace()).count();
        if let Some(clause) = after.get(spaces..spaces + 7)
            && clause.eq_ignore_ascii_case(b"uescape")
        {
            let tail = after.get(spaces + 7..).unwrap_or_default();
            let gap = tail.iter().take_while(|b| b.is_ascii_whitespace()).count();
            let [b'\'', chosen, b'\'', ..] = tail.get(gap..)? else {
                return None;
            };
            escape = *chosen;
            end += spaces + 7 + gap + 3;
        }
        part = unescape(&part, escape)?;
    }
    Some((part, true, at + end))
}

/// A `U&` name's text with its escapes (`\XXXX`, `\+XXXXXX`, `\\`, with
/// `escape` for the backslash) replaced by the characters they name.
fn unescape(text: &[u8], escape: u8) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        if b != escape {
            out.push(b);
            i += 1;
            continue;
        }
        if text.get(i + 1) == Some(&escape) {
            out.push(escape);
            i += 2;
            continue;
        }
        let (digits, from) = match text.get(i + 1) {
            Some(b'+') => (6, i + 2),
            _ => (4, i + 1),
        };
        let hex = std::str::from_utf8(text.get(from..from + digits)?).ok()?;
        let code = u32::from_str_radix(hex, 16).ok()?;
        let mut utf8 = [0; 4];
        out.extend_from_slice(char::from_u32(code)?.encode_utf8(&mut utf8).as_bytes());
        i = from + digits;
    }
    Some(out)
}

/// Whether `word` holds `set_config`, in any case.
fn names_set_config(word: &[u8]) -> bool {
    holds(word, b"set_config")
}

/// Whether `word` holds `part`, in any case.
fn holds(word: &[u8], part: &[u8]) -> bool {
    word.len() >= part.len()
        && word
            .windows(part.len())
            .any(|w| w.eq_ignore_ascii_case(part))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_body(name: &str, sql: &str) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        body.extend_from_slice(sql.as_bytes());
        body.extend_from_slice(&[0, 0, 0]);
        body
    }

    fn names(tracker: &Tracker) -> Vec<String> {
        let mut names: Vec<String> = tracker.statements.keys().cloned().collect();
        names.sort();
        names
    }

    #[test]
    fn keeps_statements_the_server_created_and_drops_closed_ones() {
        let mut tracker = Tracker::default();
        tracker.client_message(b'P', Some(&parse_body("s1", "select 1")));
        tracker.client_message(b'P', Some(&parse_body("", "select 2")));
        tracker.retired(InFlight::Parse, Outcome::Done);
        tracker.retired(InFlight::Parse, Outcome::Done);
        assert_eq!(names(&tracker), ["s1"]);
        let replay: Vec<&[u8]> = tracker.statements().collect();
        assert_eq!(replay[0][0], b'P');
        assert_eq!(
            u32::from_be_bytes(replay[0][1..5].try_into().expect("length")) as usize,
            replay[0].len() - 1
        );

        tracker.client_message(b'C', Some(b"Ss1\0"));
        tracker.retired(InFlight::Close, Outcome::Done);
        assert!(names(&tracker).is_empty());
    }

    #[test]
    fn a_failed_parse_and_everything_skipped_after_it_is_not_kept() {
        let mut tracker = Tracker::default();
        tracker.client_message(b'P', Some(&parse_body("bad", "selec 1")));
        tracker.client_message(b'P', Some(&parse_body("skipped", "select 1")));
        tracker.client_message(b'P', Some(&parse_body("good", "select 1")));
        tracker.retired(InFlight::Parse, Outcome::Failed);
        tracker.retired(InFlight::Bind, Outcome::Skipped);
        tracker.retired(InFlight::Parse, Outcome::Skipped);
        tracker.retired(InFlight::Sync, Outcome::Done);
        tracker.retired(InFlight::Parse, Outcome::Done);
        assert_eq!(names(&tracker), ["good"]);
        assert_eq!(tracker.untrackable(), None);
    }

    #[test]
    fn the_whole_path_through_the_ledger_keeps_only_what_the_server_created() {
        use crate::proto::ledger::Ledger;
        let mut ledger = Ledger::default();
        let mut tracker = Tracker::default();
        let client = |ledger: &mut Ledger, tracker: &mut Tracker, tag, body: Option<&[u8]>| {
            tracker.client_message(tag, body);
            ledger.client_message(tag, &mut |r, o| tracker.retired(r, o));
        };
        let bad = parse_body("bad", "selec 1");
        let good = parse_body("good", "select 1");
        client(&mut ledger, &mut tracker, b'P', Some(&bad));
        client(&mut ledger, &mut tracker, b'S', None);
        ledger.server_message(b'E', None, &mut |r, o| tracker.retired(r, o));
        ledger.server_message(b'Z', Some(b"I"), &mut |r, o| tracker.retired(r, o));
        client(&mut ledger, &mut tracker, b'P', Some(&good));
        client(&mut ledger, &mut tracker, b'S', None);
        ledger.server_message(b'1', None, &mut |r, o| tracker.retired(r, o));
        ledger.server_message(b'Z', Some(b"I"), &mut |r, o| tracker.retired(r, o));
        assert!(ledger.idle());
        assert_eq!(names(&tracker), ["good"]);
    }

    #[test]
    fn statements_calling_set_config_and_the_dotted_names_they_mention_are_noticed() {
        let mut tracker = Tracker::default();
        tracker.client_message(b'Q', Some(b"select t.id from todos t\0"));
        assert!(!tracker.take_touched());
        tracker.client_message(
            b'Q',
            Some(b"SELECT pg_catalog.SET_CONFIG('App.Tenant', '42', false), 1.5, x.\0"),
        );
        assert!(tracker.take_touched());
        assert_eq!(
            Vec::from_iter(tracker.take_mentioned()),
            ["app.tenant", "pg_catalog.set_config", "t.id"]
        );
        assert!(tracker.take_mentioned().is_empty());
    }

    #[test]
    fn set_config_is_found_wherever_the_text_holds_it() {
        let naive = |text: &[u8]| {
            text.windows(10)
                .any(|w| w.eq_ignore_ascii_case(b"set_config"))
        };
        for text in [
            &b"select set_config('a.b', '1', false)"[..],
            b"SELECT\"SET_CONFIG\"('a.b','1',false)",
            b"select x.set_config(1)",
            b"select 1;set_config",
            b"set_config",
            b"set_confi",
            b"select reset_configs from t",
            b"select 'set_config' as s",
            b"select set config",
            b"select set$config",
            b"",
            b"\xffset_config\xff",
        ] {
            assert_eq!(Tracker::calls_set_config(text), naive(text), "{text:?}");
        }
    }

    #[test]
    fn setting_names_with_quoted_or_escaped_parts_are_read_as_the_server_reads_them() {
        let mentioned = |text: &[u8]| {
            let mut tracker = Tracker::default();
            let mut body = text.to_vec();
            body.push(0);
            tracker.client_message(b'Q', Some(&body));
            Vec::from_iter(tracker.take_mentioned())
        };
        assert_eq!(
            mentioned(br#"set "App"."Tenant" = 'a'; set app."Region" = 'b'"#),
            ["app.region", "app.tenant"]
        );
        assert_eq!(mentioned(br#"set "app.zone" = 'c'"#), ["app.zone"]);
        assert_eq!(
            mentioned(br#"set U&"app\002Eescaped" = 'd'; set U&"my!002Ex" uescape '!' = 'e'"#),
            ["app.escaped", "my.x"]
        );
        assert_eq!(mentioned(br#"set u&"app".U&"\+00006Bey" = 1"#), ["app.key"]);
        // Not a setting's name: no dot, other bytes, a bad escape, a quote
        // never closed. (Dotted words inside quotes are read as before.)
        for text in [
            &br#"select "Todos".id from "Todos""#[..],
            br#"select * from "my-app"."x""#,
            br#"set U&"app\zz.x" = 1"#,
            br#"set "app"."x = 1"#,
            br#"select '"' || x.y"#,
        ] {
            let got = mentioned(text);
            assert!(
                got.iter()
                    .all(|name| ["x.y", "todos.id", "zz.x"].contains(&name.as_str())),
                "{text:?}: {got:?}"
            );
        }
    }

    #[test]
    fn a_name_or_string_spelled_with_unicode_escapes_may_be_anything() {
        for text in [
            &br#"select U&"set\005Fconfig"('a.b', '1', false)"#[..],
            br#"SELECT pg_catalog.u&"\0073et_config"('a.b','1',false)"#,
            br"select set_config(U&'app\002Etenant', '1', false)",
            br#"select (u&"s!0065t_config" uescape '!')('a.b', '1', false)"#,
        ] {
            assert!(Tracker::calls_set_config(text), "{text:?}");
            assert!(Tracker::text_mentions(text, &[b"nothing"], &[]), "{text:?}");
            let mut tracker = Tracker::default();
            let mut body = text.to_vec();
            body.push(0);
            tracker.client_message(b'Q', Some(&body));
            assert!(tracker.take_touched(), "{text:?}");
        }
        // Not the prefix of a quoted name or string: read as before.
        for text in [
            &b"select u & 1 from t"[..],
            b"select u&1",
            b"select menu&'x'",
            br#"select u"x""#,
        ] {
            assert!(!Tracker::calls_set_config(text), "{text:?}");
            assert!(
                !Tracker::text_mentions(text, &[b"nothing"], &[]),
                "{text:?}"
            );
        }
    }

    #[test]
    fn session_commands_are_noticed_by_their_tags() {
        let mut tracker = Tracker::default();
        tracker.server_message(b'C', Some(b"SELECT 1\0"));
        tracker.server_message(b'C', Some(b"SETTINGS\0"));
        assert!(!tracker.take_touched());
        tracker.server_message(b'C', Some(b"SET\0"));
        assert!(tracker.take_touched());
        assert!(!tracker.take_touched());
        tracker.server_message(b'C', Some(b"DECLARE CURSOR\0"));
        assert!(tracker.take_touched());
    }
}
