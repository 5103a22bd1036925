#!/usr/bin/env bash
# A release build optimised with a profile of gatehouse's own traffic
# (profile-guided optimisation, as rustc itself is built): the compiler
# lays out and inlines the code a request runs by how often it runs. On
# the 2-CPU benchmark machine it made the plain route some 15% faster
# (bench/README.md). It changes no behaviour: same sources, same tests.
#
#   scripts/build-pgo.sh
#   # -> target/pgo/release/gatehouse and target/pgo/release/examples/bare_proxy
#   GATEHOUSE_BIN=target/pgo/release/gatehouse BARE_BIN=target/pgo/release/examples/bare_proxy bench/run.sh
#
# Steps: an instrumented build (target/pgo-gen), a training run of half a
# minute (an nginx upstream, gatehouse on the benchmark's routes and
# examples/bare_proxy under wrk; the profile of each binary is its own
# traffic), `llvm-profdata merge`, the optimised build (target/pgo). Two
# release builds: about 15 minutes on 2 cores.
#
# Needs rustup's `llvm-tools` component (added here when missing), nginx,
# wrk, curl, python3 and openssl (`apt-get install -y nginx-light wrk`).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GEN_DIR=${PGO_GEN_DIR:-$ROOT/target/pgo-gen}
OUT_DIR=${PGO_TARGET_DIR:-$ROOT/target/pgo}
TRAIN_SECONDS=${TRAIN_SECONDS:-4}
NGINX_BIN=${NGINX_BIN:-$(command -v nginx || echo /usr/sbin/nginx)}
die() { echo "build-pgo: $*" >&2; exit 1; }

for tool in wrk curl python3 openssl rustup; do
    command -v "$tool" >/dev/null || die "'$tool' is required (apt-get install -y nginx-light wrk)"
done
[[ -x $NGINX_BIN ]] || die "nginx not found (apt-get install -y nginx-light, or set NGINX_BIN)"
find_profdata() { find "$(rustc --print sysroot)/lib/rustlib" -name llvm-profdata -type f 2>/dev/null | head -1; }
PROFDATA=$(find_profdata)
if [[ -z $PROFDATA ]]; then
    rustup component add llvm-tools >&2
    PROFDATA=$(find_profdata)
fi
[[ -n $PROFDATA ]] || die "llvm-profdata not found after 'rustup component add llvm-tools'"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-pgo.XXXXXX")
SERVER_PID=""
cleanup() {
    [[ -n $SERVER_PID ]] && kill -KILL "$SERVER_PID" 2>/dev/null || true
    [[ -f $WORK/upstream.pid ]] && kill "$(cat "$WORK/upstream.pid")" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

build() {
    # Both binaries in one build, so the floor the benchmark compares with
    # is optimised the same way.
    RUSTFLAGS="${RUSTFLAGS:-} $1" cargo build --release --locked --bins --example bare_proxy \
        --manifest-path "$ROOT/Cargo.toml" --target-dir "$2"
}

echo "build-pgo: instrumented build in $GEN_DIR" >&2
# Build scripts and proc macros are instrumented too; their profiles land
# in build/ and are not merged.
build "-Cprofile-generate=$WORK/build" "$GEN_DIR"

. "$ROOT/bench/lib.sh"
UP=$(free_port); GH=$(free_port); ADMIN=$(free_port)
TOKEN=$(mint_token)
upstream_nginx_conf "$WORK" "$UP" >"$WORK/upstream.conf"
"$NGINX_BIN" -c "$WORK/upstream.conf" -p "$WORK"
cat >"$WORK/gatehouse.yaml" <<EOF
server:
  threads: 1
  pid_file: $WORK/gatehouse.pid
  upgrade_sock: $WORK/upgrade.sock
listen: [127.0.0.1:$GH]
admin: { listen: 127.0.0.1:$ADMIN }
access_log: $WORK/access.log
$(gatehouse_routes "$UP")
EOF

# serve NAME COMMAND...: starts a server on $GH, waits until it answers.
serve() {
    local name=$1 i
    shift
    LLVM_PROFILE_FILE="$WORK/train/$name-%p.profraw" "$@" >"$WORK/$name.log" 2>&1 &
    SERVER_PID=$!
    for ((i = 0; i < 100; i++)); do
        curl -sf -o /dev/null "http://127.0.0.1:$GH/v1/users/7" && return
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    cat "$WORK/$name.log" >&2
    die "$name did not start"
}
# stop: SIGINT is Pingora's fast shutdown; the profile is written at exit.
stop() {
    kill -INT "$SERVER_PID"
    wait "$SERVER_PID" || true
    SERVER_PID=""
}
load() { wrk -t1 -c64 -d"${TRAIN_SECONDS}s" "$@" >/dev/null; }

echo "build-pgo: training" >&2
serve gatehouse "$GEN_DIR/release/gatehouse" -c "$WORK/gatehouse.yaml"
load "http://127.0.0.1:$GH/v1/users/7"
load -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$GH/auth/v1/users/7"
load "http://127.0.0.1:$GH/limited/v1/users/7"
load "http://127.0.0.1:$GH/split/v1/users/7"
load -H "Accept-Encoding: gzip" "http://127.0.0.1:$GH/gzip/v1/users/7"
load "http://127.0.0.1:$GH/cached/v1/users/7"
stop
serve bare "$GEN_DIR/release/examples/bare_proxy" "127.0.0.1:$GH" "127.0.0.1:$UP"
load "http://127.0.0.1:$GH/v1/users/7"
stop
ls "$WORK"/train/gatehouse-*.profraw "$WORK"/train/bare-*.profraw >/dev/null 2>&1 \
    || die "the training run wrote no profile"

mkdir -p "$OUT_DIR"
"$PROFDATA" merge -o "$OUT_DIR/gatehouse.profdata" "$WORK"/train/*.profraw
echo "build-pgo: optimised build in $OUT_DIR" >&2
build "-Cprofile-use=$OUT_DIR/gatehouse.profdata" "$OUT_DIR"
echo "build-pgo: $OUT_DIR/release/gatehouse" >&2
