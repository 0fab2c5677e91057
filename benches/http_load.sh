#!/usr/bin/env bash
# Requests per second for an authenticated single-row select through
# authgres: over HTTP keep-alive (/sql, as the Neon driver sends it, with
# wrk) and over TCP (pgbench, persistent connections), on loopback.
#
#   benches/http_load.sh [connections] [seconds]
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

work=$(mktemp -d)
trap 'kill $demo 2>/dev/null; wait $demo 2>/dev/null; rm -rf "$work"' EXIT
AUTHGRES_LOG=warn "$bin" demo --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --env "$work/demo.env" --state-dir "$work/state" >"$work/demo.out" 2>&1 &
demo=$!
for _ in $(seq 1 600); do [ -s "$work/demo.env" ] && grep -q HTTP_URL "$work/demo.env" && break; sleep 0.1; done
# shellcheck disable=SC1091
. "$work/demo.env"
PGPASSWORD=$AUTHGRES_TOKEN_A psql -qX -c "insert into todos (task) values ('load')" >/dev/null

cat >"$work/sql.lua" <<LUA
wrk.method = "POST"
wrk.body = '{"query":"select * from todos where user_id = auth.user_id()","params":[]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $AUTHGRES_TOKEN_A"
wrk.headers["Neon-Connection-String"] = "postgresql://authenticated@$PGHOST:$PGPORT/$PGDATABASE"
wrk.headers["Neon-Raw-Text-Output"] = "true"
wrk.headers["Neon-Array-Mode"] = "true"
LUA
echo "machine: $(nproc) cores; $connections connections; ${seconds}s each"
echo "--- HTTP /sql (wrk, keep-alive)"
wrk -t2 -c"$connections" -d"${seconds}s" -s "$work/sql.lua" "$AUTHGRES_HTTP_URL" | grep -E "Requests/sec|Latency|requests in|Non-2xx"

echo "select * from todos where user_id = auth.user_id();" >"$work/select.sql"
echo "--- TCP (pgbench, persistent connections, extended protocol)"
PGPASSWORD=$AUTHGRES_TOKEN_A pgbench -n -M extended -c "$connections" -j 2 -T "$seconds" \
    -f "$work/select.sql" 2>&1 | grep -E "^tps|latency average"
