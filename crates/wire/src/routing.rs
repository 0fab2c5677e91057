//! Where an admitted client's connections go: `[databases]` entries name
//! a server and a database for a name clients connect to, and may send
//! each tenant (a provider's `tenant_claim`) to a database of its own,
//! by an explicit map or a `{tenant}` template.
//!
//! A name without an entry goes to the `[upstream]` server's database of
//! that name. An entry that only a tenant map leads to is not served
//! under its own name: a client of one tenant cannot name another
//! tenant's database and land in it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::upstream::UpstreamConfig;

/// Longest database name Postgres keeps (NAMEDATALEN - 1).
const MAX_DATABASE_NAME: usize = 63;

/// A `[databases]` entry: a name clients connect to, and where it leads.
#[derive(Debug, Clone)]
pub struct DatabaseRoute {
    /// The server; `None`: the `[upstream]` one.
    pub server: Option<Arc<UpstreamConfig>>,
    /// The database on that server.
    pub dbname: DatabaseName,
    /// Tenants sent to other entries (tenant → entry name). When not
    /// empty, a tenant missing from it is refused.
    pub tenants: HashMap<String, String>,
    /// Whether clients may connect to it by name (false for an entry
    /// only `tenants` maps lead to).
    pub direct: bool,
}

/// The database an entry leads to on its server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseName {
    /// Always this one.
    Fixed(String),
    /// `before{tenant}after`: one database per tenant.
    PerTenant {
        /// Text before `{tenant}`.
        before: String,
        /// Text after it.
        after: String,
    },
}

impl DatabaseName {
    /// Parses a configured `dbname`: `{tenant}` at most once.
    pub fn parse(text: &str) -> Result<Self, String> {
        const MARK: &str = "{tenant}";
        match text.split_once(MARK) {
            None if text.contains(['{', '}']) => Err(format!(
                "dbname {text:?}: the only placeholder is {{tenant}}"
            )),
            None => Ok(Self::Fixed(text.to_owned())),
            Some((_, after)) if after.contains(MARK) => {
                Err(format!("dbname {text:?}: {{tenant}} may appear once"))
            }
            Some((before, after)) => Ok(Self::PerTenant {
                before: before.to_owned(),
                after: after.to_owned(),
            }),
        }
    }
}

impl std::fmt::Display for DatabaseName {
    /// As configured: `app_{tenant}` for a template.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Fixed(name) => f.write_str(name),
            Self::PerTenant { before, after } => write!(f, "{before}{{tenant}}{after}"),
        }
    }
}

/// Where an admitted client's connections go.
#[derive(Debug, Clone, Default)]
pub struct Destination {
    /// The server; `None`: the `[upstream]` one.
    pub server: Option<Arc<UpstreamConfig>>,
    /// The `[databases]` entry that chose it, if one did: its pool mode
    /// applies.
    pub entry: Option<String>,
}

/// Why a client has no database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoRoute {
    /// The entry is reached only through a tenant map.
    #[error("database {database:?} is not served by this proxy")]
    NotServed {
        /// The name the client connected to.
        database: String,
    },
    /// The database is chosen by tenant and the client has none (an
    /// anonymous login, or a token without the provider's tenant claim).
    #[error("database {database:?} is chosen by the token's tenant, and the login has none")]
    NoTenant {
        /// The name the client connected to.
        database: String,
    },
    /// The tenant is not in the entry's map, or cannot name a database.
    #[error("the token's tenant has no database behind {database:?}")]
    UnknownTenant {
        /// The name the client connected to.
        database: String,
    },
}

