#!/usr/bin/env bash
# The load benchmark of `docs/performance.md` ("Under load"): hyper 1 on one tokio thread, bare and behind MatrixAuthLayer
# (without and with the verified-token cache), each under wrk with every request carrying the
# same valid token, on 127.0.0.1 only. The three servers run side by side for the whole run and
# wrk loads them in turn, in short slices whose order rotates every round, so that a shared
# machine that speeds up or slows down disturbs the modes alike; "vs bare" is the median of
# same-round ratios. Besides wrk's requests/s and latencies, it reports the server's CPU time per
# request (from /proc), and the user-space part of it (capacity = 1 / CPU per request). The
# system part is the kernel's loopback TCP; the layer makes no system call.
#
#   benches/load.sh                 # 15 rounds of 3 s per mode, 64 connections, plain hyper
#   benches/load.sh homeserver      # the same against the example homeserver (axum, TraceLayer,
#                                   # CORS, the revocation store), on one tokio worker; "bare" is
#                                   # that server with MATRIX_INSECURE_NO_AUTH_AS (the identity
#                                   # given for free, its user id logged in the request span as
#                                   # the layer logs it), "layered" sets MATRIX_TOKEN_CACHE=0
#   ROUNDS=30 DURATION=5 benches/load.sh
#   NICE=-20 benches/load.sh        # on a shared machine (as root): server and wrk get the
#                                   # scheduler's preference, so other jobs disturb them less
#   SHARED=1 benches/load.sh [homeserver]
#                                   # the steadier cross-check on a noisy machine: bare and one
#                                   # layered mode loaded at the same time, both servers on the
#                                   # same core (which the scheduler shares out evenly) and each
#                                   # under half the connections; the ratio of their requests/s
#                                   # is the ratio of their capacities, measured in the very
#                                   # same seconds
#
# Needs wrk (`apt-get install -y wrk`). Bounded in time: every server stops itself once the run's
# planned time (plus a minute) is over, even if this script is killed, and is killed on exit in
# any case.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-15}
DURATION=${DURATION:-3}
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
  server=$(cargo build --release -p tower-matrix-auth-tools --bin load_server \
    --message-format=json-render-diagnostics 2>/dev/null \
    | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)
  [ -x "$server" ] || { echo "could not build tools/src/bin/load_server.rs" >&2; exit 1; }
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
declare -A server_pid url token cpu_pid
stop_servers() {
  local mode
  for mode in "${!server_pid[@]}"; do
    kill "${server_pid[$mode]}" 2>/dev/null || true
    wait "${server_pid[$mode]}" 2>/dev/null || true
  done
  server_pid=()
}
trap 'stop_servers; rm -rf "$work"' EXIT INT TERM

# All three servers stay up for the whole run, on the same core (idle ones cost nothing);
# wrk loads one at a time. Their time limit covers every slice, plus a margin.
LIFETIME=$((ROUNDS * 3 * (DURATION + 1) + 3 * (WARMUP + 1) + 60))

# Starts the server of mode $1 on a free loopback port; sets its url, token and pids.
start_server() {
  local mode=$1 out="$work/server.$1.out" err="$work/server.$1.err"
  if [ "$TARGET" = hyper ]; then
    "${pin_server[@]}" "$server" --mode "$mode" --addr 127.0.0.1:0 \
      --max-seconds "$LIFETIME" >"$out" 2>"$err" &
  else
    local no_auth="" cache=""
    case "$mode" in
      bare) no_auth=@alice:localhost ;;
      layered) cache=0 ;;
    esac
    # `timeout` bounds the server like load_server's --max-seconds; logs at info (the
    # per-request lines are debug), as a production homeserver would run.
    MATRIX_LISTEN=127.0.0.1:0 MATRIX_MACAROON_SECRET=load-benchmark-secret \
      MATRIX_PRINT_TOKEN_FOR=@alice:localhost MATRIX_WORKER_THREADS=1 \
      MATRIX_INSECURE_NO_AUTH_AS="$no_auth" MATRIX_TOKEN_CACHE="$cache" RUST_LOG="${LOG:-info}" \
      "${pin_server[@]}" timeout "$LIFETIME" "$server" >"$out" 2>"$err" &
  fi
  server_pid[$mode]=$!
  for _ in $(seq 100); do
    grep -q '^listening on ' "$out" 2>/dev/null && break
    sleep 0.05
  done
  url[$mode]=$(sed -n 's/^listening on //p' "$out")
  if [ "$TARGET" = hyper ]; then
    token[$mode]=$(sed -n 's/^token //p' "$out")
    cpu_pid[$mode]=${server_pid[$mode]}
  else
    token[$mode]=$(head -n 1 "$out")
    cpu_pid[$mode]=$(pgrep -P "${server_pid[$mode]}" | head -n 1) # the homeserver, not `timeout`
  fi
  case "${url[$mode]}" in
    http://127.0.0.1:*) ;;
    *) echo "server did not start on loopback: '${url[$mode]}'" >&2; cat "$err" >&2; exit 1 ;;
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
cpu_ticks() { awk '{print $14, $15}' "/proc/${cpu_pid[$1]}/stat"; }

