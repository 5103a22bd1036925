#!/usr/bin/env bash
# Instructions per request, counted by callgrind: repeatable for the same
# binary and inputs, however loaded the machine is (wall-clock benchmarks on
# a shared 2-core VM are not). gatehouse runs under valgrind in front of an
# nginx upstream; a keep-alive client sends N and then 2N requests, and the
# difference of the two totals divided by N is the cost of one request, with
# start-up and shutdown cancelled out.
#
#   bench/instructions.sh                        # the plain route, metrics and access log on
#   ROUTE=/auth/v1/users/7 bench/instructions.sh # the RS256 auth + rate limit route
#   QUIET=1 bench/instructions.sh                # metrics off, no access log
#   GATEHOUSE_BIN=/path/to/other/gatehouse bench/instructions.sh   # compare builds
#   BARE=1 bench/instructions.sh                 # Pingora alone (examples/bare_proxy.rs), the floor
#   BARE=minimum bench/instructions.sh           # Pingora alone doing the least SPEC 2.3 asks
#                                                # (timeouts, forwarding fields, request id)
#   ROUTE=/limited/v1/users/7 bench/instructions.sh              # a local rate limit
#   ENCODING=gzip ROUTE=/gzip/v1/users/7 bench/instructions.sh     # the compressed JSON route, gzip asked for
#   TRACE_SAMPLE=0.01 bench/instructions.sh       # with tracing, 1% of new traces recorded
#                                                # (sent to a collector that is not there: dropped and counted)
#   CLUSTER=1 ROUTE=/clustered/v1/users/7 bench/instructions.sh  # the same limit counted in Redis
#                                                # (a redis-server of its own; its instructions are not counted)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GATEHOUSE_BIN=${GATEHOUSE_BIN:-$ROOT/target/release/gatehouse}
NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
N=${N:-2000}
ROUTE=${ROUTE:-/v1/users/7}
QUIET=${QUIET:-0}
BARE=${BARE:-0}
CLUSTER=${CLUSTER:-0}
ENCODING=${ENCODING:-}
TRACE_SAMPLE=${TRACE_SAMPLE:-}
BARE_BIN=${BARE_BIN:-$ROOT/target/release/examples/bare_proxy}
for tool in valgrind python3 curl openssl; do
    command -v "$tool" >/dev/null || { echo "instructions: '$tool' is required" >&2; exit 1; }
done
[[ -x $GATEHOUSE_BIN ]] || { echo "instructions: build it: cargo build --release" >&2; exit 1; }
if [[ $BARE != 0 ]]; then
    [[ -x $BARE_BIN ]] || { echo "instructions: build it: cargo build --release --example bare_proxy" >&2; exit 1; }
