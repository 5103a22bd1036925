#!/usr/bin/env bash
# Builds the fuzz targets in fuzz/ and runs each for SECONDS (default 60),
# starting from its seeds; fails on the first crash, whose input is left in
# fuzz/artifacts/TARGET/. Needs the nightly toolchain and cargo-fuzz
# (installed here when missing). See fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-60}"
targets=(head normalize json_rules xml_to_json placeholders config)
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: the nightly toolchain is missing (rustup toolchain install nightly)" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
# No sanitizer: the code fuzzed is safe Rust; panics, overflows and failed
# assertions are what is looked for.
flags=(-s none)
cargo +nightly fuzz build "${flags[@]}"
log=$(mktemp)
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target"
  echo "fuzz: $target for ${seconds}s"
  if ! cargo +nightly fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "fuzz: $target crashed; the input is in fuzz/artifacts/$target/" >&2
    exit 1
  fi
  grep -E '^Done|stat::number_of_executed_units' "$log" || true
done
rm -f "$log"
echo "fuzz: ${#targets[@]} targets ran ${seconds}s each without a crash"
