-- Undoes 001_add_orders_status.sql ("rollback script ready"; preflight checks it exists):
--   docker-compose run --rm --entrypoint sh migrate -c 'PGPASSWORD="$(cat /run/secrets/migration_password)" psql -v ON_ERROR_STOP=1 -f /migrations/001_add_orders_status.rollback.sql'
SET lock_timeout = '5s';
SET statement_timeout = '5min';

DROP INDEX CONCURRENTLY IF EXISTS shop.orders_status;
ALTER TABLE shop.orders DROP COLUMN IF EXISTS status;
