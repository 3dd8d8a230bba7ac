#!/usr/bin/env bash
# Builds kvflock's wheel into OUTDIR from a copy of the files git knows (committed or not, never
# ignored ones), so that a stale build/ folder in the checkout cannot add modules that a fresh
# clone would not have. The Dockerfiles install this wheel; scripts/check-wheel.sh tests it.
# Usage: build-wheel.sh PYTHON OUTDIR
set -euo pipefail
python=$1
outdir=$(mkdir -p "$2" && cd "$2" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$work" || true)  # a file deleted but not committed is missing: fine
rm -f "$outdir"/kvflock-*.whl
"$python" -m build --wheel --no-isolation --outdir "$outdir" "$work" >"$work/build.log" 2>&1 \
  || { cat "$work/build.log" >&2; echo "build-wheel: the wheel did not build" >&2; exit 1; }
echo "build-wheel: $(ls "$outdir"/kvflock-*.whl)"
