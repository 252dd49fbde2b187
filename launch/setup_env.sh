#!/usr/bin/env bash
# Create/refresh the repo-local virtual environment (.venv) — idempotent.
#
#   bash launch/setup_env.sh          # then: source .venv/bin/activate
#
# torch==2.13.0 (a local CPU wheel) goes in FIRST so that no later requirement can pull a CUDA build;
# DeepSpeed is installed with DS_BUILD_OPS=0 (ops JIT-built on demand, none needed on CPU).
# A stamp holding a hash of the requirement files makes a second run return in well under a second.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RAINBOWPO_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${RAINBOWPO_TORCH:-torch==2.13.0}"
STAMP="$VENV/.rainbowpo-stamp"

hash_inputs() {
  cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1
  echo "$TORCH_SPEC"
}
WANT="$(hash_inputs | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "[setup] .venv is up to date ($VENV)"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating virtual environment at $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# pip, minus the noise of this machine's local-index warnings; pip's own exit status is kept.
pip_install() {
  set +e
  DS_BUILD_OPS=0 "$VENV/bin/python" -m pip --disable-pip-version-check install -q "$@" 2>&1 \
    | grep -v "^WARNING: Location '.*' is ignored"
  local rc=${PIPESTATUS[0]}
  set -e
  if [[ $rc -ne 0 ]]; then echo "[setup] pip install $* failed (exit $rc)" >&2; exit "$rc"; fi
}
echo "[setup] installing $TORCH_SPEC first (CPU wheel; keeps a CUDA build out)"
pip_install "$TORCH_SPEC"
echo "[setup] installing runtime + dev requirements (DS_BUILD_OPS=0)"
pip_install -r "$ROOT/requirements.txt" -r "$ROOT/requirements-dev.txt"
echo "[setup] installing rainbowpo (editable)"
pip_install --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import deepspeed, torch, transformers
print(f"[setup] torch {torch.__version__}  deepspeed {deepspeed.__version__}  transformers {transformers.__version__}")
PY
echo "$WANT" > "$STAMP"
echo "[setup] done"
