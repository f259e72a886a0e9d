#!/usr/bin/env bash
# Installs the operations tools the ops_* tests need, when missing, from Debian's packages:
#   promtool, prometheus   (package prometheus, 2.42 on Debian 12)
#   amtool, prometheus-alertmanager (package prometheus-alertmanager, 0.25)
# Neither service is started or enabled by this script; tests start their own on loopback.
set -euo pipefail
need=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v amtool >/dev/null 2>&1 && command -v prometheus-alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-ops-tools: need root to apt-get install ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The Debian package may start a prometheus service (systemd hosts): stop it, the tests bind
# their own ports and must not share a TSDB.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus-alertmanager 2>/dev/null; then
  systemctl stop prometheus-alertmanager || true
fi
command -v promtool >/dev/null && command -v amtool >/dev/null
echo "install-ops-tools: installed ${need[*]}"
