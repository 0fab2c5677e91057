#!/usr/bin/env bash
# Side by side on one machine: direct Postgres, pgbouncer (session pooling)
# and authgres (session pooling, token logins), all on loopback, with
# pgbench: steady select-only load at -c 1, 8 and 32 (simple and prepared
# protocol) and connection churn (-C: a new connection per transaction).
#
#   benches/compare.sh [seconds]
#
# Needs a release build, pgbench and pgbouncer (Debian's package).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-8}
bin=target/release/authgres
[ -x "$bin" ] || cargo build --release
command -v pgbench >/dev/null || { echo "pgbench is missing: apt-get install postgresql-client" >&2; exit 1; }
pgbouncer=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
[ -x "$pgbouncer" ] || { echo "pgbouncer is missing: apt-get install pgbouncer" >&2; exit 1; }

work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
    [ -n "${bouncer:-}" ] && kill "$bouncer" 2>/dev/null
    kill "$demo" 2>/dev/null; wait "$demo" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
AUTHGRES_LOG=warn "$bin" demo --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 \
    --env "$work/demo.env" --state-dir "$work/state" >"$work/demo.out" 2>&1 &
demo=$!
for _ in $(seq 1 600); do [ -s "$work/demo.env" ] && grep -q HTTP_URL "$work/demo.env" && break; sleep 0.1; done
# shellcheck disable=SC1091
. "$work/demo.env"
pg_port=$(sed -n 's/^port = \([0-9]*\)/\1/p' "$work/state/proxy.toml")
role_password=$(sed -n 's/^AUTHGRES_AUTHENTICATED_PASSWORD=//p' "$work/state/authgres.env")

# pgbouncer in session mode in front of the same server, same role.
bouncer_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/userlist.txt" <<TXT
"authenticated" "$role_password"
TXT
cat >"$work/pgbouncer.ini" <<INI
[databases]
app = host=127.0.0.1 port=$pg_port dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
auth_type = scram-sha-256
auth_file = $work/userlist.txt
pool_mode = session
default_pool_size = 100
max_client_conn = 1000
unix_socket_dir =
logfile =
INI
chmod 644 "$work"/*.ini "$work"/*.txt
if [ "$(id -u)" = 0 ]; then as=(-u postgres); else as=(); fi
"$pgbouncer" "${as[@]}" "$work/pgbouncer.ini" >"$work/pgbouncer.out" 2>&1 &
bouncer=$!
sleep 1

echo "select 1;" >"$work/select.sql"
run() { # name port password args...
    local name=$1 port=$2 password=$3; shift 3
    local out
    out=$(PGPASSWORD=$password pgbench -n -h 127.0.0.1 -p "$port" -U authenticated -d app \
        -f "$work/select.sql" -T "$seconds" -j 2 "$@" 2>&1 || true)
    local tps lat
    tps=$(echo "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
    lat=$(echo "$out" | sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' | head -1)
    printf "%-10s %10s %10s\n" "$name" "${tps:-fail}" "${lat:-fail}"
}
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB; ${seconds}s per run; select 1"
for mode in "-c 1 -M simple" "-c 1 -M prepared" "-c 8 -M simple" "-c 8 -M prepared" \
            "-c 32 -M simple" "-c 32 -M prepared" "-c 8 -C -M simple"; do
    echo "--- pgbench $mode"
    printf "%-10s %10s %10s\n" target tps "latency ms"
    # shellcheck disable=SC2086
    run direct "$pg_port" "$role_password" $mode
    # shellcheck disable=SC2086
    run pgbouncer "$bouncer_port" "$role_password" $mode
    # shellcheck disable=SC2086
    run authgres "$PGPORT" "$AUTHGRES_TOKEN_A" $mode
done
