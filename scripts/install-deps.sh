#!/usr/bin/env bash
# Installs the system packages vpnbot needs to build, test and run its demo, when missing,
# from the distribution's packages (Debian/Ubuntu):
#   libdw-dev            native stacks of blocked workers (rstack-self's libdw backend; build)
#   postgresql(-client)  the database (tests, demo's throwaway cluster)
#   prometheus, prometheus-alertmanager   promtool/amtool and the pager test (tests only)
#   pgbouncer            connection-pooler tests (tests/it/db_pooler.rs; tests only)
#   systemd              systemd-analyze verify of deploy/systemd (tests/it/ops_deploy.rs; tests only)
# Usage: scripts/install-deps.sh [--demo]   (--demo: only what the demo needs)
set -euo pipefail
need=()
pkg-config --exists libdw 2>/dev/null || [ -e /usr/include/elfutils/libdw.h ] || need+=(libdw-dev pkg-config)
command -v psql >/dev/null 2>&1 || need+=(postgresql-client)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
if [ "${1:-}" != "--demo" ]; then
  command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
  command -v amtool >/dev/null 2>&1 && command -v prometheus-alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)
  command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ] || need+=(pgbouncer)
  command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages; run: sudo apt-get install -y --no-install-recommends ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian may start services from these packages on systemd hosts; tests start their own.
if command -v systemctl >/dev/null 2>&1; then
  for s in prometheus prometheus-alertmanager postgresql pgbouncer; do
    systemctl is-active --quiet "$s" 2>/dev/null && systemctl stop "$s" || true
  done
fi
echo "install-deps: installed ${need[*]}"
