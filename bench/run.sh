#!/usr/bin/env bash
# Throughput/latency/CPU benchmark: gatehouse against nginx as a reverse proxy,
# both in front of the same fast nginx upstream. See bench/README.md.
#
#   bench/run.sh                                   # full run (5 rounds x 10 s, c64)
#   ROUNDS=2 DURATION=2 TARGETS=upstream,nginx bench/run.sh   # quick, no gatehouse
set -euo pipefail

# ---------------------------------------------------------------- settings --
ROUNDS=${ROUNDS:-5}              # measured rounds
DURATION=${DURATION:-10}         # seconds per measured run
WARMUP=${WARMUP:-$DURATION}      # seconds of the thrown-away warm-up run per target (0 = none)
CONNS=${CONNS:-64}               # wrk connections
PAUSE=${PAUSE:-1}                # seconds of idle between runs
REQ_PATH=${REQ_PATH:-/v1/users/7}
TARGETS=${TARGETS:-upstream,nginx,pingora-bare,pingora-minimum,gatehouse,gatehouse-quiet,gatehouse-auth,gatehouse-cache,gatehouse-limit,gatehouse-cluster,gatehouse-split,gatehouse-traced,nginx-gzip,gatehouse-gzip}   # comma list of target names, see TARGET_DEFS
SERVER_CPU=${SERVER_CPU:-0}      # proxies run here ...
UPSTREAM_CPU=${UPSTREAM_CPU:-$SERVER_CPU}      # ... and, by default, the upstream too
LOAD_CPU=${LOAD_CPU:-1}          # wrk runs here
KEEP_WORK=${KEEP_WORK:-0}        # 1 = keep the temp work dir (configs, logs, raw wrk output)
# Extra YAML appended under gatehouse's `routes:` (indent entries by two spaces),
# for a second scenario; pair it with a line in TARGET_DEFS below.
GATEHOUSE_EXTRA_ROUTES=${GATEHOUSE_EXTRA_ROUTES:-}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GATEHOUSE_BIN=${GATEHOUSE_BIN:-$ROOT/target/release/gatehouse}
# Pingora with nothing on top (examples/bare_proxy.rs): the floor gatehouse builds on.
BARE_BIN=${BARE_BIN:-$ROOT/target/release/examples/bare_proxy}
NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
WRK_BIN=${WRK_BIN:-$(command -v wrk || echo /usr/bin/wrk)}
REDIS_BIN=${REDIS_BIN:-$(command -v redis-server || echo /usr/bin/redis-server)}

# 42-byte JSON body the upstream returns; every target must return it verbatim.
BODY='{"ok":true,"service":"bench","id":7,"v":1}'
# The compressed JSON route's body (bench/lib.sh).
BIG_BODY=$(. "$ROOT/bench/lib.sh" && big_body)


die() { echo "bench: error: $*" >&2; exit 1; }
note() { echo "bench: $*" >&2; }

for v in ROUNDS DURATION WARMUP CONNS PAUSE SERVER_CPU UPSTREAM_CPU LOAD_CPU; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a non-negative integer (got '${!v}')"
done
(( ROUNDS >= 1 && DURATION >= 1 && CONNS >= 1 )) || die "ROUNDS, DURATION and CONNS must be >= 1"
for tool in python3 curl taskset getconf openssl; do
    command -v "$tool" >/dev/null || die "'$tool' is required but not installed"
done
[[ -x $WRK_BIN ]] || die "wrk not found (set WRK_BIN)"
[[ -x $NGINX_BIN ]] || die "nginx not found (set NGINX_BIN)"
NCPU=$(nproc)
for v in SERVER_CPU UPSTREAM_CPU LOAD_CPU; do
    (( ${!v} < NCPU )) || die "$v=${!v} but this machine has only $NCPU CPUs"
done
(( SERVER_CPU != LOAD_CPU )) || note "warning: SERVER_CPU and LOAD_CPU are the same CPU; wrk will compete with the servers"
CLK_TCK=$(getconf CLK_TCK)

# ------------------------------------------------------------ work dir etc --
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-bench.XXXXXX")
mkdir -p "$WORK/tmp" "$WORK/wrk"
RESULTS=$WORK/results.tsv
declare -A SERVER_PID=()        # server name -> pid of the process we started
declare -A STOP_SIGNAL=([gatehouse]=INT [gatehouse-quiet]=INT [gatehouse-traced]=INT [pingora-bare]=INT [pingora-minimum]=INT)   # Pingora: SIGINT = fast shutdown (TERM is graceful, ~10 s)
STATUS=1

