#!/usr/bin/env bash
# The PostgreSQL scale benchmark (issue 17), one command:
#   benches/pg_scale.sh [--clients 16] [--seconds 10] [--procs 1,2,4] [--pool N]
# Starts a throwaway PostgreSQL (scripts/postgres.sh), then for each process count runs pgbench
# with the statements one refresh needs (the ceiling) and the store's refresh path from that many
# processes (tools/src/bin/pg_scale.rs), and prints the table. Stops the server on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet -p tower-matrix-auth-tools --bin pg_scale
eval "$(scripts/postgres.sh start)"
trap 'scripts/postgres.sh stop "$MATRIX_TEST_PG_DIR"' EXIT
"${CARGO_TARGET_DIR:-target}/release/pg_scale" run --url "$MATRIX_TEST_DATABASE_URL" "$@"
