#!/usr/bin/env bash
# A bounded soak of the example homeserver under hostile traffic, loopback only (the driver,
# tools/src/bin/soak.rs, says what is sent and what counts as a right answer).
#
#   scripts/soak.sh short    ~5 s, 32 connections: what ./scripts/test.sh runs
#   scripts/soak.sh long     ~60 s, 64 connections
#   scripts/soak.sh lifecycle-short|lifecycle-long   ~5 s / ~60 s of login → whoami → refresh →
#       whoami → logout (and logout/all) cycles, one user a connection, every token lifetime short
#       so that revocation state expires (and must be forgotten) within the run; on PostgreSQL
#       when MATRIX_DATABASE_URL is set, else in memory
#
# Builds the homeserver and the driver (release unless SOAK_PROFILE says otherwise), starts the homeserver on a free loopback port
# with a known secret, runs the driver, and always stops the server. Exits non-zero on any wrong
# answer, 5xx or hang, a slow valid probe, server memory growth, or a token in the server log.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-short}
case "$mode" in
  short) seconds=5; connections=32; p99_ms=500; rss_mib=32; log_filter="info,tower_http=debug,tower_matrix_auth=debug" ;;
  long) seconds=60; connections=64; p99_ms=250; rss_mib=32; log_filter="info,tower_matrix_auth=debug" ;;
  lifecycle-short) seconds=5; connections=16; p99_ms=500; rss_mib=16; lifetime_ms=1500; log_filter="info,tower_matrix_auth=debug" ;;
  lifecycle-long) seconds=60; connections=32; p99_ms=250; rss_mib=4; lifetime_ms=3000; log_filter="info" ;;
  *) echo "usage: $0 short|long|lifecycle-short|lifecycle-long" >&2; exit 2 ;;
esac
store=memory
if [ -n "${MATRIX_DATABASE_URL:-}" ]; then store=postgres; fi

# SOAK_PROFILE=dev reuses the test build (./scripts/test.sh does, to spare CI a release build of
# every dependency); the figures in TESTING.md are from release builds.
profile=${SOAK_PROFILE:-release}
cargo build --profile "$profile" --all-features --quiet --example homeserver
cargo build --profile "$profile" --quiet -p tower-matrix-auth-tools --bin soak
case "$profile" in dev) dir=debug ;; *) dir=$profile ;; esac
homeserver=${CARGO_TARGET_DIR:-target}/$dir/examples/homeserver
soak=${CARGO_TARGET_DIR:-target}/$dir/soak

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

secret="soak secret $RANDOM$RANDOM"
password="soak password $RANDOM$RANDOM"
lifecycle_env=()
case "$mode" in
  lifecycle-*)
    users=$(for i in $(seq 0 $((connections - 1))); do printf 'soak%s:%s,' "$i" "$password"; done)
    # Every lifetime short: a logged-out session's state may be forgotten 2 x lifetime later.
    lifecycle_env=(MATRIX_USERS="$users" MATRIX_TOKEN_LIFETIME_MS="$lifetime_ms"
      MATRIX_ACCESS_TOKEN_LIFETIME_MS="$lifetime_ms" MATRIX_REFRESH_TOKEN_LIFETIME_MS=$((2 * lifetime_ms)))
    ;;
esac
# The hostile modes run with the failed-authentication limiter on (two failures a minute per
# address) behind loopback as the trusted proxy, and the driver claims a random address for every
# request: a flood from millions of addresses, under which the server's memory must stay flat.
limiter_env=()
many_addresses=0
case "$mode" in
  short|long)
    limiter_env=(MATRIX_AUTH_FAILURE_LIMIT=2 MATRIX_TRUSTED_PROXIES=127.0.0.1)
    many_addresses=1
    ;;
esac
# Port 0: the kernel picks a free loopback port; the server prints the one it got.
env "${lifecycle_env[@]}" "${limiter_env[@]}" MATRIX_LISTEN=127.0.0.1:0 MATRIX_MACAROON_SECRET="$secret" \
  MATRIX_SERVER_NAME=localhost MATRIX_PRINT_TOKEN_FOR=@alice:localhost RUST_LOG="$log_filter" \
  "$homeserver" >"$work/stdout" 2>"$work/server.log" &
server_pid=$!

addr=
for _ in $(seq 1 100); do
  addr=$(sed -n 's|^listening on http://||p' "$work/stdout" | head -n 1)
  [ -n "$addr" ] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.1
done
[ -n "$addr" ] || { echo "the homeserver did not start" >&2; exit 1; }
case "$addr" in 127.*) ;; *) echo "not a loopback address: $addr" >&2; exit 1 ;; esac

# The token the server printed must work too (it was minted there, with the same secret).
printed=$(head -n 1 "$work/stdout")
echo "soak: homeserver (pid $server_pid) on $addr, $mode mode: ${seconds}s, $connections connections, $store store"

case "$mode" in
  lifecycle-*)
    timeout $((seconds + 60)) "$soak" --mode lifecycle --addr "$addr" --secret "$secret" \
      --password "$password" --lifetime-ms "$lifetime_ms" --store "$store" --seconds "$seconds" \
      --connections "$connections" --server-pid "$server_pid" --server-log "$work/server.log" \
      --probe-p99-ms "$p99_ms" --rss-growth-mib "$rss_mib"
    exit 0
    ;;
esac
timeout $((seconds + 60)) "$soak" --addr "$addr" --secret "$secret" --seconds "$seconds" \
  --connections "$connections" --server-pid "$server_pid" --server-log "$work/server.log" \
  --probe-p99-ms "$p99_ms" --rss-growth-mib "$rss_mib" --printed-token "$printed" \
  --many-addresses "$many_addresses"
