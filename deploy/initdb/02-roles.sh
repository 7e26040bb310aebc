#!/usr/bin/env bash
# Run once by the postgres image on the first start of the primary: the roles of the demo stack,
# their passwords read from the docker secrets (deploy/secrets/), and replication access for the
# standby. The SQL is in sql/roles.sql (a subdirectory: the image does not run it by itself).
set -euo pipefail

SECRETS_DIR="${SECRETS_DIR:-/run/secrets}" # tests/test_compose.py runs this script against a real server
HERE="$(dirname "${BASH_SOURCE[0]}")"

secret() { tr -d '\r\n' < "$SECRETS_DIR/$1"; }

psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v migexport_password="$(secret migexport_password)" \
  -v app_password="$(secret app_password)" \
  -v migration_password="$(secret migration_password)" \
  -v replication_password="$(secret replication_password)" \
  -f "$HERE/sql/roles.sql"

# The image's pg_hba.conf lets every database in with a password but no replication connection.
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"
