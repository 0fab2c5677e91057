//! `[audit]`: the audit log by identity (opt-in), and where it goes.

use std::path::PathBuf;

use anyhow::bail;
use authgres_wire::audit::{AuditConfig, Output, Per, Statements, defaults};
use serde::{Deserialize, Serialize};

use super::Loaded;

/// `[audit]`: absent (or `enabled = false`), nothing is logged.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditSection {
    /// The section's presence turns the log on; `false` keeps the keys
    /// and turns it off.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// A line per `transaction` or per `statement`.
    #[serde(default = "per")]
    pub per: Per,
    /// `off`, `normalized` or `full`.
    #[serde(default = "statements")]
    pub statements: Statements,
    /// The most statement text one line carries, in bytes.
    #[serde(default = "max_statement_bytes")]
    pub max_statement_bytes: usize,
    /// `stdout`, or a file path (relative to the config's directory).
    #[serde(default = "output")]
    pub output: String,
    /// Lines waiting for the writer before new ones are dropped (and
    /// counted); fixed until a restart.
    #[serde(default = "queue")]
    pub queue: usize,
}

fn yes() -> bool {
    true
}
fn per() -> Per {
    Per::Transaction
}
fn statements() -> Statements {
    Statements::Off
}
fn max_statement_bytes() -> usize {
    defaults::MAX_STATEMENT_BYTES
}
fn output() -> String {
    "stdout".to_owned()
}
fn queue() -> usize {
    defaults::QUEUE
}

impl Loaded {
    /// `[audit]`, checked: `None` when absent or disabled.
    pub(super) fn audit(&self) -> anyhow::Result<Option<AuditConfig>> {
        let Some(section) = self.file.audit.as_ref().filter(|a| a.enabled) else {
            return Ok(None);
        };
        if section.queue == 0 {
            bail!("[audit] queue must be at least 1");
        }
        if section.max_statement_bytes == 0 && section.statements != Statements::Off {
            bail!("[audit] max_statement_bytes must be above 0 when statements are logged");
        }
        let output = match section.output.as_str() {
            "" => bail!("[audit] output must be \"stdout\" or a file path"),
            "stdout" => Output::Stdout,
            path => {
                let path: PathBuf = self.path(path.as_ref());
                let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
                if let Some(parent) = parent
                    && !parent.is_dir()
                {
                    bail!(
                        "[audit] output {}: the directory {} does not exist",
                        path.display(),
                        parent.display()
                    );
                }
                Output::File(path)
            }
        };
        Ok(Some(AuditConfig {
            per: section.per,
            statements: section.statements,
            max_statement_bytes: section.max_statement_bytes,
            output,
            queue: section.queue,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::loaded;
    use super::*;

    #[test]
    fn the_section_turns_the_log_on_with_safe_defaults() {
        assert_eq!(loaded("").audit().expect("valid"), None);
        let on = loaded("[audit]\n").audit().expect("valid").expect("on");
        assert_eq!(
            on,
            AuditConfig {
                per: Per::Transaction,
                statements: Statements::Off,
                max_statement_bytes: defaults::MAX_STATEMENT_BYTES,
                output: Output::Stdout,
                queue: defaults::QUEUE,
            }
        );
        let off = loaded("[audit]\nenabled = false\nstatements = \"full\"\n");
        assert_eq!(off.audit().expect("valid"), None);
        let file = loaded(
            "[audit]\nper = \"statement\"\nstatements = \"normalized\"\noutput = \"a.log\"\n",
        )
        .audit()
        .expect("valid")
        .expect("on");
        assert_eq!(file.per, Per::Statement);
        assert_eq!(file.statements, Statements::Normalized);
        assert_eq!(file.output, Output::File(PathBuf::from("./a.log")));
    }

    #[test]
    fn mistakes_are_named() {
        let error = loaded("[audit]\noutput = \"/no/such/dir/a.log\"\n")
            .audit()
            .expect_err("refused");
        assert!(error.to_string().contains("does not exist"), "{error}");
        assert!(toml::from_str::<super::super::FileConfig>("[audit]\nper = \"row\"\n").is_err());
        let error = loaded("[audit]\nqueue = 0\n").audit().expect_err("refused");
        assert!(error.to_string().contains("queue"), "{error}");
    }
}
