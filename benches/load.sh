#!/usr/bin/env bash
# The load benchmark of issue 4: hyper 1 on one tokio thread, bare and behind MatrixAuthLayer
# (without and with the verified-token cache), each under wrk with every request carrying the
# same valid token, on 127.0.0.1 only. Rounds alternate the modes (in a rotating order) so that
# a busy machine disturbs them alike; the ratios are of medians over rounds. Besides wrk's requests/s and
# latencies, it reports the server's CPU time per request (from /proc), and the user-space part
# of it: on a machine other jobs share, that is the steadier measure of what the layer costs
# (capacity = 1 / CPU per request). The system part is the kernel's loopback TCP; the layer
# makes no system call, yet that part grows too when the layer runs (see the README).
#
#   benches/load.sh                 # 3 rounds of 10 s per mode, 64 connections, plain hyper
#   benches/load.sh homeserver      # the same against the example homeserver (axum, TraceLayer,
#                                   # CORS, the revocation store), on one tokio worker; "bare" is
#                                   # that server with MATRIX_INSECURE_NO_AUTH_AS (the identity
#                                   # given for free), "layered" sets MATRIX_TOKEN_CACHE=0
#   ROUNDS=5 DURATION=20 benches/load.sh
#   NICE=-20 benches/load.sh        # on a shared machine (as root): server and wrk get the
#                                   # scheduler's preference, so other jobs disturb them less
#
# Needs wrk (`apt-get install -y wrk`). Bounded in time: every server stops itself after
# DURATION+30 s even if this script is killed, and is killed on exit in any case.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
WARMUP=${WARMUP:-2}
PATH_=/_matrix/client/v3/account/whoami
TARGET=${1:-hyper}
case "$TARGET" in
  hyper | homeserver) ;;
  *) echo "usage: $0 [hyper|homeserver]" >&2; exit 2 ;;
esac

command -v wrk >/dev/null || { echo "wrk not found (apt-get install -y wrk)" >&2; exit 1; }

if [ "$TARGET" = hyper ]; then
  echo "==> building the load server (release)" >&2
  server=$(cargo bench --no-run --bench load_server --message-format=json-render-diagnostics 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
  [ -x "$server" ] || { echo "could not build benches/load_server.rs" >&2; exit 1; }
else
  echo "==> building the example homeserver (release)" >&2
  cargo build --release --example homeserver >&2
  server=target/release/examples/homeserver
fi

# One core for the server, the other for wrk, when there are two or more.
pin_server=() pin_wrk=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  pin_server=(taskset -c 0) pin_wrk=(taskset -c 1)
fi
if [ -n "${NICE:-}" ]; then
  pin_server=(nice -n "$NICE" "${pin_server[@]}") pin_wrk=(nice -n "$NICE" "${pin_wrk[@]}")
fi

work=$(mktemp -d)
server_pid=
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=
  fi
}
trap 'stop_server; rm -rf "$work"' EXIT INT TERM

# Starts the server in mode $1 on a free loopback port; sets $url and $token.
start_server() {
  if [ "$TARGET" = hyper ]; then
    "${pin_server[@]}" "$server" --mode "$1" --addr 127.0.0.1:0 \
      --max-seconds $((DURATION + WARMUP + 30)) >"$work/server.out" 2>"$work/server.err" &
  else
    local no_auth="" cache=""
    case "$1" in
      bare) no_auth=@alice:localhost ;;
      layered) cache=0 ;;
    esac
    # `timeout` bounds the server like load_server's --max-seconds; logs at info (the
    # per-request lines are debug), as a production homeserver would run.
    MATRIX_LISTEN=127.0.0.1:0 MATRIX_MACAROON_SECRET=load-benchmark-secret \
      MATRIX_PRINT_TOKEN_FOR=@alice:localhost MATRIX_WORKER_THREADS=1 \
      MATRIX_INSECURE_NO_AUTH_AS="$no_auth" MATRIX_TOKEN_CACHE="$cache" RUST_LOG="${LOG:-info}" \
      "${pin_server[@]}" timeout $((DURATION + WARMUP + 30)) "$server" \
      >"$work/server.out" 2>"$work/server.err" &
  fi
  server_pid=$!
  for _ in $(seq 100); do
    grep -q '^listening on ' "$work/server.out" 2>/dev/null && break
    sleep 0.05
  done
  url=$(sed -n 's/^listening on //p' "$work/server.out")
  if [ "$TARGET" = hyper ]; then
    token=$(sed -n 's/^token //p' "$work/server.out")
    cpu_pid=$server_pid
  else
    token=$(head -n 1 "$work/server.out")
    cpu_pid=$(pgrep -P "$server_pid" | head -n 1) # the homeserver, not `timeout`
  fi
  case "$url" in
    http://127.0.0.1:*) ;;
    *) echo "server did not start on loopback: '$url'" >&2; cat "$work/server.err" >&2; exit 1 ;;
  esac
}

# Converts wrk's latency (`812.00us`, `1.23ms`, `2.00s`) to microseconds.
to_us() {
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) print n; else if (v ~ /ms$/) print n * 1000; else if (v ~ /s$/) print n * 1000000; else print n
  }'
}

