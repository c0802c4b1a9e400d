#!/bin/sh
# Run once by the postgres image, on an empty data directory: one database per
# service, named in APP_DATABASES (compose.yaml). A service's tables live only in
# its own database; no service connects to another's.
set -eu

for database in ${APP_DATABASES:-}; do
  echo "creating database $database"
  psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -c "CREATE DATABASE \"$database\""
done
