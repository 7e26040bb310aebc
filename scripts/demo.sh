#!/usr/bin/env bash
# Installs migexport, PostgreSQL, Prometheus and Alertmanager if needed, then runs `migexport demo`: a
# throwaway primary + streaming replica with a small workload, watched by the exporter, Prometheus (with the
# rules rendered from short demo thresholds) and Alertmanager, and scripted migrations (clean, stuck,
# breaking) to run in another terminal. Ctrl-C stops and removes it all.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
ensure_postgres
ensure_prometheus_tools
ensure_venv ""
exec migexport demo "$@"
