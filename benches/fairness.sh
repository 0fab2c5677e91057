#!/usr/bin/env bash
# Fair turns in a saturated pool (issue 25): one user (one `sub`) runs
# pgbench with 50 clients against a transaction pool of 10 connections
# while a second user runs one client; prints the second user's latency
# (mean, p50, p99) alone and under that load, and the ratio of the means
# (the issue's goal: within 2x). The same through pgbouncer, one pool of
# 10 shared in arrival order, is the reference that queues the second user
# behind the first's backlog.
#
#   benches/fairness.sh [seconds] [heavy clients] [pool size] [transaction]
#     transaction: the SQL of every transaction, both users (default
#                  "select pg_sleep(0.002)": each holds its connection 2 ms,
#                  so 50 clients keep 10 connections busy without saturating
#                  two CPU cores; "select 1" measures CPU contention instead)
#
# Builds the release binary; needs pgbench (and pgbouncer for the
# reference: Debian's packages).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
heavy=${2:-50}
pool=${3:-10}
sql=${4:-select pg_sleep(0.002)}
bin=target/release/authgres
cargo build --release --quiet
command -v pgbench >/dev/null || { echo "pgbench is missing: apt-get install postgresql-client" >&2; exit 1; }
pgbouncer=$(command -v pgbouncer || { [ -x /usr/sbin/pgbouncer ] && echo /usr/sbin/pgbouncer; } || true)

# shellcheck source=benches/lib/demo.sh
. "$(dirname "$0")/lib/demo.sh"

# authgres from the demo's configuration: transaction pooling, `pool`
# connections, a checkout timeout no waiter reaches.
fair_port=$(free_port)
derived_config "$work/state/proxy-fair.toml" "$fair_port" \
    "pool_mode = \"transaction\"
pool_size = $pool
checkout_timeout = \"60s\""
AUTHGRES_LOG=warn "$bin" serve --config "$work/state/proxy-fair.toml" >"$work/fair.out" 2>&1 &
fair=$!
extra_pids+=("$fair")

if [ -n "$pgbouncer" ]; then
    start_pgbouncer "app = host=127.0.0.1 port=$pg_port dbname=app" \
        "pool_mode = transaction
default_pool_size = $pool
max_client_conn = 1000
query_wait_timeout = 60"
fi
sleep 1
echo "$sql;" >"$work/tx.sql"

pgbench_run() { # port password log-prefix args...
    local port=$1 password=$2 prefix=$3; shift 3
    (cd "$work" && PGSSLMODE=disable PGPASSWORD=$password pgbench -n -h 127.0.0.1 -p "$port" \
        -U authenticated -f "$work/tx.sql" -l --log-prefix="$prefix" "$@" app 2>&1)
}
# Mean, p50 and p99 latency (ms) of the transactions logged under a prefix.
latency() {
    python3 - "$work" "$1" <<'PY'
import glob, statistics, sys
lat = []
for name in glob.glob(f"{sys.argv[1]}/{sys.argv[2]}.*"):
    for line in open(name):
        fields = line.split()
        if len(fields) > 2 and fields[2].isdigit():
            lat.append(int(fields[2]) / 1000)
lat.sort()
if not lat:
    print("fail fail fail 0")
else:
    print(f"{statistics.fmean(lat):.3f} {lat[len(lat) // 2]:.3f} {lat[int(len(lat) * 0.99)]:.3f} {len(lat)}")
PY
}
measure() { # name port heavy-password light-password
    local name=$1 port=$2 heavy_pw=$3 light_pw=$4 alone loaded heavy_out
    pgbench_run "$port" "$light_pw" "$name-alone" -c 1 -T "$seconds" >/dev/null
    alone=$(latency "$name-alone")
    pgbench_run "$port" "$heavy_pw" "$name-heavy" -c "$heavy" -j 2 -T $((seconds + 2)) >"$work/$name-heavy.out" &
    local load=$!
    sleep 1
    pgbench_run "$port" "$light_pw" "$name-loaded" -c 1 -T "$seconds" >/dev/null
    wait "$load" || true
    loaded=$(latency "$name-loaded")
    heavy_out=$(latency "$name-heavy")
    read -r a_mean a_p50 a_p99 a_n <<<"$alone"
    read -r l_mean l_p50 l_p99 l_n <<<"$loaded"
    read -r h_mean _ _ h_n <<<"$heavy_out"
    printf "%-10s %12s %12s %12s %14s %14s %14s %8s %14s\n" "$name" "$a_mean" "$a_p50" "$a_p99" \
        "$l_mean" "$l_p50" "$l_p99" \
        "$(python3 -c "import sys; a, b = sys.argv[1:]; print(f'{float(b) / float(a):.2f}x' if 'fail' not in (a, b) else '-')" "$a_mean" "$l_mean")" \
        "$h_mean ($h_n)"
}
echo "machine: $(nproc) cores; ${seconds}s per run; pool of $pool; heavy user: $heavy clients; transaction: $sql"
echo "second user's latency in ms, alone and while the heavy user runs; heavy user's mean (transactions)"
printf "%-10s %12s %12s %12s %14s %14s %14s %8s %14s\n" target "alone mean" "alone p50" "alone p99" \
    "loaded mean" "loaded p50" "loaded p99" ratio "heavy mean"
measure authgres "$fair_port" "$AUTHGRES_TOKEN_A" "$AUTHGRES_TOKEN_B"
if [ -n "${bouncer:-}" ]; then
    measure pgbouncer "$bouncer_port" "$role_password" "$role_password"
fi
