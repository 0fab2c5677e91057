#!/usr/bin/env bash
# Side by side on one machine: direct Postgres, pgbouncer and authgres (token
# logins), each pooler in session and in transaction mode, all on loopback,
# with pgbench: steady select-only load at -c 1, 8 and 32 (simple and
# prepared protocol) and connection churn (-C: a new connection per
# transaction). Prints TPS, average latency, the latency each pooler adds
# to direct Postgres, and each target's TPS as a ratio of direct Postgres's
# and of pgbouncer's in the same mode; then each pooler's own CPU time per
# transaction over a fixed count of transactions, measured from /proc. Every
# target is reached in plaintext (pgbouncer has no TLS here; authgres allows
# cleartext tokens from loopback), so each does the same work per byte. A run
# whose transactions fail (pgbouncer before 1.21 cannot run prepared
# statements in transaction mode) prints "fail". Each pair of proxies
# runs pgbouncer first in odd rounds and authgres first in even ones; the
# CPU measurement runs each proxy twice a round, in the order A B B A.
#
#   benches/compare.sh [seconds] [modes] [loads] [rounds] [pairs]
#     modes: "session transaction" (default both)
#     loads: pgbench options per load, separated by ";" (default: the seven
#            loads below)
#     rounds: how many times to run every load (default 1); with more than
#             one, the CPU ratios of all rounds are summarised at the end
#     pairs: after the rounds, this many pairs of 2-second `pgbench -c 1`
#            runs per mode, the two proxies alternating which goes first,
#            and the median of the pairs' latency differences (default 0:
#            none). A 4-second run's average latency moves by more than the
#            two proxies differ; a median of paired differences does not.
#
# AUTHGRES_THREADS (the proxy's --threads) is passed on to both authgres
# processes: AUTHGRES_THREADS=1 runs each on one thread.
#
# Builds the release binary; installs pgbench and pgbouncer (Debian's
# packages) when they are missing and this runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-8}
modes=${2:-session transaction}
IFS=';' read -r -a loads <<<"${3:--c 1 -M simple;-c 1 -M prepared;-c 8 -M simple;-c 8 -M prepared;-c 32 -M simple;-c 32 -M prepared;-c 8 -C -M simple}"
rounds=${4:-1}
pairs=${5:-0}
# Each pgbench run's length (the paired latency runs set their own).
duration=$seconds
bin=target/release/authgres
cargo build --release --quiet
need() { # command package
    command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] && return
    if [ "$(id -u)" = 0 ]; then
        echo "installing $2 for $1" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null
    else
        echo "$1 is missing: sudo apt-get install $2" >&2
        exit 1
    fi
}
need pgbench postgresql-client
need pgbouncer pgbouncer
pgbouncer=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)

# shellcheck source=benches/lib/demo.sh
. "$(dirname "$0")/lib/demo.sh"

# pgbouncer in session mode in front of the same server, same role.
start_pgbouncer "app = host=127.0.0.1 port=$pg_port dbname=app
app_txn = host=127.0.0.1 port=$pg_port dbname=app pool_mode=transaction" \
    "pool_mode = session
default_pool_size = 100
max_client_conn = 1000"

# A second authgres from the demo's configuration, in transaction mode.
txn_port=$(free_port)
derived_config "$work/state/proxy-txn.toml" "$txn_port" 'pool_mode = "transaction"'
AUTHGRES_LOG=warn "$bin" serve --config "$work/state/proxy-txn.toml" >"$work/txn.out" 2>&1 &
txn=$!
extra_pids+=("$txn")
sleep 1

