#!/usr/bin/env bash
# Requests per second for an authenticated single-row select through
# authgres: over HTTP keep-alive (/sql, as the Neon driver sends it, with
# wrk) and over TCP (pgbench, persistent connections, extended protocol),
# on loopback, at the same concurrency; then /sql's rate as a ratio of the
# TCP path's.
#
#   benches/http_load.sh [connections] [seconds]
#
# Like with like: both sides in plaintext (the demo's listener would
# otherwise give pgbench TLS that /sql does not pay for), each load
# generator with two threads, and the TCP side in transaction pooling, the
# mode a serverless request implies (session pooling is printed too). Each
# /sql request is a client of its own, all presenting the same token: the
# next request takes a connection as the last one left it, with no reset
# (as the TCP clients here, each finding its own backend free, do). Each
# phase also prints the proxy's and the
# server's CPU per request (utime + stime from /proc; the server's over its
# processes alive at the phase's end and those it reaped), figures
# that hold still when other work shares the cores. With a single-threaded
# proxy (--threads, 1 on 2 cores) and the cores shared, the proxy's CPU per
# request is what the two rates' ratio follows.
#
# Needs: a release build (cargo build --release), wrk and pgbench.
set -euo pipefail
cd "$(dirname "$0")/.."
connections=${1:-32}
seconds=${2:-10}
bin=target/release/authgres
[ -x "$bin" ] || cargo build --release
command -v wrk >/dev/null || { echo "wrk is missing: apt-get install wrk" >&2; exit 1; }
command -v pgbench >/dev/null || { echo "pgbench is missing: apt-get install postgresql-client" >&2; exit 1; }

# shellcheck source=benches/lib/demo.sh
. benches/lib/demo.sh
PGPASSWORD=$AUTHGRES_TOKEN_A psql -qX -c "insert into todos (task) values ('load')" >/dev/null
postmaster=$(pgrep -P "$demo" -x postgres)

# The same proxy in transaction pooling, beside the demo.
tx_port=$(free_port)
derived_config "$work/state/proxy-txn.toml" "$tx_port" 'pool_mode = "transaction"'
AUTHGRES_LOG=warn "$bin" serve --config "$work/state/proxy-txn.toml" >"$work/txn.out" 2>&1 &
transaction=$!
extra_pids+=("$transaction")
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$tx_port") 2>/dev/null && break; sleep 0.1; done

cat >"$work/sql.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"query":"select * from todos where user_id = auth.user_id()","params":[]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $AUTHGRES_TOKEN_A"
wrk.headers["Neon-Connection-String"] = "postgresql://authenticated@$PGHOST:$PGPORT/$PGDATABASE"
wrk.headers["Neon-Raw-Text-Output"] = "true"
wrk.headers["Neon-Array-Mode"] = "true"
LUA
echo "select * from todos where user_id = auth.user_id();" >"$work/select.sql"

ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || true; }
server_ticks() { # "pid ticks" of the server's processes, by pid
    # The postmaster's with its reaped children's: wrk's hanging up at its
    # end ends the requests in flight, and with them their backends.
    awk -v pid="$postmaster" '{print pid, $14 + $15 + $16 + $17}' "/proc/$postmaster/stat"
    for pid in $(pgrep -P "$postmaster"); do
        t=$(ticks "$pid")
        # Gone since pgrep saw it (a backend of a request wrk abandoned):
        # not a failure, which `[ ] &&` would make the loop's status.
        if [ -n "$t" ]; then echo "$pid $t"; fi
    done | sort
}
# Runs a load ($2...) against the proxy $1; prints its rate, and the
# proxy's and the server's CPU per request.
phase() { # proxy-pid command...
    local proxy=$1
    shift
    local p0 p1 count rate hz
    hz=$(getconf CLK_TCK)
    p0=$(ticks "$proxy")
    server_ticks >"$work/server.0"
    "$@" >"$work/phase.out" 2>&1
    p1=$(ticks "$proxy")
    server_ticks >"$work/server.1"
    grep -E "Latency |Non-2xx|latency average|failed" "$work/phase.out" || true
    count=$(grep -oE "^ *[0-9]+ requests in|actually processed: [0-9]+" "$work/phase.out" | grep -oE "[0-9]+" | head -1 || true)
    rate=$(grep -E "Requests/sec|^tps" "$work/phase.out" | grep -oE "[0-9]+\.[0-9]+" | head -1 || true)
    if [ -z "$count" ] || [ -z "$rate" ]; then
        echo "no rate from $1:" >&2
        cat "$work/phase.out" >&2
        exit 1
    fi
    join -a 1 -a 2 -e 0 -o 0,1.2,2.2 "$work/server.0" "$work/server.1" | awk -v n="$count" -v p=$((p1 - p0)) -v hz="$hz" -v rate="$rate" \
        '{s += $3 - $2} END {printf "%.0f req/s; CPU per request: proxy %.0f µs, server %.0f µs\n", rate, p * 1e6 / hz / n, s * 1e6 / hz / n}' |
        tee -a "$work/rates"
}

echo "machine: $(nproc) cores; $connections connections; ${seconds}s each"
echo "--- HTTP /sql (wrk, keep-alive)"
# Fills the pool first: pgbench leaves its connections' logins out of its
# rate too.
wrk -t2 -c"$connections" -d2s -s "$work/sql.lua" "$AUTHGRES_HTTP_URL" >"$work/warm.out" 2>&1 ||
    { cat "$work/warm.out" "$work/demo.out" >&2; exit 1; }
phase "$demo" wrk -t2 -c"$connections" -d"${seconds}s" -s "$work/sql.lua" "$AUTHGRES_HTTP_URL"
pgbench_run() { # port
    PGSSLMODE=disable PGPORT=$1 PGPASSWORD=$AUTHGRES_TOKEN_A pgbench -n -M extended -c "$connections" -j 2 \
        -T "$seconds" -f "$work/select.sql"
}
echo "--- TCP, transaction pooling (pgbench, persistent connections, extended protocol)"
phase "$transaction" pgbench_run "$tx_port"
echo "--- TCP, session pooling (the same)"
phase "$demo" pgbench_run "$PGPORT"
awk 'NR == 1 {sql = $1} NR == 2 {tx = $1} NR == 3 {session = $1}
    END {printf "/sql / TCP: %.2fx of transaction pooling, %.2fx of session pooling\n", sql / tx, sql / session}' "$work/rates"
