-- The demo application's schema, owned by the migration role (migrations change it), used by the app.
CREATE SCHEMA IF NOT EXISTS shop AUTHORIZATION migration;
GRANT USAGE ON SCHEMA shop TO app, migexport;

CREATE TABLE shop.orders (
    id bigserial PRIMARY KEY,
    customer_id integer NOT NULL,
    amount_cents integer NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_created_at ON shop.orders (created_at);
ALTER TABLE shop.orders OWNER TO migration;
ALTER SEQUENCE shop.orders_id_seq OWNER TO migration;

GRANT SELECT, INSERT, UPDATE ON shop.orders TO app;
GRANT USAGE ON SEQUENCE shop.orders_id_seq TO app;
-- The exporter's probe (deploy/migexport.yml: recent_orders) reads it.
GRANT SELECT ON shop.orders TO migexport;
-- Tables the migration creates later are usable by the app too.
ALTER DEFAULT PRIVILEGES FOR ROLE migration IN SCHEMA shop GRANT SELECT, INSERT, UPDATE ON TABLES TO app;
ALTER DEFAULT PRIVILEGES FOR ROLE migration IN SCHEMA shop GRANT SELECT ON TABLES TO migexport;
ALTER DEFAULT PRIVILEGES FOR ROLE migration IN SCHEMA shop GRANT USAGE ON SEQUENCES TO app;

ALTER ROLE app SET search_path = shop, public;
ALTER ROLE migration SET search_path = shop, public;
ALTER ROLE migexport SET search_path = shop, public;

INSERT INTO shop.orders (customer_id, amount_cents, created_at)
SELECT (random() * 1000)::int, (random() * 10000)::int, now() - random() * interval '7 days'
FROM generate_series(1, 50000);
ANALYZE shop.orders;