warm_up() { # mode
  "${pin_wrk[@]}" wrk -t1 -c"$CONNECTIONS" -d"${WARMUP}s" -H "Authorization: Bearer ${token[$1]}" \
    "${url[$1]}$PATH_" >/dev/null
}

run() { # mode round
  local user_before sys_before user_after sys_after
  read -r user_before sys_before < <(cpu_ticks "$1")
  "${pin_wrk[@]}" wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency \
    -H "Authorization: Bearer ${token[$1]}" "${url[$1]}$PATH_" >"$work/wrk.out"
  read -r user_after sys_after < <(cpu_ticks "$1")
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

# Modes $1 and $2 at the same time, each under half the connections; appends both rates.
run_pair() { # bare-mode other-mode round
  local half=$((CONNECTIONS / 2)) mode pids=()
  for mode in "$1" "$2"; do
    "${pin_wrk[@]}" wrk -t1 -c"$half" -d"${DURATION}s" -H "Authorization: Bearer ${token[$mode]}" \
      "${url[$mode]}$PATH_" >"$work/wrk.$mode.out" &
    pids+=($!)
  done
  wait "${pids[@]}" # the two wrk, not the servers
  local rps_a rps_b bad
  rps_a=$(awk '/^Requests\/sec:/ {print $2}' "$work/wrk.$1.out")
  rps_b=$(awk '/^Requests\/sec:/ {print $2}' "$work/wrk.$2.out")
  bad=$(cat "$work/wrk.$1.out" "$work/wrk.$2.out" | awk '/Non-2xx or 3xx responses:/ {n += $NF} /Socket errors:/ {gsub(",", ""); n += $4 + $6 + $8 + $10} END {print n + 0}')
  echo "$2 $3 $rps_a $rps_b $bad" >>"$work/pairs"
  printf '  round %s %-8s %8.0f req/s beside bare %8.0f req/s: %5.1f%%  non-2xx + socket errors %s\n' \
    "$3" "$2" "$rps_b" "$rps_a" "$(awk -v a="$rps_a" -v b="$rps_b" 'BEGIN {print 100 * b / a}')" "$bad" >&2
}

# The summaries' median, for both kinds of run.
awk_median='
  function median(list, n,    sorted, i, j, t) {
    for (i = 1; i <= n; i++) sorted[i] = list[i]
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (sorted[j] < sorted[i]) { t = sorted[i]; sorted[i] = sorted[j]; sorted[j] = t }
    return (n % 2) ? sorted[(n + 1) / 2] : (sorted[n / 2] + sorted[n / 2 + 1]) / 2
  }
'

modes=(bare layered cached)
for mode in "${modes[@]}"; do start_server "$mode"; done
for mode in "${modes[@]}"; do warm_up "$mode"; done

if [ -n "${SHARED:-}" ]; then
  echo "==> $ROUNDS rounds x (bare beside layered, bare beside cached), ${DURATION}s each," \
    "$CONNECTIONS connections split in two, both servers on one core, server: $TARGET" >&2
  for round in $(seq "$ROUNDS"); do
    if ((round % 2)); then run_pair bare layered "$round"; run_pair bare cached "$round"
    else run_pair bare cached "$round"; run_pair bare layered "$round"; fi
  done
  awk "$awk_median"'
    { n[$1]++; q[$1, n[$1]] = $4 / $3; bad[$1] += $5 }
    END {
      print ""
      for (m = 1; m <= 2; m++) {
        mode = (m == 1) ? "layered" : "cached"
        for (i = 1; i <= n[mode]; i++) r[i] = q[mode, i]
        lo = r[1]; hi = r[1]; for (i = 2; i <= n[mode]; i++) { if (r[i] < lo) lo = r[i]; if (r[i] > hi) hi = r[i] }
        printf "%s beside bare, median of %d same-second ratios: %.1f%% (from %.1f%% to %.1f%%; goal: %s), errors %d\n", mode, n[mode], 100 * median(r, n[mode]), 100 * lo, 100 * hi, (mode == "layered") ? ">= 90%" : ">= 97%", bad[mode]
      }
    }' "$work/pairs"
  exit 0
fi

echo "==> $ROUNDS rounds x (bare, layered, cached), ${DURATION}s each, $CONNECTIONS connections," \
  "1 server thread, wrk 1 thread, loopback, server: $TARGET" >&2
# Short slices, and the order rotates every round (bare first, then layered first, then cached
# first): on a shared machine whose speed changes from one ten-second stretch to the next, the
# three modes of a round then run under the same conditions, and no mode is favoured by its
# place in the round.
for round in $(seq "$ROUNDS"); do
  for i in 0 1 2; do
    run "${modes[$(((round - 1 + i) % 3))]}" "$round"
  done
done

awk "$awk_median"'
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
