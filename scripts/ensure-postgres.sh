#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers and exports DATABASE_URL for the tests.
# Order: a working $DATABASE_URL; a trust-auth server on 127.0.0.1:5432; else a private
# cluster (trust auth, loopback) started from the distribution's server binaries, installed
# with apt-get when missing. Source it: `. scripts/ensure-postgres.sh`.
set -euo pipefail

pg_ok() { command -v psql >/dev/null 2>&1 && psql "$1" -qtAc 'select 1' >/dev/null 2>&1; }

if [ -n "${DATABASE_URL:-}" ] && pg_ok "$DATABASE_URL"; then
  echo "postgres: using DATABASE_URL"
  return 0 2>/dev/null || exit 0
fi
if pg_ok "postgres://postgres@127.0.0.1:5432/postgres"; then
  export DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
  echo "postgres: reusing the server on 127.0.0.1:5432"
  return 0 2>/dev/null || exit 0
fi

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  echo "postgres: server binaries missing; installing from the distribution's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq postgresql postgresql-client >/dev/null
  bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi

PGDATA_DIR=${VPNBOT_TEST_PGDATA:-/tmp/vpnbot-test-pg}
port=${VPNBOT_TEST_PGPORT:-55432}
as_pg=()
if [ "$(id -u)" = 0 ]; then as_pg=(runuser -u postgres --); fi

if [ ! -s "$PGDATA_DIR/data/PG_VERSION" ]; then
  rm -rf "$PGDATA_DIR"; mkdir -p "$PGDATA_DIR"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$PGDATA_DIR"
  "${as_pg[@]}" "$bindir/initdb" -D "$PGDATA_DIR/data" -U postgres --auth=trust --no-sync -E UTF8 >/dev/null
fi
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if "${as_pg[@]}" "$bindir/pg_ctl" -D "$PGDATA_DIR/data" status >/dev/null 2>&1; then
  # Already running from an earlier run: use the port it listens on.
  port=$(sed -n 4p "$PGDATA_DIR/data/postmaster.pid")
else
  if port_taken "$port"; then
    if [ -n "${VPNBOT_TEST_PGPORT:-}" ]; then
      echo "postgres: port $port (VPNBOT_TEST_PGPORT) is taken by another server; choose a free one" >&2
      return 1 2>/dev/null || exit 1
    fi
    wanted=$port
    for p in $(seq $((port + 1)) $((port + 60))); do
      port_taken "$p" || { port=$p; break; }
    done
    [ "$port" = "$wanted" ] && { echo "postgres: ports $wanted-$((wanted + 60)) all taken; set VPNBOT_TEST_PGPORT" >&2; return 1 2>/dev/null || exit 1; }
    echo "postgres: port $wanted is taken by another server; using $port (override: VPNBOT_TEST_PGPORT)"
  fi
  if ! "${as_pg[@]}" "$bindir/pg_ctl" -D "$PGDATA_DIR/data" -l "$PGDATA_DIR/server.log" -w -t 60 \
    -o "-p $port -k $PGDATA_DIR -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=400" start >/dev/null; then
    echo "postgres: could not start the private cluster in $PGDATA_DIR/data on 127.0.0.1:$port" >&2
    echo "postgres: last lines of $PGDATA_DIR/server.log:" >&2
    tail -n 20 "$PGDATA_DIR/server.log" >&2 || true
    echo "postgres: override with VPNBOT_TEST_PGPORT=<free port> and/or VPNBOT_TEST_PGDATA=<dir>" >&2
    return 1 2>/dev/null || exit 1
  fi
fi
export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
if ! pg_ok "$DATABASE_URL"; then
  echo "postgres: server at $DATABASE_URL does not answer; log: $PGDATA_DIR/server.log" >&2
  tail -n 20 "$PGDATA_DIR/server.log" >&2 || true
  return 1 2>/dev/null || exit 1
fi
echo "postgres: private cluster at $DATABASE_URL (left running for the next run; stop it with:" \
  "${as_pg[*]} $bindir/pg_ctl -D $PGDATA_DIR/data stop)"
