#!/usr/bin/env bash
# Installs everything the tests need (PostgreSQL server, promtool, amtool, docker-compose, chromium, Python deps) and
# runs them.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
ensure_postgres
ensure_prometheus_tools
ensure_compose_tools
# The migration report's page is opened in a real headless browser (tests/test_report.py).
command -v chromium >/dev/null 2>&1 || apt_install chromium
ensure_venv "[test,lint]"
ruff check .
ruff format --check .
python -m pytest -q "$@"
