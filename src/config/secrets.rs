//! The secrets file (`KEY=VALUE` lines), overridden by the environment.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// Secrets from the environment and the optional secrets file.
pub struct Secrets {
    pub(super) file: Option<PathBuf>,
    pub(super) values: HashMap<String, String>,
}

impl Secrets {
    pub(super) fn load(file: Option<PathBuf>) -> anyhow::Result<Self> {
        let mut values = HashMap::new();
        if let Some(path) = &file
            && path.exists()
        {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading secrets file {}", path.display()))?;
            values = parse_env_file(&text);
        }
        Ok(Self { file, values })
    }

    /// The secret `name`: the environment wins over the file.
    pub fn get(&self, name: &str) -> Option<String> {
        std::env::var(name)
            .ok()
            .filter(|v| !v.is_empty())
            .or_else(|| self.values.get(name).cloned())
    }

    /// The secrets file, if configured.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

/// Parses `KEY=VALUE` lines; `#` comments, blank lines and `export ` allowed.
pub fn parse_env_file(text: &str) -> HashMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}
