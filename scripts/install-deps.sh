#!/usr/bin/env bash
# Installs what building gatehouse needs on a fresh Debian/Ubuntu machine:
# cmake (Pingora's zlib-ng), a C/C++ compiler, pkg-config and OpenSSL headers;
# for the tests, systemd-analyze, redis-server (the cluster tests start
# their own; bench/run.sh's gatehouse-cluster target too), chromium
# (the dashboard test renders the page headless) and promtool (package
# prometheus; the metrics test lints /metrics with it).
# A Rust toolchain (rustup, 1.88 or newer) is assumed.
set -euo pipefail
need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(gcc)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v make >/dev/null 2>&1 || need+=(make)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
if ! pkg-config --exists openssl 2>/dev/null; then need+=(libssl-dev); fi
# The tests check the shipped unit file with systemd-analyze.
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# The cluster tests run a real Redis.
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
# The dashboard test loads the page in a real headless browser.
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# The metrics test lints /metrics with Prometheus's promtool.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${need[*]}"
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}"
