-- Run once by the postgres image on the first start of the primary, in POSTGRES_DB (app).
-- pg_stat_statements is preloaded by the primary's command line (docker-compose.yml).
CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