/// Resolves `requested` (a served name) for a client of `tenant`: the
/// database on the server, and where that server is.
pub fn route(
    routes: &HashMap<String, DatabaseRoute>,
    requested: &str,
    tenant: Option<&str>,
) -> Result<(String, Destination), NoRoute> {
    let Some(entry) = routes.get(requested) else {
        return Ok((requested.to_owned(), Destination::default()));
    };
    if !entry.direct {
        return Err(NoRoute::NotServed {
            database: requested.to_owned(),
        });
    }
    let no_tenant = || NoRoute::NoTenant {
        database: requested.to_owned(),
    };
    let unknown = || NoRoute::UnknownTenant {
        database: requested.to_owned(),
    };
    let (name, entry) = if entry.tenants.is_empty() {
        (requested, entry)
    } else {
        let tenant = tenant.ok_or_else(no_tenant)?;
        let name = entry.tenants.get(tenant).ok_or_else(unknown)?;
        // Config validation makes every target exist.
        (name.as_str(), routes.get(name).ok_or_else(unknown)?)
    };
    let database = match &entry.dbname {
        DatabaseName::Fixed(database) => database.clone(),
        DatabaseName::PerTenant { before, after } => {
            let tenant = tenant.ok_or_else(no_tenant)?;
            let database = format!("{before}{tenant}{after}");
            if !tenant_names_database(tenant) || database.len() > MAX_DATABASE_NAME {
                return Err(unknown());
            }
            database
        }
    };
    Ok((
        database,
        Destination {
            server: entry.server.clone(),
            entry: Some(name.to_owned()),
        },
    ))
}

/// Whether `tenant` may be put into a database name: letters, digits,
/// `_` and `-` only, so no tenant value reaches a name another
/// tenant's could, or one the operator did not mean.
fn tenant_names_database(tenant: &str) -> bool {
    !tenant.is_empty()
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dbname: &str, tenants: &[(&str, &str)], direct: bool) -> DatabaseRoute {
        DatabaseRoute {
            server: None,
            dbname: DatabaseName::parse(dbname).expect("dbname"),
            tenants: tenants
                .iter()
                .map(|(t, e)| ((*t).to_owned(), (*e).to_owned()))
                .collect(),
            direct,
        }
    }

    fn routes() -> HashMap<String, DatabaseRoute> {
        [
            ("app", entry("app_{tenant}", &[], true)),
            ("b2b", entry("unused", &[("org_a", "acme")], true)),
            ("acme", entry("acme_db", &[], false)),
            ("reports", entry("warehouse", &[], true)),
        ]
        .into_iter()
        .map(|(name, e)| (name.to_owned(), e))
        .collect()
    }

    fn database(requested: &str, tenant: Option<&str>) -> Result<String, NoRoute> {
        route(&routes(), requested, tenant).map(|(database, _)| database)
    }

    #[test]
    fn names_map_templates_fill_and_maps_send_tenants_elsewhere() {
        assert_eq!(database("other", None), Ok("other".into()));
        assert_eq!(database("reports", None), Ok("warehouse".into()));
        assert_eq!(database("app", Some("org_1")), Ok("app_org_1".into()));
        assert_eq!(database("b2b", Some("org_a")), Ok("acme_db".into()));
        let (_, destination) = route(&routes(), "b2b", Some("org_a")).expect("routed");
        assert_eq!(destination.entry.as_deref(), Some("acme"));
    }

    #[test]
    fn no_tenant_an_unknown_one_or_one_that_cannot_name_a_database_is_refused() {
        assert!(matches!(
            database("app", None),
            Err(NoRoute::NoTenant { .. })
        ));
        // Another tenant's database is not reachable by its entry's name.
        assert!(matches!(
            database("acme", Some("org_b")),
            Err(NoRoute::NotServed { .. })
        ));
        assert!(matches!(
            database("b2b", None),
            Err(NoRoute::NoTenant { .. })
        ));
        assert!(matches!(
            database("b2b", Some("org_b")),
            Err(NoRoute::UnknownTenant { .. })
        ));
        for odd in ["a b", "x\"y", "../", "é", "a.b", &"x".repeat(60)] {
            assert!(
                matches!(
                    database("app", Some(odd)),
                    Err(NoRoute::UnknownTenant { .. })
                ),
                "{odd:?}"
            );
        }
    }

    #[test]
    fn dbname_placeholders_parse_once() {
        assert!(DatabaseName::parse("t_{tenant}_{tenant}").is_err());
        assert!(DatabaseName::parse("t_{org}").is_err());
        assert_eq!(
            DatabaseName::parse("{tenant}"),
            Ok(DatabaseName::PerTenant {
                before: String::new(),
                after: String::new()
            })
        );
    }
}
