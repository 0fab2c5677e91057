//! `SHOW IDENTITIES` and `SHOW TENANTS`: the heaviest users and tenants
//! by transaction time over the `[metrics]` window, from the bounded
//! tracker of [`crate::heavy`] (authgres's own: pgbouncer knows no users
//! beyond roles).

use super::Table;
use super::tables::{table, text};
use crate::proto::backend::ColumnType::{BigInt, Text};
use crate::proxy::Proxy;
use crate::usage::IdentityUsage;

/// Rows listed at most: the tracker holds `[metrics] top_identities`.
const MAX_ROWS: usize = 1000;

/// The counting columns every row ends with.
fn counts(usage: &IdentityUsage) -> [Option<String>; 5] {
    [
        text(usage.transactions),
        text(usage.xact_time_us),
        text(usage.avg_xact_us),
        text(usage.error_bound_us),
        text(usage.window_seconds),
    ]
}

const COUNT_COLUMNS: [(&str, crate::proto::backend::ColumnType); 5] = [
    ("transactions", BigInt),
    ("xact_time_us", BigInt),
    ("avg_xact_us", BigInt),
    ("error_bound_us", BigInt),
    ("window_s", BigInt),
];

/// `SHOW IDENTITIES`: the heaviest users, heaviest first.
pub(super) fn identities(proxy: &Proxy) -> Table {
    let rows = proxy
        .metrics
        .top_identities(MAX_ROWS)
        .into_iter()
        .map(|usage| {
            let mut row = vec![
                text(&usage.provider),
                usage.user_id.clone(),
                usage.tenant.clone(),
            ];
            row.extend(counts(&usage));
            row
        })
        .collect();
    let mut columns = vec![("provider", Text), ("user_id", Text), ("tenant", Text)];
    columns.extend(COUNT_COLUMNS);
    table(&columns, rows)
}

/// `SHOW TENANTS`: the heaviest tenants, heaviest first.
pub(super) fn tenants(proxy: &Proxy) -> Table {
    let rows = proxy
        .metrics
        .top_tenants(MAX_ROWS)
        .into_iter()
        .map(|usage| {
            let mut row = vec![text(&usage.provider), usage.tenant.clone()];
            row.extend(counts(&usage));
            row
        })
        .collect();
    let mut columns = vec![("provider", Text), ("tenant", Text)];
    columns.extend(COUNT_COLUMNS);
    table(&columns, rows)
}
