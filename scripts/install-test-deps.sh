#!/usr/bin/env bash
# Installs what the test suite talks to, when it is missing: memcached, the real Gearman clients
# (gearman CLI and gearadmin, PHP's gearman extension, Perl Gearman::Client, Python gear),
# openssl for the TLS tests' certificates, redis-server and sqlite3 (gearmand's queue stores
# for the import tests), gearmand for side-by-side runs, Prometheus with promtool, and a headless
# chromium for the status page test.
# Debian; needs root (or sudo).
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
command -v memcached >/dev/null || need+=(memcached)
command -v gearman >/dev/null || need+=(gearman-tools)
command -v gearadmin >/dev/null || need+=(gearman-tools)
command -v gearmand >/dev/null && [ -x /usr/sbin/gearmand ] || need+=(gearman-job-server)
command -v php >/dev/null || need+=(php-cli)
php -m 2>/dev/null | grep -qi '^gearman$' || need+=(php-gearman)
perl -MGearman::Client -e1 2>/dev/null || need+=(libgearman-client-perl)
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
command -v python3 >/dev/null || need+=(python3 python3-pip)
command -v openssl >/dev/null || need+=(openssl)   # test certificates (tests/tracing.rs)
command -v redis-server >/dev/null || need+=(redis-server)   # gearmand -q redis (tests/import.rs)
command -v sqlite3 >/dev/null || need+=(sqlite3)   # inspecting gearmand -q libsqlite3 queues
command -v chromium >/dev/null || need+=(chromium fonts-dejavu-core)   # the status page (tests/status_page.rs)

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi

if ! python3 -c 'import gear' 2>/dev/null; then
  echo "installing: python gear (PyPI)"
  python3 -m pip install -q gear 2>/dev/null || python3 -m pip install -q --break-system-packages gear
fi

# The Debian packages start services on install; the tests start their own on free ports.
for svc in memcached gearman-job-server redis-server prometheus prometheus-node-exporter; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    $SUDO systemctl stop "$svc" || true
  fi
done
pkill -x memcached 2>/dev/null || true
pkill -x gearmand 2>/dev/null || true
pkill -x prometheus 2>/dev/null || true
echo "test dependencies: ok"
