#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ (see fuzz/fuzz_targets/*.rs and TESTING.md).
#
#   scripts/fuzz.sh short [SECONDS]     every target for SECONDS (default 10): what ./scripts/test.sh runs
#   scripts/fuzz.sh long [SECONDS]      every target for SECONDS (default 300), one after the other
#   scripts/fuzz.sh TARGET [SECONDS]    one target (verify, layer, caveat, differential, lifecycle),
#                                       default 300
#
# cargo-fuzz passes nightly-only flags to rustc (-Zsanitizer=address, the sancov passes);
# RUSTC_BOOTSTRAP=1 makes the one stable toolchain here accept them. Builds use AddressSanitizer
# and debug assertions (so overflow checks). The working corpus grows in fuzz/corpus/TARGET
# (ignored by git) on top of the committed seeds in fuzz/seeds/TARGET; a crash or a hang
# (-timeout, seconds per input) stops the run, leaves the input in fuzz/artifacts/TARGET and
# makes this script fail. A summary line per target gives executions, coverage (`cov:`, edges)
# and features (`ft:`).
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-short}
case "$mode" in
  short) seconds=${2:-10}; targets=(verify layer caveat differential lifecycle) ;;
  long) seconds=${2:-300}; targets=(verify layer caveat differential lifecycle) ;;
  verify | layer | caveat | differential | lifecycle) seconds=${2:-300}; targets=("$mode") ;;
  *) echo "usage: $0 short|long|TARGET [SECONDS]" >&2; exit 2 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked"
  cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
flags=(--sanitizer address --debug-assertions --release)
mkdir -p fuzz/artifacts
echo "building the fuzz targets (fuzz/artifacts/build.log)"
cargo fuzz build "${flags[@]}" >fuzz/artifacts/build.log 2>&1 || {
  tail -n 40 fuzz/artifacts/build.log >&2
  exit 1
}

declare -A dict=([verify]=fuzz/caveat.dict [caveat]=fuzz/caveat.dict [layer]=fuzz/layer.dict
  [differential]=fuzz/caveat.dict [lifecycle]=fuzz/lifecycle.dict)
summary=()
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target" "fuzz/artifacts/$target"
  log="fuzz/artifacts/$target/last-run.log"
  echo "fuzz $target: ${seconds}s"
  status=0
  cargo fuzz run "${flags[@]}" "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -dict="${dict[$target]}" >"$log" 2>&1 || status=$?
  runs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -n 1 || true)
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$log" | tail -n 1 || true)
  if [ "$status" -ne 0 ]; then
    echo "fuzz $target FAILED (exit $status); log: $log" >&2
    grep -E 'panicked|ERROR|SUMMARY|Test unit written' -A 4 "$log" | head -n 40 >&2 || true
    exit 1
  fi
  summary+=("$(printf '%-13s %s; %s' "$target" "${runs:-?}" "${cov:-?}")")
done
printf 'fuzz summary (%s s per target):\n' "$seconds"
printf '  %s\n' "${summary[@]}"
