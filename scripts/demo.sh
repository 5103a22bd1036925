#!/usr/bin/env bash
# Builds gatehouse, starts the demo upstreams and runs the gateway on
# conf/gatehouse.yaml in the foreground. In another terminal:
#   curl -i localhost:8080/v1/users/7
# Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --bin gatehouse --example demo_upstreams
target/release/examples/demo_upstreams &
demo=$!
trap 'kill $demo 2>/dev/null || true' EXIT
target/release/gatehouse -t -c conf/gatehouse.yaml
echo "gatehouse on http://127.0.0.1:8080 (admin http://127.0.0.1:9901); try: curl -i localhost:8080/v1/users/7"
target/release/gatehouse -c conf/gatehouse.yaml
