# Shared by the side-by-side scripts (compare.sh, fairness.sh): a
# throwaway `authgres demo` stack in a temporary directory, and helpers to
# derive another proxy's configuration from it. Source it after `bin` is
# set; it sets `work`, `demo`, `pg_port` and `role_password`, sources the
# demo's environment (PGPORT, AUTHGRES_TOKEN_A, ...), and on exit stops
# the demo and every pid added to `extra_pids`.

work=$(mktemp -d)
chmod 755 "$work"
extra_pids=()
cleanup() {
    for pid in "${extra_pids[@]}"; do kill "$pid" 2>/dev/null; done
    kill "$demo" 2>/dev/null; wait "$demo" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
AUTHGRES_LOG=warn "$bin" demo --listen 127.0.0.1:0 --http-listen 127.0.0.1:0 --admin-listen 127.0.0.1:0 \
    --env "$work/demo.env" --state-dir "$work/state" >"$work/demo.out" 2>&1 &
demo=$!
for _ in $(seq 1 600); do [ -s "$work/demo.env" ] && grep -q HTTP_URL "$work/demo.env" && break; sleep 0.1; done
# shellcheck disable=SC1091
. "$work/demo.env"
pg_port=$(sed -n 's/^port = \([0-9]*\)/\1/p' "$work/state/proxy.toml")
role_password=$(sed -n 's/^AUTHGRES_AUTHENTICATED_PASSWORD=//p' "$work/state/authgres.env")

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Writes the demo's configuration to $1 for a second proxy on port $2: no
# HTTP or admin listener, and the [upstream] lines in $3 added.
derived_config() { # path port upstream-lines
    python3 - "$work/state/proxy.toml" "$1" "$2" "$3" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
text = re.sub(r'\[http\]\naddress = "[^"]*"\n', "", text)
text = re.sub(r'\[admin\]\naddress = "[^"]*"\n', "", text)
text = re.sub(r'(\[listen\]\naddress = ")[^"]*"', r'\g<1>127.0.0.1:' + sys.argv[3] + '"', text)
text = text.replace("[upstream]\n", "[upstream]\n" + sys.argv[4] + "\n")
open(sys.argv[2], "w").write(text)
PY
}

# Starts pgbouncer ($pgbouncer) on a free port ($bouncer_port) in front of
# the demo's server, as the demo's role with its password: $1 is the
# [databases] section's lines, $2 the [pgbouncer] settings beyond the
# listener and the authentication. Sets `bouncer`.
start_pgbouncer() { # databases settings
    bouncer_port=$(free_port)
    printf '"authenticated" "%s"\n' "$role_password" >"$work/userlist.txt"
    cat >"$work/pgbouncer.ini" <<INI
[databases]
$1
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
auth_type = scram-sha-256
auth_file = $work/userlist.txt
unix_socket_dir =
logfile =
$2
INI
    chmod 644 "$work"/*.ini "$work"/*.txt
    local as=()
    if [ "$(id -u)" = 0 ]; then as=(-u postgres); fi
    "$pgbouncer" "${as[@]}" "$work/pgbouncer.ini" >"$work/pgbouncer.out" 2>&1 &
    bouncer=$!
    extra_pids+=("$bouncer")
}
