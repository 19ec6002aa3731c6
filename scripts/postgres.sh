#!/usr/bin/env bash
# A throwaway PostgreSQL server on loopback for the tests (Debian's `postgresql` package).
#   eval "$(scripts/postgres.sh start)"   # prints the exports below; installs the package if needed
#   scripts/postgres.sh stop "$MATRIX_TEST_PG_DIR"
# MATRIX_TEST_PG_CTL is a script taking `stop -m fast` / `start`, for the outage tests.
set -euo pipefail

find_bin() {
  for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  done
  return 1
}

case "${1:-start}" in
start)
  if ! bin=$(find_bin); then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } >&2
    bin=$(find_bin)
  fi
  dir=$(mktemp -d /tmp/matrix-auth-pg.XXXXXX)
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  as=""
  if [ "$(id -u)" = 0 ]; then # initdb refuses to run as root
    chown postgres "$dir"
    as="runuser -u postgres --"
  fi
  (cd / && $as "$bin/initdb" -D "$dir/data" -A trust -U postgres >/dev/null)
  cat >"$dir/ctl" <<EOS
#!/usr/bin/env bash
cd / # the postgres user may not enter the caller's directory
exec $as "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" "\$@"
EOS
  chmod 755 "$dir/ctl"
  "$dir/ctl" start >&2
  echo "export MATRIX_TEST_DATABASE_URL='postgresql://postgres@127.0.0.1:$port/postgres'"
  echo "export MATRIX_TEST_PG_CTL='$dir/ctl'"
  echo "export MATRIX_TEST_PG_DIR='$dir'"
  ;;
stop)
  dir=${2:?usage: postgres.sh stop DIR}
  "$dir/ctl" stop -m fast >&2 || true
  rm -rf "$dir"
  ;;
*)
  echo "usage: $0 start | stop DIR" >&2
  exit 2
  ;;
esac
