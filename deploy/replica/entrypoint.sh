#!/usr/bin/env bash
# The streaming replica of docker-compose.yml: on the first start, clone the primary with
# pg_basebackup (slot replica1, created by the primary's initdb; -R writes primary_conninfo and
# standby.signal), then run postgres as a hot standby. Runs as the postgres user.
set -euo pipefail

: "${PGDATA:=/var/lib/postgresql/data/pgdata}"
# Overridable for tests/test_compose.py, which runs this script against a real primary.
PRIMARY_HOST="${PRIMARY_HOST:-primary}"
PRIMARY_PORT="${PRIMARY_PORT:-5432}"
SECRETS_DIR="${SECRETS_DIR:-/run/secrets}"
PGPASSWORD="$(tr -d '\r\n' < "$SECRETS_DIR/replication_password")"
export PGPASSWORD

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  until pg_isready -q -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U replicator -d postgres; do
    echo "replica: waiting for the primary"
    sleep 2
  done
  rm -rf "$PGDATA"
  pg_basebackup -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U replicator -D "$PGDATA" -X stream -S replica1 -R --checkpoint=fast
  chmod 0700 "$PGDATA"
fi
# The password must stay out of the server's environment once the clone is done (-R wrote it into
# postgresql.auto.conf, inside the data directory, 0600).
unset PGPASSWORD

exec postgres -D "$PGDATA" \
  -c shared_preload_libraries=pg_stat_statements \
  -c hot_standby=on \
  -c hot_standby_feedback=on \
  "$@"