cleanup() {
    local rc=$STATUS name pid i
    trap - EXIT INT TERM HUP
    for name in "${!SERVER_PID[@]}"; do
        pid=${SERVER_PID[$name]}
        kill -"${STOP_SIGNAL[$name]:-TERM}" "$pid" 2>/dev/null || true
    done
    for name in "${!SERVER_PID[@]}"; do
        pid=${SERVER_PID[$name]}
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            note "$name (pid $pid) did not stop; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    # Keep the configs and logs after a failure (not after Ctrl-C) for a post-mortem.
    if [[ $KEEP_WORK == 1 ]] || (( rc != 0 && rc != 130 && ${#SERVER_PID[@]} > 0 )); then
        note "work dir kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap 'cleanup' EXIT
trap 'note "interrupted"; STATUS=130; exit 130' INT TERM HUP

# Raise the fd limit for wrk and the servers if we may (inherited by children).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
[[ $NOFILE =~ ^[0-9]+$ ]] && (( NOFILE <= 65536 )) || NOFILE=65536
(( NOFILE >= 2 * CONNS + 64 )) || note "warning: open-file limit $NOFILE is low for CONNS=$CONNS"

read -r UP_PORT NGX_PORT GH_PORT GH_ADMIN_PORT GHQ_PORT GHQ_ADMIN_PORT BARE_PORT REDIS_PORT GHT_PORT GHT_ADMIN_PORT MIN_PORT < <(python3 -c '
import socket
ss = [socket.socket() for _ in range(11)]
for s in ss:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in ss))
') || true
[[ -n ${MIN_PORT:-} ]] || die "could not pick free ports (python3 failed?)"

# ----------------------------------------------------------------- targets --
# One line per target: "name|server|url|auth". `server` is the process whose CPU and
# RSS are measured (upstream, nginx, pingora-bare, pingora-minimum, gatehouse, gatehouse-quiet or gatehouse-traced;
# "-" = measure nothing). pingora-bare is examples/bare_proxy.rs: Pingora with
# gatehouse's allocator, build profile and server options, forwarding to one
# prebuilt peer and doing nothing else; pingora-minimum is the same binary
# doing, with Pingora's own API, the least SPEC 2.3 asks of every request
# (upstream timeouts, the five forwarding fields, a request id both ways).
# gatehouse-quiet is a second gatehouse with the same routes but no
# metrics and no access log, to price them against gatehouse. gatehouse-traced
# is a third one, like gatehouse plus `tracing` at sample 0.01 (SPEC 9.1),
# exporting its spans to the upstream nginx, which answers every POST 200. The
# upstream always runs; the other servers start only if a selected target needs
# them. `auth` = bearer sends one RS256 token (minted below) with every request.
# A further gatehouse scenario is one more line here plus its route in
# GATEHOUSE_EXTRA_ROUTES.
TARGET_DEFS=(
    "upstream|-|http://127.0.0.1:$UP_PORT$REQ_PATH|-"
    "nginx|nginx|http://127.0.0.1:$NGX_PORT$REQ_PATH|-"
    "pingora-bare|pingora-bare|http://127.0.0.1:$BARE_PORT$REQ_PATH|-"
    "pingora-minimum|pingora-minimum|http://127.0.0.1:$MIN_PORT$REQ_PATH|-"
    "gatehouse|gatehouse|http://127.0.0.1:$GH_PORT$REQ_PATH|-"
    "gatehouse-quiet|gatehouse-quiet|http://127.0.0.1:$GHQ_PORT$REQ_PATH|-"
    "gatehouse-traced|gatehouse-traced|http://127.0.0.1:$GHT_PORT$REQ_PATH|-"
    "gatehouse-auth|gatehouse|http://127.0.0.1:$GH_PORT/auth$REQ_PATH|bearer"
    "gatehouse-cache|gatehouse|http://127.0.0.1:$GH_PORT/cached$REQ_PATH|-"
    "gatehouse-limit|gatehouse|http://127.0.0.1:$GH_PORT/limited$REQ_PATH|-"
    "gatehouse-cluster|gatehouse|http://127.0.0.1:$GH_PORT/clustered$REQ_PATH|-"
    "gatehouse-split|gatehouse|http://127.0.0.1:$GH_PORT/split$REQ_PATH|-"
    "nginx-gzip|nginx|http://127.0.0.1:$NGX_PORT/gzip$REQ_PATH|gzip"
    "gatehouse-gzip|gatehouse|http://127.0.0.1:$GH_PORT/gzip$REQ_PATH|gzip"
)

declare -A T_SERVER=() T_URL=() T_AUTH=()
SELECTED=()
IFS=',' read -ra wanted <<<"$TARGETS"
for def in "${TARGET_DEFS[@]}"; do
    IFS='|' read -r name server url auth <<<"$def"
    for w in "${wanted[@]}"; do
        if [[ ${w// /} == "$name" ]]; then
            SELECTED+=("$name"); T_SERVER[$name]=$server; T_URL[$name]=$url; T_AUTH[$name]=$auth
            break
        fi
    done
done
for w in "${wanted[@]}"; do
    w=${w// /}
    [[ -n $w && -n ${T_URL[$w]:-} ]] || die "unknown target '$w' in TARGETS (known: $(printf '%s\n' "${TARGET_DEFS[@]}" | cut -d'|' -f1 | paste -sd, -))"
done
(( ${#SELECTED[@]} > 0 )) || die "TARGETS selects nothing"

need_server() {
    local n
    for n in "${SELECTED[@]}"; do [[ ${T_SERVER[$n]} == "$1" ]] && return 0; done
    return 1
}
need_gatehouse() { need_server gatehouse || need_server gatehouse-quiet || need_server gatehouse-traced; }

if need_gatehouse && [[ $GATEHOUSE_BIN == */debug/* ]]; then
    note "WARNING: $GATEHOUSE_BIN looks like a debug build; its numbers mean nothing (use target/release/gatehouse)"
fi
if { need_server pingora-bare || need_server pingora-minimum; } && [[ ! -x $BARE_BIN ]]; then
    die "bare Pingora proxy not found at $BARE_BIN
  Build it first:   (cd $ROOT && cargo build --release --example bare_proxy)
  or leave it out of TARGETS"
fi
if need_gatehouse && [[ ! -x $GATEHOUSE_BIN ]]; then
    die "gatehouse binary not found at $GATEHOUSE_BIN
  Build it first:   (cd $ROOT && cargo build --release)
  or point GATEHOUSE_BIN at a binary, or leave it out: TARGETS=upstream,nginx $0"
fi

# --------------------------------------------------------------- configs ----
# Temp paths for the nginx modules compiled in (their compiled-in defaults under
# /var/lib/nginx are not writable by non-root users).
nginx_temp_paths() {   # $1 = prefix inside the work dir
    local v m out=""
    v=$("$NGINX_BIN" -V 2>&1)
    out+="    client_body_temp_path $WORK/tmp/$1-body;"$'\n'
    for m in proxy fastcgi uwsgi scgi; do
        [[ $v == *"--without-http_${m}_module"* ]] || out+="    ${m}_temp_path $WORK/tmp/$1-$m;"$'\n'
    done
    printf '%s' "$out"
}

cat >"$WORK/upstream.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $WORK/upstream.pid;
error_log $WORK/upstream-error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
$(nginx_temp_paths upstream)
    server {
        listen 127.0.0.1:$UP_PORT backlog=4096;
        default_type application/json;
        location / { return 200 '$BODY'; }
        location /big/ { return 200 '$BIG_BODY'; }
        # gatehouse-traced's span export (OTLP/HTTP): accepted, discarded.
        location = /v1/traces { return 200; }
    }
}
EOF

cat >"$WORK/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
$(nginx_temp_paths nginx)
    upstream app {
        server 127.0.0.1:$UP_PORT;
        keepalive 1024;
        keepalive_requests 10000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$NGX_PORT backlog=4096;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Gateway gatehouse;
        }
        # The compressed JSON route: the same upstream's larger body, gzip
        # level 6 as gatehouse's default.
        location /gzip/ {
            proxy_pass http://app/big/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Gateway gatehouse;
            gzip on;
            gzip_types application/json;
            gzip_comp_level 6;
            gzip_min_length 1024;
            gzip_proxied any;
            gzip_vary on;
        }
    }
}
EOF

. "$ROOT/bench/lib.sh"
TOKEN=$(mint_token) || die "cannot mint the bench token (openssl?)"

# gatehouse-cluster: the `limited` route's limit counted in a redis-server
# (pinned to SERVER_CPU, beside the gateway and the upstream), so the
# cluster-scoped route and the local one compare in the same round.
CLUSTER_LINES=""
if [[ " ${SELECTED[*]} " == *" gatehouse-cluster "* ]]; then
    [[ -x $REDIS_BIN ]] || die "redis-server not found (scripts/install-deps.sh installs it), or leave gatehouse-cluster out of TARGETS"
    CLUSTER_LINES="cluster: { redis: redis://127.0.0.1:$REDIS_PORT/0, timeout: 50ms }"
    GATEHOUSE_EXTRA_ROUTES+="
$(cluster_route)"
fi

# gatehouse_yaml NAME PORT ADMIN_PORT SERVER_LINES TOP_LINES: prints a gatehouse
# config. The two instances share everything (upstreams, auth, routes) except
# ports, pid/upgrade-socket paths ($WORK/NAME.*) and the observability settings
# passed in: SERVER_LINES are extra keys under `server:` (indent two spaces),
# TOP_LINES extra top-level keys.
gatehouse_yaml() {
    local name=$1 port=$2 admin=$3 server_lines=$4 top_lines=$5
    cat <<EOF
server:
  threads: 1
  pid_file: $WORK/$name.pid
  upgrade_sock: $WORK/$name-upgrade.sock
  upstream_keepalive_pool_size: 1024
$server_lines
listen: [127.0.0.1:$port]
admin: { listen: 127.0.0.1:$admin }
$top_lines
$(gatehouse_routes "$UP_PORT")
$GATEHOUSE_EXTRA_ROUTES
EOF
}
# gatehouse: metrics on (the default) and a JSON access log written to a file.
gatehouse_yaml gatehouse "$GH_PORT" "$GH_ADMIN_PORT" "" \
    "access_log: $WORK/access.log
$CLUSTER_LINES" >"$WORK/gatehouse.yaml"
# gatehouse-quiet: the same gateway with neither, so gatehouse vs gatehouse-quiet
# is the price of metrics + access logging.
gatehouse_yaml gatehouse-quiet "$GHQ_PORT" "$GHQ_ADMIN_PORT" "  metrics: false" \
    "access_log: off
$CLUSTER_LINES" >"$WORK/gatehouse-quiet.yaml"
# gatehouse-traced: gatehouse plus tracing, 1% of new traces recorded, so
# gatehouse-traced vs gatehouse is the price of tracing.
gatehouse_yaml gatehouse-traced "$GHT_PORT" "$GHT_ADMIN_PORT" "" \
    "access_log: $WORK/access-traced.log
tracing: { otlp: 'http://127.0.0.1:$UP_PORT/v1/traces', sample: 0.01 }
$CLUSTER_LINES" >"$WORK/gatehouse-traced.yaml"

# --------------------------------------------------------------- helpers ----
show_log() {   # $1 = log file
    [[ -s $1 ]] || return 0
    echo "---- last lines of $1 ----" >&2
    tail -n 20 "$1" >&2
}

# wait_http NAME URL LOG: wait until URL answers 200, or the server dies.
wait_http() {
    local name=$1 url=$2 log=$3 pid=${SERVER_PID[$1]} i
    for ((i = 0; i < 200; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            show_log "$log"
            die "$name exited during start-up (see log above)"
        fi
        curl -sf -o /dev/null --max-time 1 "$url" && return 0
        sleep 0.1
    done
    show_log "$log"
    die "$name did not answer 200 at $url within 20 s"
}

start_server() {   # $1 = name, rest = command (run pinned, in the foreground, logs to WORK)
    local name=$1 cpu=$2; shift 2
    taskset -c "$cpu" "$@" >"$WORK/$name.log" 2>&1 &
    SERVER_PID[$name]=$!
}

# check_target NAME: the target must answer 200 with exactly BODY (gzip
# targets: BIG_BODY, gzip-encoded).
check_target() {
    local name=$1 url=${T_URL[$1]} server=${T_SERVER[$1]} out code body
    if [[ $server != - ]] && ! kill -0 "${SERVER_PID[$server]}" 2>/dev/null; then
        show_log "$WORK/$server.log"
        die "$server (pid ${SERVER_PID[$server]}) is no longer running"
    fi
    local auth=()
    local want=$BODY
    [[ ${T_AUTH[$name]} == bearer ]] && auth=(-H "Authorization: Bearer $TOKEN")
    if [[ ${T_AUTH[$name]} == gzip ]]; then
        want=$BIG_BODY
        auth=(-H "Accept-Encoding: gzip")
        local encoding
        encoding=$(curl -s --max-time 5 -o /dev/null -D - "${auth[@]}" "$url" | tr -d '\r' | awk -F': ' 'tolower($1) == "content-encoding" {print $2}')
        [[ $encoding == gzip ]] || die "$name: $url did not answer gzip-encoded (Content-Encoding: ${encoding:-none})"
        auth+=(--compressed)
    fi
    out=$(curl -s --max-time 5 "${auth[@]}" -w '\n%{http_code}' "$url") || die "$name: no HTTP answer from $url"
    code=${out##*$'\n'}
    body=${out%$'\n'*}
    [[ $code == 200 ]] || die "$name: $url answered HTTP $code, not 200 (body: ${body:0:200})"
    [[ $body == "$want" ]] || die "$name: $url answered 200 but with an unexpected body: ${body:0:200}"
}

# pids_of SERVER: the server process and all its descendants (nginx: master + workers).
pids_of() {
    local queue=("$1") out=() p c
    while (( ${#queue[@]} )); do
        p=${queue[0]}; queue=("${queue[@]:1}")
        [[ -r /proc/$p/stat ]] || continue
        out+=("$p")
        if compgen -G "/proc/$p/task/*/children" >/dev/null; then
            for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do queue+=("$c"); done
        else
            for c in $(ps -o pid= --ppid "$p"); do queue+=("$c"); done
        fi
    done
    echo "${out[*]}"
}

cpu_ticks() {   # $@ = pids; prints the sum of utime+stime in clock ticks
    local total=0 p s rest f
    for p in "$@"; do
        s=$(<"/proc/$p/stat") || continue
        rest=${s##*) }           # skip "pid (comm) ", comm may contain spaces
        read -ra f <<<"$rest"    # f[0] = state (field 3), so utime = f[11], stime = f[12]
        total=$(( total + f[11] + f[12] ))
    done
    echo "$total"
}

hwm_kib() {   # $@ = pids; prints the sum of VmHWM in KiB
    local total=0 p v
    for p in "$@"; do
        v=$(awk '/^VmHWM:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
        total=$(( total + ${v:-0} ))
    done
    echo "$total"
}

# parse_wrk FILE: prints "rps requests p50_ms p99_ms non2xx socket_errors"
parse_wrk() {
    awk '
    function ms(v,   n, u) {
        n = v + 0; u = v; sub(/^[0-9.]+/, "", u)
        if (u == "us") return n / 1000
        if (u == "ms") return n
        if (u == "s")  return n * 1000
        if (u == "m")  return n * 60000
        if (u == "h")  return n * 3600000
        return -1
    }
    /^ +50%/ { p50 = ms($2) }
    /^ +99%/ { p99 = ms($2) }
    / requests in / { reqs = $1 }
    /^Requests\/sec:/ { rps = $2 }
    /Non-2xx or 3xx responses:/ { non2xx = $NF }
    /Socket errors:/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) { x = $i; sub(",", "", x); errs += x } }
    END {
        if (rps == "" || reqs == "" || p50 == "" || p99 == "") exit 1
        printf "%s %s %.4f %.4f %d %d\n", rps, reqs, p50, p99, non2xx, errs
    }' "$1"
}

# machine_ticks: prints "busy total" clock ticks summed over all CPUs (/proc/stat).
machine_ticks() {
    local label user nice system idle iowait irq softirq steal rest
    read -r label user nice system idle iowait irq softirq steal rest </proc/stat
    echo "$(( user + nice + system + irq + softirq + steal )) $(( user + nice + system + irq + softirq + steal + idle + iowait ))"
}

# self_child_ticks: CPU ticks of this shell's reaped children (wrk ends up here).
self_child_ticks() {
    local s rest f
    s=$(</proc/$$/stat); rest=${s##*) }; read -ra f <<<"$rest"
    echo $(( f[13] + f[14] ))   # cutime, cstime (fields 16, 17)
}

# tcp_opens: TCP connections this network namespace has opened (ActiveOpens).
# Over a run that is wrk's CONNS plus whatever the proxy opens to the upstream;
# much more than CONNS means connection churn (pool too small, keep-alive limits).
tcp_opens() {
    awk '/^Tcp:/ { if (!h) { for (i = 2; i <= NF; i++) if ($i == "ActiveOpens") c = i; h = 1 } else { print $c; exit } }' /proc/net/snmp
}

per_req() {   # $1 = CPU ticks, $2 = requests; prints microseconds per request
    awk -v d="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { printf "%.2f", d / hz * 1e6 / n }'
}

# run_wrk NAME SECONDS OUTFILE [ROUND]: one load run; appends a row to RESULTS if ROUND given.
# Besides the target's own figures it measures the upstream's CPU per request and
# the share of the machine used by anything other than the servers and wrk
# ("other", e.g. a concurrent build), which flags contaminated runs.
run_wrk() {
    local name=$1 secs=$2 outfile=$3 round=${4:-} server=${T_SERVER[$1]}
    local pids=() up_pids=() s0=0 s1=0 u0 u1 w0 w1 m0 m1 rss=- cpu=- up_cpu other
    local parsed rps reqs p50 p99 non2xx errs opens flag="" now
    check_target "$name"
    opens=$(tcp_opens)
    read -ra up_pids <<<"$(pids_of "${SERVER_PID[upstream]}")"
    [[ $server == - ]] || read -ra pids <<<"$(pids_of "${SERVER_PID[$server]}")"
    m0=$(machine_ticks); w0=$(self_child_ticks); u0=$(cpu_ticks "${up_pids[@]}")
    [[ $server == - ]] || s0=$(cpu_ticks "${pids[@]}")
    local auth=()
    [[ ${T_AUTH[$name]} == bearer ]] && auth=(-H "Authorization: Bearer $TOKEN")
    [[ ${T_AUTH[$name]} == gzip ]] && auth=(-H "Accept-Encoding: gzip")
    taskset -c "$LOAD_CPU" "$WRK_BIN" -t1 -c"$CONNS" -d"${secs}s" --latency "${auth[@]}" "${T_URL[$name]}" >"$outfile" 2>&1 \
        || { cat "$outfile" >&2; die "wrk failed against $name"; }
    [[ $server == - ]] || s1=$(cpu_ticks "${pids[@]}")
    u1=$(cpu_ticks "${up_pids[@]}"); w1=$(self_child_ticks); m1=$(machine_ticks)
    [[ $server == - ]] || rss=$(hwm_kib "${pids[@]}")
    parsed=$(parse_wrk "$outfile") || { cat "$outfile" >&2; die "cannot parse wrk output for $name"; }
    read -r rps reqs p50 p99 non2xx errs <<<"$parsed"
    (( reqs > 0 )) || { cat "$outfile" >&2; die "$name: wrk completed no requests"; }
    if [[ $server != - ]]; then
        cpu=$(per_req $(( s1 - s0 )) "$reqs")
        now=$(pids_of "${SERVER_PID[$server]}")
        [[ $now == "${pids[*]}" ]] || note "warning: $server processes changed during the run ($now vs ${pids[*]}); CPU figure is unreliable"
    fi
    up_cpu=$(per_req $(( u1 - u0 )) "$reqs")
    other=$(awk -v m0="$m0" -v m1="$m1" -v mine=$(( s1 - s0 + u1 - u0 + w1 - w0 )) 'BEGIN {
        split(m0, a, " "); split(m1, b, " "); t = b[2] - a[2]
        o = (b[1] - a[1] - mine) / (t > 0 ? t : 1) * 100; printf "%.1f", (o < 0 ? 0 : o) }')
    opens=$(( $(tcp_opens) - opens ))
    (( non2xx + errs == 0 )) || flag="  !! non-2xx=$non2xx socket-errors=$errs"
    printf '  %-6s %-12s %8.0f rps  p50 %6.3f ms  p99 %7.3f ms  cpu %6s us/req  upstream %6s us/req  hwm %6s KiB  other %4s%%  tcp opens %s%s\n' \
        "${round:-warmup}" "$name" "$rps" "$p50" "$p99" "$cpu" "$up_cpu" "$rss" "$other" "$opens" "$flag" >&2
    if [[ -n $round ]]; then
        printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$rps" "$p50" "$p99" \
            "$cpu" "$rss" "$reqs" "$(( non2xx + errs ))" "$up_cpu" "$other" >>"$RESULTS"
    fi
}

# busy_check: warn if other processes keep the machine busy before we start.
busy_check() {
    local a b busy
    a=$(machine_ticks); sleep 1; b=$(machine_ticks)
    busy=$(awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); t = y[2] - x[2]; printf "%.0f", (y[1] - x[1]) / (t > 0 ? t : 1) * 100 }')
    if (( busy > 10 )); then
        note "WARNING: the machine is already ${busy}% busy before the benchmark starts:"
        ps -eo pid,pcpu,comm --sort=-pcpu | sed -n '2,4p' | sed 's/^/bench:     /' >&2
        note "results will be noisy; rerun on a quiet machine for numbers worth keeping"
    fi
}

# --------------------------------------------------------------- start ------
busy_check
note "work dir $WORK; ports: upstream $UP_PORT, nginx $NGX_PORT, gatehouse $GH_PORT (admin $GH_ADMIN_PORT), gatehouse-quiet $GHQ_PORT (admin $GHQ_ADMIN_PORT), gatehouse-traced $GHT_PORT (admin $GHT_ADMIN_PORT), pingora-bare $BARE_PORT, pingora-minimum $MIN_PORT"

"$NGINX_BIN" -t -q -p "$WORK" -e "$WORK/upstream-error.log" -c "$WORK/upstream.conf" 2>"$WORK/upstream.log" \
    || { show_log "$WORK/upstream.log"; die "upstream nginx config rejected"; }
start_server upstream "$UPSTREAM_CPU" "$NGINX_BIN" -p "$WORK" -e "$WORK/upstream-error.log" -c "$WORK/upstream.conf" -g 'daemon off;'
wait_http upstream "http://127.0.0.1:$UP_PORT$REQ_PATH" "$WORK/upstream-error.log"

if need_server nginx; then
    "$NGINX_BIN" -t -q -p "$WORK" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf" 2>"$WORK/nginx.log" \
        || { show_log "$WORK/nginx.log"; die "nginx proxy config rejected"; }
    start_server nginx "$SERVER_CPU" "$NGINX_BIN" -p "$WORK" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf" -g 'daemon off;'
    wait_http nginx "http://127.0.0.1:$NGX_PORT$REQ_PATH" "$WORK/nginx-error.log"
fi

# start_gatehouse NAME ADMIN_PORT [HINT]: check $WORK/NAME.yaml with -t, start it
# pinned to SERVER_CPU and wait for its admin /healthz.
start_gatehouse() {
    local name=$1 admin=$2 hint=${3:-}
    "$GATEHOUSE_BIN" -t -c "$WORK/$name.yaml" >"$WORK/$name-check.log" 2>&1 \
        || { show_log "$WORK/$name-check.log"; die "gatehouse rejected the generated config $WORK/$name.yaml$hint"; }
    start_server "$name" "$SERVER_CPU" "$GATEHOUSE_BIN" -c "$WORK/$name.yaml"
    wait_http "$name" "http://127.0.0.1:$admin/healthz" "$WORK/$name.log"
}
if [[ -n $CLUSTER_LINES ]]; then
    start_server redis "$SERVER_CPU" "$REDIS_BIN" --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no
    for ((i = 0; i < 100; i++)); do
        python3 -c 'import socket,sys; s=socket.create_connection(("127.0.0.1",int(sys.argv[1]))); s.sendall(b"PING\r\n"); sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)' "$REDIS_PORT" 2>/dev/null && break
        sleep 0.1
    done
fi
if need_server gatehouse; then
    start_gatehouse gatehouse "$GH_ADMIN_PORT"
    if [[ -n $CLUSTER_LINES ]]; then
        for ((i = 0; i < 100; i++)); do
            curl -s "http://127.0.0.1:$GH_ADMIN_PORT/readyz" | grep -q '"store":"up"' && break
            sleep 0.1
        done
        curl -s "http://127.0.0.1:$GH_ADMIN_PORT/readyz" | grep -q '"store":"up"' || die "gatehouse did not connect to redis-server on port $REDIS_PORT"
    fi
fi
if need_server pingora-bare; then
    # Transparent huge pages off, as gatehouse sets for itself, so RSS compares.
    start_server pingora-bare "$SERVER_CPU" env MIMALLOC_ALLOW_THP=0 "$BARE_BIN" "127.0.0.1:$BARE_PORT" "127.0.0.1:$UP_PORT"
    wait_http pingora-bare "http://127.0.0.1:$BARE_PORT$REQ_PATH" "$WORK/pingora-bare.log"
fi
if need_server pingora-minimum; then
    start_server pingora-minimum "$SERVER_CPU" env MIMALLOC_ALLOW_THP=0 "$BARE_BIN" "127.0.0.1:$MIN_PORT" "127.0.0.1:$UP_PORT" minimum
    wait_http pingora-minimum "http://127.0.0.1:$MIN_PORT$REQ_PATH" "$WORK/pingora-minimum.log"
fi
if need_server gatehouse-quiet; then
    start_gatehouse gatehouse-quiet "$GHQ_ADMIN_PORT" \
        " (it sets server.metrics: false; a binary older than that option refuses it: rebuild, or leave gatehouse-quiet out of TARGETS)"
fi
if need_server gatehouse-traced; then
    start_gatehouse gatehouse-traced "$GHT_ADMIN_PORT"
fi

for name in "${SELECTED[@]}"; do check_target "$name"; done

# Machine and version info, for the report.
CPU_MODEL=$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)
CPU_MODEL=${CPU_MODEL:-$(uname -m)}
KERNEL=$(uname -sr)
NOW=$(date -u '+%Y-%m-%d %H:%M UTC')
NGINX_VER=$({ "$NGINX_BIN" -v 2>&1 || true; } | sed -n 's|.*nginx/||p')
WRK_VER=$({ "$WRK_BIN" -v 2>&1 || true; } | awk 'NR == 1 { v = $2; sub(/^debian\//, "", v); print v }')
GH_VER=-
if need_gatehouse; then
    GH_VER=$("$GATEHOUSE_BIN" --version 2>/dev/null | awk '{ print $NF }' || true)
    rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true)
    if [[ -n $rev ]]; then
        git -C "$ROOT" diff --quiet HEAD 2>/dev/null || rev+="-dirty"
        GH_VER+=" ($rev)"
    fi
    # The binary itself (target/release, target/pgo/release, ...), not just its profile name.
    GH_VER+=" ${GATEHOUSE_BIN#"$ROOT"/}"
fi

# --------------------------------------------------------------- load -------
printf 'round\ttarget\trps\tp50_ms\tp99_ms\tcpu_us_per_req\thwm_kib\trequests\terrors\tupstream_cpu_us_per_req\tother_cpu_pct\n' >"$RESULTS"
n=${#SELECTED[@]}
note "${ROUNDS} x ${DURATION}s rounds, c${CONNS}, targets: ${SELECTED[*]}; servers on CPU $SERVER_CPU (upstream CPU $UPSTREAM_CPU), wrk on CPU $LOAD_CPU"
if (( WARMUP > 0 )); then
    note "warm-up (${WARMUP}s per target, thrown away)"
    for name in "${SELECTED[@]}"; do
        run_wrk "$name" "$WARMUP" "$WORK/wrk/warmup-$name.txt"
        sleep "$PAUSE"
    done
fi
for ((r = 1; r <= ROUNDS; r++)); do
    order=()
    for ((i = 0; i < n; i++)); do order+=("${SELECTED[(i + r - 1) % n]}"); done
    note "round $r/$ROUNDS: ${order[*]}"
    for name in "${order[@]}"; do
        run_wrk "$name" "$DURATION" "$WORK/wrk/r$r-$name.txt" "$r"
        sleep "$PAUSE"
    done
done

# gatehouse must really have logged every request: lines in the file and none
# dropped (a writer that falls behind drops lines, making logging look cheaper).
if need_server gatehouse; then
    log_lines=0 log_mib=0
    if [[ -f $WORK/access.log ]]; then
        log_lines=$(wc -l <"$WORK/access.log")
        log_mib=$(( $(stat -c %s "$WORK/access.log") / 1048576 ))
    fi
    dropped=$(curl -s --max-time 2 "http://127.0.0.1:$GH_ADMIN_PORT/metrics" \
        | awk '/^gatehouse_access_log_dropped_total/ { print $2 + 0 }' || true)
    note "gatehouse access log: $log_lines lines, $log_mib MiB, ${dropped:-?} dropped"
    (( log_lines > 0 )) || note "WARNING: gatehouse wrote nothing to $WORK/access.log; its figures do not include logging"
    [[ ${dropped:-0} == 0 ]] || note "WARNING: gatehouse dropped $dropped access-log lines (its writer fell behind); the cost of logging is understated"
fi
# gatehouse-traced must really have recorded and exported its share of spans.
if need_server gatehouse-traced; then
    traced=$(curl -s --max-time 2 "http://127.0.0.1:$GHT_ADMIN_PORT/metrics" \
        | awk '/^gatehouse_trace_spans_dropped_total/ { print $2 + 0 }' || true)
    note "gatehouse-traced: ${traced:-?} spans dropped"
    [[ ${traced:-0} == 0 ]] || note "WARNING: gatehouse-traced dropped $traced spans (the export fell behind or failed); the cost of tracing is understated"
fi

# --------------------------------------------------------------- report -----
MACHINE="machine: $NCPU CPUs (nproc), $CPU_MODEL, $KERNEL; $NOW"
SETUP="setup: ${ROUNDS} × ${DURATION}s rounds (+ ${WARMUP}s warm-up), wrk -t1 -c${CONNS} on CPU ${LOAD_CPU}; servers on CPU ${SERVER_CPU}, upstream on CPU ${UPSTREAM_CPU}; nginx ${NGINX_VER} (1 worker), wrk ${WRK_VER}, gatehouse ${GH_VER}"
python3 - "$RESULTS" "${SELECTED[*]}" "$MACHINE" "$SETUP" <<'PY'
import sys, statistics as st
from collections import defaultdict

path, order, machine, setup = sys.argv[1], sys.argv[2].split(), sys.argv[3], sys.argv[4]
rows = [l.rstrip("\n").split("\t") for l in open(path)][1:]
by = defaultdict(list)          # target -> rows
rps_round = defaultdict(dict)   # round -> target -> rps
for r in rows:
    by[r[1]].append(r)
    rps_round[r[0]][r[1]] = float(r[2])

def med(vals):
    vals = [float(v) for v in vals if v != "-"]
    return st.median(vals) if vals else None

def fmt(v, spec):
    return "-" if v is None else format(v, spec)

def rps_str(v):
    return "-" if v is None else (f"{v/1000:.1f}k" if v >= 10000 else f"{v:.0f}")

nginx_cpu = med(r[5] for r in by["nginx"]) if "nginx" in by else None
table = []
errors = 0
for t in order:
    rs = by[t]
    errors += sum(int(r[8]) for r in rs)
    ratios = [rps_round[k][t] / rps_round[k]["nginx"] for k in rps_round
              if "nginx" in rps_round[k] and t in rps_round[k]]
    hwm = [float(r[6]) for r in rs if r[6] != "-"]
    cpu = med(r[5] for r in rs)
    table.append([
        t,
        rps_str(med(r[2] for r in rs)),
        fmt(med(r[3] for r in rs), ".3f"),
        fmt(med(r[4] for r in rs), ".3f"),
        fmt(cpu, ".1f"),
        fmt(cpu / nginx_cpu if cpu is not None and nginx_cpu else None, ".2f"),
        fmt(max(hwm) / 1024 if hwm else None, ".1f"),
        fmt(st.median(ratios) if ratios else None, ".2f"),
    ])

head = ["target", "rps", "p50 ms", "p99 ms", "CPU µs/req", "CPU × nginx", "peak RSS MiB", "× nginx"]
notes = ("medians over rounds; × nginx = median of per-round rps ratios; "
         "CPU = utime+stime of the server's processes / requests; CPU × nginx = ratio of the median CPU figures; "
         "peak RSS = VmHWM summed over the server's processes")
if "gatehouse" in order and "gatehouse-quiet" in order:
    notes += ("; metrics+log vs quiet = median of per-round rps ratios gatehouse / gatehouse-quiet "
              "(same routes; gatehouse-quiet has server.metrics: false and access_log: off)")

# Price of metrics + access log: median of the per-round rps ratios
# gatehouse / gatehouse-quiet (both selected only).
def round_ratio(a, b):
    q = [rps_round[k][a] / rps_round[k][b] for k in rps_round
         if a in rps_round[k] and b in rps_round[k]]
    return st.median(q) if q else None

obs = []
if round_ratio("gatehouse", "gatehouse-quiet") is not None:
    obs.append(f"gatehouse with metrics+log vs quiet: {round_ratio('gatehouse', 'gatehouse-quiet'):.2f}× rps")
for g in ("gatehouse", "gatehouse-quiet"):
    if round_ratio(g, "pingora-bare") is not None:
        obs.append(f"{g} vs pingora-bare (Pingora alone): {round_ratio(g, 'pingora-bare'):.2f}× rps")
    if round_ratio(g, "pingora-minimum") is not None:
        obs.append(f"{g} vs pingora-minimum (Pingora doing the SPEC's least): {round_ratio(g, 'pingora-minimum'):.2f}× rps")
if round_ratio("pingora-minimum", "pingora-bare") is not None:
    obs.append(f"pingora-minimum vs pingora-bare (the SPEC's least vs nothing): {round_ratio('pingora-minimum', 'pingora-bare'):.2f}× rps")
if round_ratio("gatehouse-auth", "gatehouse") is not None:
    obs.append(f"gatehouse-auth vs gatehouse (auth + limit vs plain): {round_ratio('gatehouse-auth', 'gatehouse'):.2f}× rps")
if round_ratio("gatehouse-traced", "gatehouse") is not None:
    obs.append(f"gatehouse-traced vs gatehouse (tracing at sample 0.01 vs none): {round_ratio('gatehouse-traced', 'gatehouse'):.2f}× rps")
if round_ratio("gatehouse-split", "gatehouse") is not None:
    obs.append(f"gatehouse-split vs gatehouse (a 90/10 split vs one upstream): {round_ratio('gatehouse-split', 'gatehouse'):.2f}× rps")
if round_ratio("gatehouse-gzip", "nginx-gzip") is not None:
    obs.append(f"gatehouse-gzip vs nginx-gzip (compressed JSON, gzip level 6): "
               f"{round_ratio('gatehouse-gzip', 'nginx-gzip'):.2f}× rps")
if round_ratio("gatehouse-cluster", "gatehouse-limit") is not None:
    p50_round = defaultdict(dict)
    for r in rows:
        p50_round[r[0]][r[1]] = float(r[3])
    d = [p50_round[k]["gatehouse-cluster"] - p50_round[k]["gatehouse-limit"] for k in p50_round
         if "gatehouse-cluster" in p50_round[k] and "gatehouse-limit" in p50_round[k]]
    obs.append(f"gatehouse-cluster vs gatehouse-limit (limit counted in Redis vs here): "
               f"{round_ratio('gatehouse-cluster', 'gatehouse-limit'):.2f}× rps, p50 {st.median(d):+.3f} ms")

w = [max(len(str(row[i])) for row in [head] + table) for i in range(len(head))]
print()
print("  ".join(h.ljust(w[i]) if i == 0 else h.rjust(w[i]) for i, h in enumerate(head)))
for row in table:
    print("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)))
for o in obs:
    print(o)
print(machine)
print(setup)
if errors:
    print(f"WARNING: {errors} non-2xx responses or socket errors during measured runs; see the per-run lines")
other = [float(r[10]) for r in rows]
if other and max(other) > 5:
    print(f"WARNING: other processes used up to {max(other):.0f}% of the machine during measured runs "
          f"(median {st.median(other):.0f}%); these numbers are contaminated, rerun on a quiet machine")

print()
print("Markdown:")
print()
print("| " + " | ".join(head) + " |")
print("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
for row in table:
    print("| " + " | ".join(c if c != "-" else "–" for c in row) + " |")
print()
for o in obs:
    print(o + "  ")   # its own paragraph: a line right under a table would become a row
if obs:
    print()
cap = lambda x: x[:1].upper() + x[1:]
print(cap(machine) + "  ")
print(cap(setup) + "  ")
print(cap(notes) + ".")
PY

STATUS=0
