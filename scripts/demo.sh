#!/usr/bin/env bash
# Installs migexport and PostgreSQL if needed, then runs `migexport demo`: a throwaway primary +
# streaming replica with a small workload, watched by the exporter. Ctrl-C stops and removes it all.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
ensure_postgres
ensure_venv ""
exec migexport demo "$@"