# The server's CPU time so far, user and system, in clock ticks.
cpu_ticks() { awk '{print $14, $15}' "/proc/$cpu_pid/stat"; }

run() { # mode round
  start_server "$1"
  "${pin_wrk[@]}" wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" -H "Authorization: Bearer $token" \
    "$url$PATH_" >/dev/null
  local user_before sys_before user_after sys_after
  read -r user_before sys_before < <(cpu_ticks)
  "${pin_wrk[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency \
    -H "Authorization: Bearer $token" "$url$PATH_" >"$work/wrk.out"
  read -r user_after sys_after < <(cpu_ticks)
  stop_server
  local rps p50 p99 non2xx errors requests cpu_us user_us
  rps=$(awk '/^Requests\/sec:/ {print $2}' "$work/wrk.out")
  requests=$(awk '/ requests in / {print $1}' "$work/wrk.out")
  per_request() { awk -v t="$1" -v hz="$(getconf CLK_TCK)" -v n="$requests" 'BEGIN { print t * 1000000 / hz / n }'; }
  cpu_us=$(per_request $((user_after - user_before + sys_after - sys_before)))
  user_us=$(per_request $((user_after - user_before)))
  p50=$(to_us "$(awk '$1 == "50%" {print $2}' "$work/wrk.out")")
  p99=$(to_us "$(awk '$1 == "99%" {print $2}' "$work/wrk.out")")
  non2xx=$(awk '/Non-2xx or 3xx responses:/ {print $NF}' "$work/wrk.out")
  errors=$(awk '/Socket errors:/ {gsub(",", ""); print $4 + $6 + $8 + $10}' "$work/wrk.out")
  printf '%s %s %s %s %s %s %s %s %s\n' "$1" "$2" "$rps" "$p50" "$p99" "${non2xx:-0}" \
    "${errors:-0}" "$cpu_us" "$user_us" >>"$work/results"
  printf '  round %s %-8s %8.0f req/s  p50 %6.0f us  p99 %6.0f us  server CPU %5.2f us/req (user %5.2f)  non-2xx %s  socket errors %s\n' \
    "$2" "$1" "$rps" "$p50" "$p99" "$cpu_us" "$user_us" "${non2xx:-0}" "${errors:-0}" >&2
}

echo "==> $ROUNDS rounds x (bare, layered, cached), ${DURATION}s each, $CONNECTIONS connections," \
  "1 server thread, wrk 1 thread, loopback, server: $TARGET" >&2
# The order rotates every round (bare first, then layered first, then cached first): a server
# started right after another, or a machine that speeds up or slows down within a round, then
# favours no mode.
modes=(bare layered cached)
for round in $(seq "$ROUNDS"); do
  for i in 0 1 2; do
    run "${modes[$(((round - 1 + i) % 3))]}" "$round"
  done
done

awk '
  function median(list, n,    sorted, i, j, t) {
    for (i = 1; i <= n; i++) sorted[i] = list[i]
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (sorted[j] < sorted[i]) { t = sorted[i]; sorted[i] = sorted[j]; sorted[j] = t }
    return (n % 2) ? sorted[(n + 1) / 2] : (sorted[n / 2] + sorted[n / 2 + 1]) / 2
  }
  { n[$1]++; rps[$1, n[$1]] = $3; p50[$1, n[$1]] = $4; p99[$1, n[$1]] = $5; bad[$1] += $6 + $7; cpu[$1, n[$1]] = $8; user[$1, n[$1]] = $9 }
  END {
    split("bare layered cached", modes, " ")
    printf "\n| server (median of %d rounds) | req/s | vs bare | p50 | p99 | errors | server CPU per request | of which user space | capacity vs bare |\n", n["bare"]
    print "|---|---|---|---|---|---|---|---|---|"
    for (m = 1; m <= 3; m++) {
      mode = modes[m]
      for (i = 1; i <= n[mode]; i++) { r[i] = rps[mode, i]; a[i] = p50[mode, i]; b[i] = p99[mode, i]; c[i] = cpu[mode, i]; u[i] = user[mode, i] }
      med[mode] = median(r, n[mode])
      medcpu[mode] = median(c, n[mode])
      meduser[mode] = median(u, n[mode])
      printf "| %s | %.0f | %.1f%% | %.0f us | %.0f us | %d | %.2f us | %.2f us | %.1f%% |\n", mode, med[mode], 100 * med[mode] / med["bare"], median(a, n[mode]), median(b, n[mode]), bad[mode], medcpu[mode], meduser[mode], 100 * medcpu["bare"] / medcpu[mode]
    }
    # Same-round ratios too: they cancel a machine that slows down between rounds.
    for (m = 2; m <= 3; m++) {
      mode = modes[m]
      for (i = 1; i <= n[mode]; i++) q[i] = rps[mode, i] / rps["bare", i]
      printf "%s / bare, median of same-round ratios: %.1f%% (goal: %s)\n", mode, 100 * median(q, n[mode]), (mode == "layered") ? ">= 90%" : ">= 97%"
    }
  }' "$work/results"