echo "select 1;" >"$work/select.sql"
# pgbench takes the database as its last argument (its one-letter debug
# flag prints every message and slows the load generator by more than half).
pgbench_run() { # port database password args...
    local port=$1 db=$2 password=$3; shift 3
    PGSSLMODE=disable PGPASSWORD=$password pgbench -n -h 127.0.0.1 -p "$port" \
        -U authenticated -f "$work/select.sql" -j 2 "$@" "$db" 2>&1
}
run() { # port database password args...
    local out status=0
    out=$(pgbench_run "$@" -T "$duration") || status=$?
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9]*\).*/\1/p' | head -1)
    exact_tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\) .*/\1/p' | head -1)
    lat=$(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' | head -1)
    if [ "$status" != 0 ] || [ -z "$tps" ] || echo "$out" | grep -q "aborted"; then
        tps=0 exact_tps=0 lat=fail
    fi
}
# utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
ticks_per_second=$(getconf CLK_TCK)
# The proxy's own CPU per transaction over a fixed transaction count: on
# two shared cores throughput mostly measures pgbench and Postgres, while
# this is the proxy's cost alone. `cpu_run` adds one run's ticks and
# transactions to `ticks` and `counted` (or sets `ticks=fail`).
cpu_run() { # pid port database password clients transactions
    local pid=$1 port=$2 db=$3 password=$4 clients=$5 total=$6 before after out per_client
    per_client=$((total / clients))
    before=$(cpu_ticks "$pid")
    out=$(pgbench_run "$port" "$db" "$password" -c "$clients" -M simple -t "$per_client") || true
    after=$(cpu_ticks "$pid")
    if ! echo "$out" | grep -q "actually processed: $((clients * per_client))/"; then
        ticks=fail
        return
    fi
    [ "$ticks" = fail ] || ticks=$((ticks + after - before))
    counted=$((counted + clients * per_client))
}
# Microseconds of CPU per transaction from `ticks` over `counted`.
cpu_us() {
    if [ "$ticks" = fail ]; then echo fail; return; fi
    python3 -c "import sys; t, hz, n = map(float, sys.argv[1:]); print(f'{t / hz / n * 1e6:.1f}')" \
        "$ticks" "$ticks_per_second" "$counted"
}
ratio() { python3 -c "
import sys
try:
    a, b = map(float, sys.argv[1:])
    print(f'{a / b:.2f}' if a and b else '-')
except ValueError:
    print('-')" "$1" "$2"; }
added() { python3 -c "import sys; a, b = sys.argv[1:]; print(f'{(float(a) - float(b)) * 1000:.0f}' if 'fail' not in (a, b) else '-')" "$1" "$2"; }
target() { # mode -> bouncer_db authgres_port authgres_pid
    if [ "$1" = session ]; then
        bouncer_db=app authgres_port=$PGPORT authgres_pid=$demo
    else
        bouncer_db=app_txn authgres_port=$txn_port authgres_pid=$txn
    fi
}
# The two proxies run one after the other, pgbouncer first in odd rounds
# and authgres first in even ones: which of a pair ran second moved a
# side-by-side CPU figure by 5% on this machine, in either direction.
authgres_first() { [ $((round % 2)) -eq 0 ]; }
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; ${seconds}s per run; select 1"
for round in $(seq 1 "$rounds"); do
label=""
[ "$rounds" -gt 1 ] && label=" (round $round of $rounds)"
for load in "${loads[@]}"; do
    echo "--- pgbench $load$label"
    printf "%-22s %10s %11s %10s %10s %12s\n" target tps "latency ms" "added µs" "/ direct" "/ pgbouncer"
    # shellcheck disable=SC2086
    run "$pg_port" app "$role_password" $load
    direct_tps=$tps direct_lat=$lat
    printf "%-22s %10s %11s %10s %10s %12s\n" direct "$tps" "$lat" - 1.00 -
    for mode in $modes; do
        target "$mode"
        # shellcheck disable=SC2086
        if authgres_first; then
            run "$authgres_port" app "$AUTHGRES_TOKEN_A" $load
            authgres_tps=$tps authgres_lat=$lat
            run "$bouncer_port" "$bouncer_db" "$role_password" $load
        else
            run "$bouncer_port" "$bouncer_db" "$role_password" $load
            bouncer_tps=$tps bouncer_lat=$lat
            run "$authgres_port" app "$AUTHGRES_TOKEN_A" $load
            authgres_tps=$tps authgres_lat=$lat
            tps=$bouncer_tps lat=$bouncer_lat
        fi
        bouncer_tps=$tps
        printf "%-22s %10s %11s %10s %10s %12s\n" "pgbouncer $mode" "$tps" "$lat" \
            "$(added "$lat" "$direct_lat")" "$(ratio "$tps" "$direct_tps")" 1.00
        printf "%-22s %10s %11s %10s %10s %12s\n" "authgres $mode" "$authgres_tps" "$authgres_lat" \
            "$(added "$authgres_lat" "$direct_lat")" "$(ratio "$authgres_tps" "$direct_tps")" \
            "$(ratio "$authgres_tps" "$bouncer_tps")"
    done
done
# Enough transactions for a tick (10 ms) to be about 1% of the CPU one
# half-run takes on a fast host (~11 µs each): each proxy runs `total`
# twice over, half at a time (A B B A, below); 32,000 were only ~35 ticks.
total=$(( seconds * 50000 ))
for clients in 8 32; do
echo "--- proxy CPU per transaction (utime+stime from /proc), pgbench -c $clients -M simple, $total transactions$label"
printf "%-22s %10s %8s\n" target "µs / tx" "ratio"
for mode in $modes; do
    target "$mode"
    # Each proxy runs twice, half the transactions each time, in the order
    # A B B A (A is pgbouncer in odd rounds): a drift across the four
    # runs, or a cost to running second, falls on both alike.
    authgres_ticks=0 authgres_counted=0 bouncer_ticks=0 bouncer_counted=0
    order="pgbouncer authgres authgres pgbouncer"
    authgres_first && order="authgres pgbouncer pgbouncer authgres"
    for who in $order; do
        if [ "$who" = pgbouncer ]; then
            ticks=$bouncer_ticks counted=$bouncer_counted
            cpu_run "$bouncer" "$bouncer_port" "$bouncer_db" "$role_password" "$clients" $((total / 2))
            bouncer_ticks=$ticks bouncer_counted=$counted
        else
            ticks=$authgres_ticks counted=$authgres_counted
            cpu_run "$authgres_pid" "$authgres_port" app "$AUTHGRES_TOKEN_A" "$clients" $((total / 2))
            authgres_ticks=$ticks authgres_counted=$counted
        fi
    done
    ticks=$bouncer_ticks counted=$bouncer_counted bouncer_us=$(cpu_us)
    ticks=$authgres_ticks counted=$authgres_counted authgres_us=$(cpu_us)
    printf "%-22s %10s %8s\n" "pgbouncer $mode" "$bouncer_us" 1.00
    printf "%-22s %10s %8s\n" "authgres $mode" "$authgres_us" "$(ratio "$authgres_us" "$bouncer_us")"
    echo "$mode $clients $(ratio "$authgres_us" "$bouncer_us")" >>"$work/cpu_ratios"
done
done
done
if [ "$rounds" -gt 1 ] && [ -s "$work/cpu_ratios" ]; then
    echo "--- proxy CPU per transaction, authgres / pgbouncer over $rounds rounds"
    python3 - "$work/cpu_ratios" <<'PY'
import collections, statistics, sys
ratios = collections.defaultdict(list)
for line in open(sys.argv[1]):
    mode, clients, ratio = line.split()
    if ratio != "-":
        ratios[(mode, int(clients))].append(float(ratio))
print(f"{'mode':<12} {'clients':>7} {'mean':>6} {'median':>6}  range")
for (mode, clients), values in sorted(ratios.items()):
    print(f"{mode:<12} {clients:>7} {statistics.mean(values):6.2f} "
          f"{statistics.median(values):6.2f}  {min(values):.2f}-{max(values):.2f}")
PY
fi
# Paired latency at -c 1: each pair runs both proxies back to back, the
# order alternating, so drift in the machine's speed falls on both.
if [ "$pairs" -gt 0 ]; then
    echo "--- latency at -c 1, $pairs pairs of 2-second runs per mode (µs, from each run's tps; authgres - pgbouncer per pair)"
    printf "%-12s %16s %16s %16s  %s\n" mode "pgbouncer median" "authgres median" "diff median" "diff range"
    duration=2
    for mode in $modes; do
        target "$mode"
        : >"$work/pairs"
        for pair in $(seq 1 "$pairs"); do
            if [ $((pair % 2)) -eq 0 ]; then
                run "$authgres_port" app "$AUTHGRES_TOKEN_A" -c 1 -M simple
                a=$exact_tps
                run "$bouncer_port" "$bouncer_db" "$role_password" -c 1 -M simple
                b=$exact_tps
            else
                run "$bouncer_port" "$bouncer_db" "$role_password" -c 1 -M simple
                b=$exact_tps
                run "$authgres_port" app "$AUTHGRES_TOKEN_A" -c 1 -M simple
                a=$exact_tps
            fi
            echo "${b:-0} ${a:-0}" >>"$work/pairs"
        done
        python3 - "$mode" "$work/pairs" <<'PY'
import statistics, sys
# One client: the average latency is the inverse of the rate.
rows = [tuple(1e6 / float(t) for t in line.split()) for line in open(sys.argv[2])
        if all(float(t) > 0 for t in line.split())]
if not rows:
    print(f"{sys.argv[1]:<12} fail")
    sys.exit()
diffs = [a - b for b, a in rows]
print(f"{sys.argv[1]:<12} {statistics.median(b for b, _ in rows):16.1f} "
      f"{statistics.median(a for _, a in rows):16.1f} {statistics.median(diffs):+16.1f}  "
      f"{min(diffs):+.1f} to {max(diffs):+.1f}")
PY
    done
    duration=$seconds
fi
