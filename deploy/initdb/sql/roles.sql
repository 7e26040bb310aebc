-- The roles of the demo stack (psql variables set by ../02-roles.sh from the docker secrets).

-- The exporter: pg_monitor is all it needs; a connection limit keeps it from joining an incident.
CREATE ROLE migexport LOGIN PASSWORD :'migexport_password' CONNECTION LIMIT 10 IN ROLE pg_monitor;

-- The application (deploy/workload/app.py).
CREATE ROLE app LOGIN PASSWORD :'app_password';

-- The migration's own role (migration.role in deploy/migexport.yml): its statements stay out of the
-- application's latency sums, `migexport run` can end its sessions, and it never queues behind a
-- long transaction for more than lock_timeout (the lock queue is the hazard of a migration).
CREATE ROLE migration LOGIN PASSWORD :'migration_password';
ALTER ROLE migration SET lock_timeout = '5s';
ALTER ROLE migration SET statement_timeout = '10min';

-- The streaming replica (deploy/replica/entrypoint.sh) and its slot.
CREATE ROLE replicator LOGIN REPLICATION PASSWORD :'replication_password';
SELECT pg_create_physical_replication_slot('replica1');
