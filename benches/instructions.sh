#!/usr/bin/env bash
# What the layer costs a server in instructions per request, counted by valgrind's callgrind:
# the same figure on every run of the same build, however busy the machine, where the
# requests/s of benches/load.sh vary by ±15% on a shared one. Each mode's server runs under
# callgrind twice, once for SMALL and once for LARGE requests (benches/exact_requests.py, every
# answer checked); the difference of the two totals divided by LARGE - SMALL is the cost of one
# request, with start-up and shutdown cancelled out.
#
#   benches/instructions.sh               # the example homeserver (axum, TraceLayer, CORS, ...)
#   benches/instructions.sh hyper         # plain hyper answering `200 ok`
#   SMALL=1000 LARGE=11000 benches/instructions.sh
#   KEEP=/tmp/counts benches/instructions.sh  # keeps the callgrind files, for callgrind_annotate
#   MODES="bare cached" benches/instructions.sh  # some modes only (the layered one is the slowest)
#   REPEAT=7 benches/instructions.sh      # each mode counted 7 times, the median reported: the
#                                         # per-process hash seeds move the homeserver's count
#                                         # by several hundred from one run to the next
#
# Read the "cached" row first. valgrind's CPU has no SHA extensions, so under it sha2 falls back
# to its portable code, and a full verification (the "layered" row) counts many more
# instructions than it runs natively with SHA-NI; a cache hit computes no SHA-256 at all. Instructions are not
# time either: what they miss (caches, branch prediction, the kernel's share of a request,
# about half of it on loopback) is what load.sh measures.
#
# Needs valgrind and python3 (`apt-get install -y valgrind`). Servers bind 127.0.0.1 only and are
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

SMALL=${SMALL:-1000}
REPEAT=${REPEAT:-1}
LARGE=${LARGE:-6000}
TARGET=${1:-homeserver}
case "$TARGET" in
  hyper) path=/ ;;
  homeserver) path=/_matrix/client/v3/account/whoami ;;
  *) echo "usage: $0 [homeserver|hyper]" >&2; exit 2 ;;
esac
command -v valgrind >/dev/null || { echo "valgrind not found (apt-get install -y valgrind)" >&2; exit 1; }

if [ "$TARGET" = hyper ]; then
  echo "==> building the load server (release)" >&2
  server=$(cargo build --release -p tower-matrix-auth-tools --bin load_server \
    --message-format=json-render-diagnostics 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
  [ -x "$server" ] || { echo "could not build tools/src/bin/load_server.rs" >&2; exit 1; }
else
  echo "==> building the example homeserver (release)" >&2
  cargo build --release --example homeserver >&2
  server=target/release/examples/homeserver
fi

work=$(mktemp -d)
server_pid=
stop_server() {
  if [ -n "$server_pid" ]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}
trap 'stop_server; rm -rf "$work"' EXIT INT TERM

# Runs mode $1 under callgrind for $2 requests; sets $counted to the instructions counted.
# (Not in a command substitution: that subshell would not see the exit trap that stops the
# server if something fails.)
count() {
  local mode=$1 requests=$2 out="$work/callgrind.$1.$2"
  : >"$work/server.out"
  if [ "$TARGET" = hyper ]; then
    valgrind --tool=callgrind --callgrind-out-file="$out" "$server" --mode "$mode" \
      --addr 127.0.0.1:0 --max-seconds 600 >"$work/server.out" 2>"$work/server.err" &
  else
    local no_auth="" cache=""
    case "$mode" in
      bare) no_auth=@alice:localhost ;;
      layered) cache=0 ;;
    esac
    MATRIX_LISTEN=127.0.0.1:0 MATRIX_MACAROON_SECRET=instruction-count-secret \
      MATRIX_PRINT_TOKEN_FOR=@alice:localhost MATRIX_WORKER_THREADS=1 \
      MATRIX_INSECURE_NO_AUTH_AS="$no_auth" MATRIX_TOKEN_CACHE="$cache" RUST_LOG="${LOG:-info}" \
      valgrind --tool=callgrind --callgrind-out-file="$out" "$server" \
      >"$work/server.out" 2>"$work/server.err" &
  fi
  server_pid=$!
  for _ in $(seq 600); do
    grep -q '^listening on ' "$work/server.out" && break
    sleep 0.1
  done
  local url token
  url=$(sed -n 's/^listening on //p' "$work/server.out")
  case "$url" in
    http://127.0.0.1:*) ;;
    *) echo "server did not start on loopback: '$url'" >&2; cat "$work/server.err" >&2; exit 1 ;;
  esac
  if [ "$TARGET" = hyper ]; then
    token=$(sed -n 's/^token //p' "$work/server.out")
  else
    token=$(head -n 1 "$work/server.out")
  fi
  python3 benches/exact_requests.py "$url$path" "$token" "$requests"
  stop_server
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$out" "$KEEP/"; fi
  counted=$(awk '/^summary:/ {print $2}' "$out")
  [ -n "$counted" ] || { echo "callgrind wrote no summary to $out" >&2; exit 1; }
}

echo "==> instructions per request: $TARGET, ($LARGE - $SMALL requests) under callgrind" >&2
for mode in ${MODES:-bare layered cached}; do
  runs=()
  for _ in $(seq "$REPEAT"); do
    count "$mode" "$SMALL"
    small=$counted
    count "$mode" "$LARGE"
    runs+=($(((counted - small) / (LARGE - SMALL))))
  done
  # The median run (the lower middle one for an even REPEAT).
  per=$(printf '%s\n' "${runs[@]}" | sort -n | sed -n "$(((REPEAT + 1) / 2))p")
  printf '  %-8s %8d instructions per request (runs: %s)\n' "$mode" "$per" "${runs[*]}" >&2
  echo "$mode $per" >>"$work/results"
done

awk '
  { per[$1] = $2 }
  END {
    printf "\n| %s | instructions per request | more than bare | bare / mode |\n", "'"$TARGET"'"
    print "|---|---|---|---|"
    split("bare layered cached", modes, " ")
    for (m = 1; m <= 3; m++) {
      mode = modes[m]
      if (!(mode in per)) continue
      if ("bare" in per) printf "| %s | %d | %+d | %.1f%% |\n", mode, per[mode], per[mode] - per["bare"], 100 * per["bare"] / per[mode]
      else printf "| %s | %d | | |\n", mode, per[mode]
    }
  }' "$work/results"
