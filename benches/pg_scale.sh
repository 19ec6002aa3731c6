#!/usr/bin/env bash
# The PostgreSQL scale benchmark (issue 17), one command:
#   benches/pg_scale.sh [run] [--clients 16] [--seconds 10] [--procs 1,2,4] [--pool N] [--ops ...]
#   benches/pg_scale.sh http [--clients 16] [--seconds 10] [--procs 1,2,4] [--ops ...] [--fanout 1]
#   benches/pg_scale.sh fanout [--clients 16] [--seconds 10]
#   benches/pg_scale.sh size --clients ROWS [--skip-view 1]
#   benches/pg_scale.sh all [--seconds 8]     # run, http --fanout 1 and size at PG_SCALE_ROWS
#                                             # (default 1000000; 10000000 takes ~6 min)
# Starts a throwaway PostgreSQL (scripts/postgres.sh), then for each process count runs pgbench
# with the statements one refresh needs (the ceiling) and the store's operations from that many
# processes (tools/src/bin/pg_scale.rs: `run` drives `Sessions` in tool processes, `http` the
# example homeserver's endpoints in that many homeserver processes), and prints the tables.
# Exits non-zero if any request got an answer other than 2xx. Stops the server on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=run
case "${1:-}" in
  run|http|fanout|size|all) mode=$1; shift ;;
esac
cargo build --release --quiet -p tower-matrix-auth-tools --bin pg_scale
case "$mode" in
  http|all) cargo build --release --quiet --example homeserver ;;
esac
eval "$(scripts/postgres.sh start)"
trap 'scripts/postgres.sh stop "$MATRIX_TEST_PG_DIR"' EXIT
pg_scale=${CARGO_TARGET_DIR:-target}/release/pg_scale
url=$MATRIX_TEST_DATABASE_URL
case "$mode" in
  all)
    "$pg_scale" run --url "$url" --ops refresh,tokenrefresh,logout,logout-all "$@"
    "$pg_scale" http --url "$url" --fanout 1 "$@"
    "$pg_scale" size --url "$url" --clients "${PG_SCALE_ROWS:-1000000}" --skip-view 1
    ;;
  *) "$pg_scale" "$mode" --url "$url" "$@" ;;
esac
