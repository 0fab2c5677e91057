//! The running configuration key by key, for the console's `SHOW CONFIG`:
//! every key with the value in force (defaults filled in), its default,
//! and whether a reload changes it. Secrets never appear: the file names
//! only where they are.

use authgres_wire::control::ConfigEntry;

use super::{FileConfig, Loaded, fixed};

impl Loaded {
    /// Every key of the configuration in force, sorted.
    pub fn entries(&self) -> Vec<ConfigEntry> {
        let mut values = Vec::new();
        flatten("", &toml_value(&self.file), &mut values);
        let mut defaults = Vec::new();
        if let Ok(empty) = toml::from_str::<FileConfig>("") {
            flatten("", &toml_value(&empty), &mut defaults);
        }
        let mut entries: Vec<ConfigEntry> = values
            .into_iter()
            .map(|(key, value)| ConfigEntry {
                default: defaults
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
                changeable: fixed::changeable(&key),
                key,
                value,
            })
            .collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        entries
    }
}

/// The file as TOML; a value TOML cannot hold (none today) is left out.
fn toml_value(file: &FileConfig) -> toml::Value {
    toml::Value::try_from(file).unwrap_or_else(|error| {
        tracing::warn!(%error, "the configuration could not be listed");
        toml::Value::Table(toml::Table::new())
    })
}

/// `(key, value)` for every leaf under `value`; tables join keys with
/// dots, arrays of tables index them (`providers.0.issuer`), other arrays
/// stay whole.
fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                flatten(&join(key), value, out);
            }
        }
        toml::Value::Array(items)
            if items.iter().all(toml::Value::is_table) && !items.is_empty() =>
        {
            for (index, item) in items.iter().enumerate() {
                flatten(&join(&index.to_string()), item, out);
            }
        }
        toml::Value::String(text) => out.push((prefix.to_owned(), text.clone())),
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use crate::config::tests::loaded;

    #[test]
    fn keys_show_values_defaults_and_whether_a_reload_changes_them() {
        let config = loaded(
            "[listen]\naddress = \"127.0.0.1:7000\"\n[upstream]\npool_size = 7\n\
             [roles.authenticated]\npassword_env = \"PW\"\n\
             [[providers]]\nname = \"a\"\nissuer = \"https://id.example/\"\n\
             jwks_url = \"https://id.example/jwks\"\n",
        );
        let entries = config.entries();
        let entry = |key: &str| {
            entries
                .iter()
                .find(|e| e.key == key)
                .unwrap_or_else(|| panic!("{key} listed"))
        };
        let address = entry("listen.address");
        assert_eq!(
            (
                address.value.as_str(),
                address.default.as_str(),
                address.changeable
            ),
            ("127.0.0.1:7000", "127.0.0.1:6432", false)
        );
        let pool = entry("upstream.pool_size");
        assert_eq!((pool.value.as_str(), pool.changeable), ("7", true));
        assert_eq!(entry("roles.authenticated.password_env").value, "PW");
        assert_eq!(entry("providers.0.issuer").value, "https://id.example/");
        assert!(entries.iter().all(|e| !e.key.is_empty()));
    }
}
