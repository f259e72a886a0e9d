#!/usr/bin/env bash
# Installs the system packages vpnbot needs to build, test and run its demo, when missing,
# from the distribution's packages (Debian/Ubuntu):
#   libdw-dev            native stacks of blocked workers (rstack-self's libdw backend; build)
#   postgresql(-client)  the database (tests, demo's throwaway cluster)
#   prometheus, prometheus-alertmanager   promtool/amtool and the pager test (tests only)
#   pgbouncer            connection-pooler tests (tests/it/db_pooler.rs; tests only)
#   systemd              systemd-analyze verify of deploy/systemd (tests/it/ops_deploy.rs; tests only)
#   v2ray                the proxy core behind vpnbot-node (tests/node_agent_e2e.rs; tests only).
#                        The package enables an open VMess default service (0.0.0.0:10086, a
#                        published UUID); it is disabled and stopped right after the install.
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
  command -v v2ray >/dev/null 2>&1 || need+=(v2ray)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages; run: sudo apt-get install -y --no-install-recommends ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# v2ray's package enables v2ray.service: a VMess inbound on 0.0.0.0:10086 with a published UUID
# (an open proxy). Never leave it enabled or running, with or without systemd as PID 1.
if [ -e /lib/systemd/system/v2ray.service ] || [ -e /etc/init.d/v2ray ]; then
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl disable --now v2ray 2>/dev/null || true
  else
    # No systemd running: drop the enablement links the package made, and stop a SysV instance.
    rm -f /etc/systemd/system/multi-user.target.wants/v2ray.service
    command -v update-rc.d >/dev/null 2>&1 && update-rc.d -f v2ray remove >/dev/null 2>&1 || true
    [ -x /etc/init.d/v2ray ] && /etc/init.d/v2ray stop >/dev/null 2>&1 || true
  fi
fi
# Debian may start services from these packages on systemd hosts; tests start their own.
if command -v systemctl >/dev/null 2>&1; then
  for s in prometheus prometheus-alertmanager postgresql pgbouncer; do
    systemctl is-active --quiet "$s" 2>/dev/null && systemctl stop "$s" || true
  done
fi
echo "install-deps: installed ${need[*]}"