fi
[[ -x $NGINX_BIN ]] || { echo "instructions: nginx not found (set NGINX_BIN)" >&2; exit 1; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-instr.XXXXXX")
cleanup() {
    [[ -f $WORK/upstream.pid ]] && kill "$(cat "$WORK/upstream.pid")" 2>/dev/null || true
    [[ -n ${REDIS_PID:-} ]] && kill "$REDIS_PID" 2>/dev/null || true
    [[ ${KEEP_WORK:-0} == 1 ]] && echo "instructions: work dir kept: $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
. "$ROOT/bench/lib.sh"
UP=$(free_port); GH=$(free_port); ADMIN=$(free_port)
upstream_nginx_conf "$WORK" "$UP" >"$WORK/upstream.conf"
"$NGINX_BIN" -c "$WORK/upstream.conf" -p "$WORK"
TOKEN=$(mint_token)

cluster_lines=""
if [[ $CLUSTER == 1 ]]; then
    command -v redis-server >/dev/null || { echo "instructions: redis-server not found (scripts/install-deps.sh installs it)" >&2; exit 1; }
    REDIS=$(free_port)
    redis-server --port "$REDIS" --bind 127.0.0.1 --save '' --appendonly no >"$WORK/redis.log" 2>&1 &
    REDIS_PID=$!
    # Valgrind slows the gateway some fifty times: a timeout that never
    # sends it to its fallback.
    cluster_lines="cluster: { redis: redis://127.0.0.1:$REDIS/0, timeout: 5s }"
    GATEHOUSE_EXTRA_ROUTES=$(cluster_route)
fi
observe="access_log: $WORK/access.log"
if [[ -n $TRACE_SAMPLE ]]; then
    observe="$observe
tracing: { otlp: 'http://127.0.0.1:$(free_port)/v1/traces', sample: $TRACE_SAMPLE }"
fi
server_extra=""
if [[ $QUIET == 1 ]]; then observe="access_log: off"; server_extra="  metrics: false"; fi
cat >"$WORK/gatehouse.yaml" <<EOF
server:
  threads: 1
  pid_file: $WORK/gatehouse.pid
  upgrade_sock: $WORK/upgrade.sock
$server_extra
listen: [127.0.0.1:$GH]
admin: { listen: 127.0.0.1:$ADMIN }
$observe
$cluster_lines
$(gatehouse_routes "$UP")
${GATEHOUSE_EXTRA_ROUTES:-}
EOF

# Total instructions of one gatehouse run serving COUNT requests.
run() {
    local count=$1 out=$WORK/callgrind.$1 pid
    local server=("$GATEHOUSE_BIN" -c "$WORK/gatehouse.yaml")
    [[ $BARE == 1 ]] && server=("$BARE_BIN" "127.0.0.1:$GH" "127.0.0.1:$UP")
    [[ $BARE == minimum ]] && server=("$BARE_BIN" "127.0.0.1:$GH" "127.0.0.1:$UP" minimum)
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        "${server[@]}" >"$WORK/gh.$count.log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do
        curl -sf -o /dev/null "http://127.0.0.1:$GH/" && break
        sleep 0.2
    done
    if [[ $CLUSTER == 1 ]]; then
        for _ in $(seq 600); do
            curl -s "http://127.0.0.1:$ADMIN/readyz" | grep -q '"store":"up"' && break
            sleep 0.2
        done
    fi
    python3 - "$GH" "$ROUTE" "$count" "$TOKEN" "$ENCODING" <<'PY'
import http.client, sys
port, route, count, token, encoding = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
c = http.client.HTTPConnection("127.0.0.1", port)
headers = {"Authorization": "Bearer " + token}
if encoding:
    headers["Accept-Encoding"] = encoding
for _ in range(count):
    c.request("GET", route, headers=headers)
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
PY
    kill -INT "$pid"
    wait "$pid" || true
    # One `totals:` line per output file (one per thread with
    # --separate-threads; a file's `summary:` repeats it).
    grep -h '^totals:' "$out"* | awk '{s += $2} END {print s}'
}
one=$(run "$N")
two=$(run $((2 * N)))
what=$GATEHOUSE_BIN
[[ $BARE == 1 ]] && what=$BARE_BIN
[[ $BARE == minimum ]] && what="$BARE_BIN minimum"
if [[ $CLUSTER == 1 ]]; then
    # Proof the limit was counted in Redis (not in the fallback): its script calls.
    python3 - "$REDIS" $((3 * N)) <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"INFO commandstats\r\n")
data = b""
while not data.endswith(b"\r\n") or data.count(b"\r\n") < 2:
    data += s.recv(65536)
calls = sum(int(l.split("calls=")[1].split(",")[0]) for l in data.decode().splitlines()
            if l.startswith(("cmdstat_evalsha:", "cmdstat_eval:")))
print(f"store: {calls} script calls for {sys.argv[2]} requests (leases)")
PY
fi
python3 -c "print(f'instructions per request: {($two - $one) / $N:,.0f}  ($ROUTE, quiet=$QUIET, trace_sample=${TRACE_SAMPLE:-off}, N=$N, $(basename "$what") at $what)')"
