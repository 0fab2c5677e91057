//! Which startup parameters a client may pass to the upstream server.
//!
//! Startup parameters become session defaults, and `RESET` returns a setting
//! to its startup value. A client must therefore not be able to set the
//! identity settings, `role` or `session_authorization` there, nor open a
//! replication connection.

use std::collections::BTreeMap;

use crate::error::SessionError;

/// Settings no client may set at startup: the identity settings and anything
/// that changes who the session is.
fn is_protected(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.starts_with("authgres.")
        || matches!(
            name.as_str(),
            "role" | "session_authorization" | "is_superuser" | "session_preload_libraries"
        )
}

/// Parameters the proxy handles itself and does not forward.
const HANDLED: &[&str] = &["user", "database", "options", "replication"];

/// Picks the parameters forwarded upstream, refusing protected ones,
/// including those inside `options` (`-c name=value` / `--name=value`).
pub fn forwarded_parameters(
    parameters: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, SessionError> {
    if let Some(replication) = parameters.get("replication")
        && !matches!(
            replication.to_ascii_lowercase().as_str(),
            "false" | "off" | "no" | "0"
        )
    {
        return Err(SessionError::Replication);
    }
    let mut forwarded = Vec::new();
    for (name, value) in parameters {
        if HANDLED.contains(&name.as_str()) || name.starts_with("_pq_.") {
            continue;
        }
        if is_protected(name) {
            return Err(SessionError::ForbiddenParameter(name.clone()));
        }
        forwarded.push((name.clone(), value.clone()));
    }
    if let Some(options) = parameters.get("options") {
        for name in option_settings(options) {
            if is_protected(&name) {
                return Err(SessionError::ForbiddenParameter(name));
            }
        }
        forwarded.push(("options".to_owned(), options.clone()));
    }
    Ok(forwarded)
}

/// The forwarded parameters as settings to apply with `set_config` on a
/// pooled connection, `options` broken into its `-c name=value` parts.
pub fn settings(forwarded: &[(String, String)]) -> Vec<(String, String)> {
    let mut settings = Vec::new();
    for (name, value) in forwarded {
        if name == "options" {
            settings.extend(option_assignments(value));
        } else {
            settings.push((name.clone(), value.clone()));
        }
    }
    settings
}

/// Names of the settings an `options` string sets, split the way the server
/// splits it (whitespace, with `\` escaping the next character). Any switch
/// other than `-c` and `--` (`-d`, `-e`, ...) counts by its whole word, so an
/// unknown form cannot hide a protected name.
fn option_settings(options: &str) -> Vec<String> {
    option_words(options)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// The `name=value` settings of an `options` string (`-c name=value`,
/// `-cname=value`, `--name=value`), for applying them with `SET` on a pooled
/// connection. Other switches are left out.
pub fn option_assignments(options: &str) -> Vec<(String, String)> {
    option_words(options)
        .into_iter()
        .filter_map(|(name, value)| Some((name, value?)))
        .collect()
}

/// Each switch of `options` as (setting name, value when it is a setting).
fn option_words(options: &str) -> Vec<(String, Option<String>)> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_ascii_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    let mut settings = Vec::new();
    let mut iter = words.into_iter();
    while let Some(word) = iter.next() {
        let setting = if word == "-c" {
            iter.next()
        } else if let Some(rest) = word.strip_prefix("-c") {
            Some(rest.to_owned())
        } else if let Some(rest) = word.strip_prefix("--") {
            Some(rest.to_owned())
        } else {
            settings.push((word, None));
            continue;
        };
        if let Some(setting) = setting {
            let (name, value) = match setting.split_once('=') {
                Some((name, value)) => (name.replace('-', "_"), Some(value.to_owned())),
                None => (setting.replace('-', "_"), None),
            };
            settings.push((name, value));
        }
    }
    settings
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn forwards_ordinary_parameters() {
        let forwarded = forwarded_parameters(&params(&[
            ("user", "authenticated"),
            ("database", "app"),
            ("application_name", "psql"),
            ("options", "-c statement_timeout=5s"),
        ]))
        .expect("allowed");
        assert_eq!(
            forwarded,
            [
                ("application_name".to_owned(), "psql".to_owned()),
                ("options".to_owned(), "-c statement_timeout=5s".to_owned())
            ]
        );
    }

    #[test]
    fn refuses_identity_and_role_settings() {
        for (name, value) in [
            ("authgres.claims", "{}"),
            ("AUTHGRES.signature", "00"),
            ("role", "postgres"),
            ("session_authorization", "postgres"),
            ("options", "-c role=postgres"),
            ("options", "-crole=postgres"),
            ("options", "--role=postgres"),
            ("options", "-c authgres.claims={}"),
            ("options", "-c\\ x -c session-authorization=postgres"),
            ("options", "--session_authorization=postgres"),
        ] {
            assert!(
                matches!(
                    forwarded_parameters(&params(&[(name, value)])),
                    Err(SessionError::ForbiddenParameter(_))
                ),
                "{name}={value}"
            );
        }
    }

    #[test]
    fn option_assignments_for_pooled_connections() {
        assert_eq!(
            option_assignments("-c statement_timeout=5s -cwork_mem=4MB --search-path=app -d 1"),
            [
                ("statement_timeout".to_owned(), "5s".to_owned()),
                ("work_mem".to_owned(), "4MB".to_owned()),
                ("search_path".to_owned(), "app".to_owned()),
            ]
        );
        assert_eq!(
            option_assignments("-c application_name=a\\ b"),
            [("application_name".to_owned(), "a b".to_owned())]
        );
    }

    #[test]
    fn refuses_replication() {
        for value in ["true", "database", "1"] {
            assert!(matches!(
                forwarded_parameters(&params(&[("replication", value)])),
                Err(SessionError::Replication)
            ));
        }
        assert!(forwarded_parameters(&params(&[("replication", "false")])).is_ok());
    }
}
