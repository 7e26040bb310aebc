#!/usr/bin/env bash
# Installs everything the tests need (PostgreSQL server, promtool, amtool, docker-compose, Python deps) and runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
ensure_postgres
ensure_prometheus_tools
ensure_compose_tools
ensure_venv "[test,lint]"
ruff check .
ruff format --check .
python -m pytest -q "$@"
