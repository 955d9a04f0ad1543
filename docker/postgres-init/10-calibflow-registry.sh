#!/usr/bin/env bash
# Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d), after it has
# created POSTGRES_USER and POSTGRES_DB (Prefect's database): creates the calibflow registry's
# database, owned by the same user. The registry's tables come from `calibflow init` (the
# calibflow-init service), which applies the Alembic migrations.
set -euo pipefail

db="${CALIBFLOW_REGISTRY_DB:?CALIBFLOW_REGISTRY_DB is not set (see docker/compose.yaml)}"
if [[ ! "$db" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
  echo "CALIBFLOW_REGISTRY_DB=$db: use letters, digits and _ only" >&2
  exit 1
fi
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE DATABASE "$db" OWNER "$POSTGRES_USER";
SQL
echo "created the calibflow registry database $db"
