//! The SHOW commands' result sets, built from the proxy's state at the
//! moment of asking. Column names are pgbouncer's where they mean the
//! same; columns pgbouncer has that authgres cannot fill truthfully are
//! left out rather than shown as zeros, and authgres's own (the transport,
//! the token's provider and subject, the pool) come after pgbouncer's.

use std::collections::HashMap;
use std::time::SystemTime;

use super::Table;
use crate::clients::{ClientInfo, ClientState};
use crate::control::ConfigEntry;
use crate::pool::ServerInfo;
use crate::proto::backend::ColumnType::{self, BigInt, Text};
use crate::proxy::Proxy;

/// A table from its columns and rows.
pub(super) fn table(
    columns: &[(&'static str, ColumnType)],
    rows: Vec<Vec<Option<String>>>,
) -> Table {
    Table {
        columns: columns.to_vec(),
        rows,
    }
}

pub(super) fn text(value: impl ToString) -> Option<String> {
    Some(value.to_string())
}

/// A moment as pgbouncer shows it, in UTC.
fn time(at: SystemTime) -> Option<String> {
    Some(humantime::format_rfc3339_seconds(at).to_string())
}

/// `SHOW HELP`.
pub(super) fn help() -> Table {
    let commands = [
        "SHOW HELP|POOLS|CLIENTS|SERVERS|STATS|CONFIG|VERSION|DATABASES|USERS|LISTS",
        "SHOW IDENTITIES  the heaviest users by transaction time ([metrics] top_window)",
        "SHOW TENANTS     the heaviest tenants by transaction time",
        "PAUSE [db]       new transactions wait; returns when running ones finished",
        "RESUME [db]",
        "RECONNECT [db]   replace every server connection as it comes free",
        "WAIT_CLOSE [db]  wait until the connections RECONNECT retired are closed",
        "DISABLE db       refuse new logins to db",
        "ENABLE db",
        "KILL_CLIENT id   close one client connection now (id from SHOW CLIENTS)",
        "RELOAD           read proxy.toml and the secrets again",
        "SHUTDOWN         drain and exit, as SIGTERM",
    ];
    let rows = commands.iter().map(|c| vec![text(c)]).collect();
    table(&[("command", Text)], rows)
}

/// `SHOW VERSION`.
pub(super) fn version() -> Table {
    let version = format!("authgres {}", env!("CARGO_PKG_VERSION"));
    table(&[("version", Text)], vec![vec![Some(version)]])
}

/// Logged-in clients by (database, role), and how many of them wait.
fn client_counts(clients: &[ClientInfo]) -> HashMap<(String, String), (usize, usize)> {
    let mut counts: HashMap<(String, String), (usize, usize)> = HashMap::new();
    for client in clients {
        if let Some(login) = &client.login {
            let entry = counts
                .entry((login.database.clone(), login.role.clone()))
                .or_default();
            match client.state {
                ClientState::Waiting => entry.1 += 1,
                _ => entry.0 += 1,
            }
        }
    }
    counts
}

/// `SHOW POOLS`: each (database, role) of each pool.
pub(super) fn pools(proxy: &Proxy) -> Table {
    let clients = client_counts(&proxy.clients.snapshot());
    let settings = proxy.settings();
    let mut rows = Vec::new();
    for pool in proxy.pools() {
        for slot in pool.snapshot().slots {
            let key = (slot.database.clone(), slot.role.clone());
            let (active, _) = clients.get(&key).copied().unwrap_or_default();
            let mode = if pool.name() == "http" {
                "transaction"
            } else {
                settings.config.pool_mode_for(&slot.database).label()
            };
            rows.push(vec![
                text(&slot.database),
                text(&slot.role),
                text(if pool.name() == "http" { 0 } else { active }),
                text(slot.waiting),
                text(slot.in_use),
                text(slot.idle),
                text(mode),
                text(pool.name()),
                text(slot.size),
            ]);
        }
    }
    let columns = [
        ("database", Text),
        ("user", Text),
        ("cl_active", BigInt),
        ("cl_waiting", BigInt),
        ("sv_active", BigInt),
        ("sv_idle", BigInt),
        ("pool_mode", Text),
        ("pool", Text),
        ("pool_size", BigInt),
    ];
    table(&columns, rows)
}

/// Backend pids by the pool id of the client holding them.
fn links(proxy: &Proxy) -> (Vec<ServerInfo>, HashMap<u64, i32>) {
    let servers: Vec<ServerInfo> = proxy.pools().iter().flat_map(|p| p.servers()).collect();
    let by_client = servers
        .iter()
        .filter_map(|s| Some((s.client?, s.pid)))
        .collect();
    (servers, by_client)
}

/// `SHOW CLIENTS`: each client connection.
pub(super) fn clients(proxy: &Proxy) -> Table {
    let (_, links) = links(proxy);
    let rows = proxy
        .clients
        .snapshot()
        .into_iter()
        .map(|client| {
            let login = client.login.as_ref();
            let link = login.and_then(|l| links.get(&l.pool_client));
            vec![
                text("C"),
                login.map(|l| l.role.clone()),
                login.map(|l| l.database.clone()),
                text(client.state.label()),
                text(client.peer.ip()),
                text(client.peer.port()),
                time(client.connected),
                link.map(ToString::to_string),
                text(if login.is_some_and(|l| l.tls) {
                    "TLS"
                } else {
                    ""
                }),
                login.and_then(|l| l.application_name.clone()),
                text(client.id),
                text(client.transport),
                login.and_then(|l| l.provider.clone()),
                login.and_then(|l| l.subject.clone()),
            ]
        })
        .collect();
    let columns = [
        ("type", Text),
        ("user", Text),
        ("database", Text),
        ("state", Text),
        ("addr", Text),
        ("port", BigInt),
        ("connect_time", Text),
        ("link", BigInt),
        ("tls", Text),
        ("application_name", Text),
        ("id", BigInt),
        ("transport", Text),
        ("provider", Text),
        ("sub", Text),
    ];
    table(&columns, rows)
}

/// `SHOW SERVERS`: each server connection, with the client using it.
pub(super) fn servers(proxy: &Proxy) -> Table {
    let (servers, _) = links(proxy);
    let client_ids: HashMap<u64, u64> = proxy
        .clients
        .snapshot()
        .into_iter()
        .filter_map(|c| Some((c.login?.pool_client, c.id)))
        .collect();
    let rows = servers
        .into_iter()
        .map(|server| {
            let (addr, port) = server
                .addr
                .rsplit_once(':')
                .unwrap_or((server.addr.as_str(), ""));
            let link = server.client.and_then(|c| client_ids.get(&c));
            vec![
                text("S"),
                text(&server.role),
                text(&server.database),
                text(server.state),
                text(addr),
                text(port),
                time(server.connected),
                time(server.since),
                link.map(ToString::to_string),
                text(server.pid),
                text(if server.tls { "TLS" } else { "" }),
                text(server.pool),
            ]
        })
        .collect();
    let columns = [
        ("type", Text),
        ("user", Text),
        ("database", Text),
        ("state", Text),
        ("addr", Text),
        ("port", BigInt),
        ("connect_time", Text),
        ("request_time", Text),
        ("link", BigInt),
        ("remote_pid", BigInt),
        ("tls", Text),
        ("pool", Text),
    ];
    table(&columns, rows)
}

/// `SHOW STATS`: totals since start by database and role.
pub(super) fn stats(proxy: &Proxy) -> Table {
    let uptime = proxy
        .started
        .elapsed()
        .map_or(1, |age| age.as_secs().max(1));
    let rows = proxy
        .metrics
        .stats()
        .into_iter()
        .map(|s| {
            let per_second = |total: u64| text(total / uptime);
            let average = |total: u64, count: u64| text(total.checked_div(count).unwrap_or(0));
            vec![
                text(&s.database),
                text(&s.role),
                text(s.xact_count),
                text(s.query_count),
                text(s.received),
                text(s.sent),
                text(s.xact_time_us),
                text(s.query_time_us),
                text(s.wait_time_us),
                per_second(s.xact_count),
                per_second(s.query_count),
                per_second(s.received),
                per_second(s.sent),
                average(s.xact_time_us, s.xact_count),
                average(s.query_time_us, s.query_count),
            ]
        })
        .collect();
    let columns = [
        ("database", Text),
        ("user", Text),
        ("total_xact_count", BigInt),
        ("total_query_count", BigInt),
        ("total_received", BigInt),
        ("total_sent", BigInt),
        ("total_xact_time", BigInt),
        ("total_query_time", BigInt),
        ("total_wait_time", BigInt),
        ("avg_xact_count", BigInt),
        ("avg_query_count", BigInt),
        ("avg_recv", BigInt),
        ("avg_sent", BigInt),
        ("avg_xact_time", BigInt),
        ("avg_query_time", BigInt),
    ];
    table(&columns, rows)
}

/// `SHOW CONFIG`: the running configuration.
pub(super) fn config(entries: Vec<ConfigEntry>) -> Table {
    let rows = entries
        .into_iter()
        .map(|e| {
            let changeable = if e.changeable { "yes" } else { "no" };
            vec![
                text(e.key),
                text(e.value),
                text(e.default),
                text(changeable),
            ]
        })
        .collect();
    let columns = [
        ("key", Text),
        ("value", Text),
        ("default", Text),
        ("changeable", Text),
    ];
    table(&columns, rows)
}

/// The databases to list: those configured, or (when any is served)
/// those with a pool.
fn databases_known(proxy: &Proxy) -> Vec<String> {
    let configured = proxy.settings().config.admission.databases.clone();
    if !configured.is_empty() {
        return configured;
    }
    let mut seen: Vec<String> = proxy
        .pools()
        .iter()
        .flat_map(|p| p.snapshot().slots)
        .map(|s| s.database)
        .collect();
    seen.sort();
    seen.dedup();
    seen
}

/// `SHOW DATABASES`: each database served.
pub(super) fn databases(proxy: &Proxy) -> Table {
    let settings = proxy.settings();
    let config = &settings.config;
    let servers: Vec<ServerInfo> = proxy.pools().iter().flat_map(|p| p.servers()).collect();
    let flag = |on: bool| text(i32::from(on));
    let row = |name: &str, host: &str, port: u16, database: String| {
        let current = servers.iter().filter(|s| s.database == database).count();
        vec![
            text(name),
            text(host),
            text(port),
            text(&database),
            text(config.pool_limits.max_per_key),
            text(config.pool_mode_for(name).label()),
            text(current),
            flag(proxy.gates.is_paused(&database)),
            flag(proxy.gates.is_disabled(&database)),
        ]
    };
    let (host, port) = (&config.upstream.host, config.upstream.port);
    let mut rows: Vec<_> = databases_known(proxy)
        .into_iter()
        .map(|name| row(&name, host, port, name.clone()))
        .collect();
    // `[databases]` entries: a template or a map shows as written.
    let mut routes: Vec<_> = config.admission.routes.iter().collect();
    routes.sort_by_key(|(name, _)| *name);
    for (name, route) in routes {
        let server = route.server.as_deref().unwrap_or(&config.upstream);
        let database = if route.tenants.is_empty() {
            route.dbname.to_string()
        } else {
            "(by tenant)".to_owned()
        };
        rows.push(row(name, &server.host, server.port, database));
    }
    let columns = [
        ("name", Text),
        ("host", Text),
        ("port", BigInt),
        ("database", Text),
        ("pool_size", BigInt),
        ("pool_mode", Text),
        ("current_connections", BigInt),
        ("paused", BigInt),
        ("disabled", BigInt),
    ];
    table(&columns, rows)
}

/// `SHOW USERS`: each role served.
pub(super) fn users(proxy: &Proxy) -> Table {
    let settings = proxy.settings();
    let clients = proxy.clients.snapshot();
    let mut names: Vec<&String> = settings.config.admission.roles.keys().collect();
    names.sort();
    let rows = names
        .into_iter()
        .map(|name| {
            let role = &settings.config.admission.roles[name];
            let connected = clients
                .iter()
                .filter(|c| c.login.as_ref().is_some_and(|l| &l.role == name))
                .count();
            let login = if role.requires_token { "token" } else { "none" };
            vec![text(name), text(login), text(connected)]
        })
        .collect();
    let columns = [
        ("name", Text),
        ("login", Text),
        ("current_client_connections", BigInt),
    ];
    table(&columns, rows)
}

/// `SHOW LISTS`: how many of each thing the proxy holds.
pub(super) fn lists(proxy: &Proxy) -> Table {
    let settings = proxy.settings();
    let pools = proxy.pools();
    let slots: usize = pools.iter().map(|p| p.snapshot().slots.len()).sum();
    let servers: usize = pools.iter().map(|p| p.servers().len()).sum();
    let clients = proxy.clients.snapshot().len();
    let items = [
        ("databases", databases_known(proxy).len()),
        ("users", settings.config.admission.roles.len()),
        ("pools", slots),
        ("used_clients", clients),
        ("used_servers", servers),
    ];
    let rows = items
        .into_iter()
        .map(|(list, n)| vec![text(list), text(n)])
        .collect();
    table(&[("list", Text), ("items", BigInt)], rows)
}
