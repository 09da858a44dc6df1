#!/bin/sh
# Run once by the postgres image on a fresh volume, after 10-vector.sql: the services' role (see
# mesh/pg_roles.py). It owns the mesh's database and its public schema, so the services' own migrations
# run, and it is not a superuser. POSTGRES_APP_PASSWORD comes from docker-compose.yml.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
     -v role=mesh_app -v password="${POSTGRES_APP_PASSWORD:?set POSTGRES_APP_PASSWORD}" -v db="$POSTGRES_DB" <<'SQL'
SET password_encryption = 'scram-sha-256';
CREATE ROLE :"role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'password';
ALTER DATABASE :"db" OWNER TO :"role";
ALTER SCHEMA public OWNER TO :"role";
SQL
