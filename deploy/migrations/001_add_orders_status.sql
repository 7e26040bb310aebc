-- The demo migration run by the `migrate` service:
--   docker-compose run --rm migrate
-- = migexport run -c /etc/migexport/migexport.yml -- psql -v ON_ERROR_STOP=1 -f /migrations/001_add_orders_status.sql
-- as the role `migration` (lock_timeout 5s by role; set again here as the migration's own guard).
SET lock_timeout = '5s';
SET statement_timeout = '5min';

ALTER TABLE shop.orders ADD COLUMN IF NOT EXISTS status text;
ALTER TABLE shop.orders ALTER COLUMN status SET DEFAULT 'new';

-- Backfill in batches, so no single transaction holds its row locks for long.
DO $$
DECLARE
    n integer;
BEGIN
    LOOP
        UPDATE shop.orders SET status = 'new'
        WHERE id IN (SELECT id FROM shop.orders WHERE status IS NULL LIMIT 5000);
        GET DIAGNOSTICS n = ROW_COUNT;
        EXIT WHEN n = 0;
        COMMIT;
        PERFORM pg_sleep(0.2);
    END LOOP;
END
$$;

-- CONCURRENTLY: the application keeps writing while the index is built.
CREATE INDEX CONCURRENTLY IF NOT EXISTS orders_status ON shop.orders (status);
