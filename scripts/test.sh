#!/usr/bin/env bash
# The project's test command, as the README gives it: `./scripts/test.sh`.
# Needs only the Rust toolchain (with rustfmt and clippy) and Python 3; CI runs exactly this.
# PostgreSQL and Node.js (with npm) are installed with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "format (the crate and tools/)"
cargo fmt --all -- --check

step "clippy (the crate and tools/, all targets, all features, warnings are errors)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

step "docs (warnings are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --all-features --quiet

step "build without optional features"
cargo build --no-default-features --quiet

step "pymacaroons vectors regenerate byte for byte"
venv=target/pyvenv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/vectors/requirements.txt
"$venv/bin/python" tests/vectors/generate.py --output target/pymacaroons.regenerated.json
cmp tests/vectors/pymacaroons.json target/pymacaroons.regenerated.json

step "PostgreSQL on loopback for the postgres store's tests (installed if missing)"
eval "$(scripts/postgres.sh start)"
trap 'scripts/postgres.sh stop "$MATRIX_TEST_PG_DIR"' EXIT
# A plain `cargo test` skips the PostgreSQL tests (saying so); here they must run.
export MATRIX_REQUIRE_POSTGRES=1

step "a real OAuth 2.0 server (oidc-provider from npm) for tests/it/oidc_provider.rs (Node.js installed if missing)"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm; } >&2
fi
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 18 ]; then
  echo "oidc-provider 8 needs Node.js 18 or later; this is $(node --version)"
  exit 1
fi
(cd tests/oidc && npm ci --no-audit --no-fund)
# A plain `cargo test` skips the tests against it (saying so); here they must run.
export MATRIX_REQUIRE_OIDC=1

step "benches and tools compile (not run: figures come from benches/ratios.rs and benches/load.sh)"
cargo build --benches --all-features --quiet
cargo build -p tower-matrix-auth-tools --quiet

step "supply chain: cargo deny (licences, bans, sources; advisories against a local RustSec copy)"
if ! cargo deny --version >/dev/null 2>&1; then
  cargo install cargo-deny --locked
fi
cargo deny --workspace check --hide-inclusion-graph licenses bans sources
# Advisories: against the snapshot of the RustSec database in ../shared/advisory-db (GitHub, where
# the database lives, is unreachable here), made a one-commit repository under the directory name
# cargo-deny derives from deny.toml's db-urls; for the workspace (the crate and tools/) and for
# fuzz/, with deny.toml's accepted advisories (each explained there).
snapshot=../shared/advisory-db
if [ -d "$snapshot/crates" ]; then
  dbs=$(mktemp -d)
  db="$dbs/advisory-db-3157b0e258782691"
  cp -r "$snapshot" "$db" && chmod -R u+w "$db"
  git -C "$db" init -q && git -C "$db" add -A
  date=$(sed -n 's/.*committed \([0-9T:+-]*\)\..*/\1/p' "$snapshot/SNAPSHOT.md" | head -n 1)
  GIT_AUTHOR_DATE=$date GIT_COMMITTER_DATE=$date \
    git -C "$db" -c user.name=snapshot -c user.email=snapshot@localhost commit -qm snapshot
  sed "s|^db-path = .*|db-path = \"$dbs\"|" deny.toml >"$dbs/deny.toml"
  cargo fetch --quiet
  (cd fuzz && cargo fetch --quiet)
  cargo deny --workspace --offline --config "$dbs/deny.toml" check --hide-inclusion-graph advisories
  cargo deny --offline --manifest-path fuzz/Cargo.toml --config "$dbs/deny.toml" \
    check --hide-inclusion-graph advisories
  rm -rf "$dbs"
else
  echo "advisories: no RustSec snapshot at $snapshot (shared/advisory-db); failing rather than skipping"
  exit 1
fi

step "each feature alone, and none (library; tests and examples enable theirs through the dev-dependency)"
features=$(sed -n '/^\[features\]/,/^\[/{s/^\([A-Za-z0-9_-]*\) *=.*/\1/p}' Cargo.toml | grep -vx default || true)
cargo clippy --lib --no-default-features --quiet -- -D warnings
for feature in $features; do
  echo "--features $feature"
  cargo clippy --lib --no-default-features --features "$feature" --quiet -- -D warnings
done

step "fuzz targets, 10 s each (scripts/fuzz.sh long: 5 minutes each)"
scripts/fuzz.sh short

step "soak: the example homeserver under hostile traffic, 5 s (scripts/soak.sh long: 60 s, release)"
SOAK_PROFILE=dev scripts/soak.sh short

step "soak: login/refresh/logout cycles, memory store then PostgreSQL, 5 s each (scripts/soak.sh lifecycle-long: 60 s)"
SOAK_PROFILE=dev scripts/soak.sh lifecycle-short
SOAK_PROFILE=dev MATRIX_DATABASE_URL="$MATRIX_TEST_DATABASE_URL" scripts/soak.sh lifecycle-short

step "tests (unit, integration, doc)"
cargo test --all-features

step "a real Matrix client (matrix-nio) against the example homeserver, memory and PostgreSQL stores"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/client/requirements.txt
cargo build --example homeserver --quiet
"$venv/bin/python" tests/client/nio_e2e.py
MATRIX_DATABASE_URL="$MATRIX_TEST_DATABASE_URL" "$venv/bin/python" tests/client/nio_e2e.py
