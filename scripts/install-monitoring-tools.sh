#!/usr/bin/env bash
# Installs what the chart's monitoring tests check with into the virtual environment $1:
# promtool and the prometheus server (from Debian's `prometheus` package, unpacked, the service not
# installed) into $1/bin; tests/e2e/test_prometheus.py runs the server against the local cluster;
# and the Prometheus Operator's resource validators (the npm package
# @kubernetes-models/prometheus-operator, generated from its monitoring.coreos.com/v1 API types)
# under $1/lib/prometheus-operator-models.
set -euo pipefail
venv=${1:?usage: install-monitoring-tools.sh VENV_DIR}
models="$venv/lib/prometheus-operator-models"
mkdir -p "$venv/bin"

if [ ! -x "$venv/bin/promtool" ] || [ ! -x "$venv/bin/prometheus" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # `apt-get download` needs the package lists; a fresh machine may not have fetched them yet.
  if ! apt-cache show prometheus >/dev/null 2>&1; then apt-get update -qq; fi
  (cd "$work" && apt-get download -qq prometheus)
  dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
  install -m 0755 "$work/root/usr/bin/promtool" "$venv/bin/promtool"
  install -m 0755 "$work/root/usr/bin/prometheus" "$venv/bin/prometheus"
fi
"$venv/bin/promtool" --version >/dev/null
"$venv/bin/prometheus" --version >/dev/null

# At the versions of tests/helm/validators/package-lock.json.
lock_dir=$(cd "$(dirname "$0")/../tests/helm/validators" && pwd)
if ! cmp -s "$lock_dir/package-lock.json" "$models/package-lock.json"; then
  mkdir -p "$models"
  cp "$lock_dir/package.json" "$lock_dir/package-lock.json" "$models/"
  npm ci --silent --no-audit --no-fund --prefix "$models" >/dev/null
fi
