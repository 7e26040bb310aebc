# Sourced by demo.sh and test.sh: installs what migexport needs on a fresh Debian machine.
# Idempotent: every step is skipped when its result is already there.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
APT_UPDATED=""

apt_install() {
  if [ -z "$APT_UPDATED" ]; then
    $SUDO apt-get update -qq
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

have_pg_server() {
  ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ls /usr/lib/postgresql/*/lib/pg_stat_statements.so >/dev/null 2>&1
}

ensure_postgres() {
  if ! have_pg_server; then
    # The throwaway clusters are ours: no need for Debian's default cluster on port 5432.
    $SUDO mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
    apt_install postgresql
  fi
}

ensure_prometheus_tools() {
  local pkgs=()
  command -v promtool >/dev/null 2>&1 || pkgs+=(prometheus)
  command -v amtool >/dev/null 2>&1 || pkgs+=(prometheus-alertmanager)
  if [ ${#pkgs[@]} -gt 0 ]; then apt_install "${pkgs[@]}"; fi
}

# docker-compose.yml is validated with `docker-compose config` (Debian's 1.29; no container engine needed).
ensure_compose_tools() {
  command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose
}

# A virtualenv in .venv: Debian's own Python refuses system-wide pip installs (PEP 668).
ensure_venv() {
  local extras="$1"
  if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then apt_install python3-venv; fi
  if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}"
  export PATH="$PWD/.venv/bin:$PATH"
}
