#!/usr/bin/env bash
# The GPU path, executed (issue 19): numerics, throughput/MFU, memory per reference mode and ZeRO stage, vLLM.
#
#   bash benchmarks/gpu_check.sh                     # one CUDA GPU; < 8 min on an H200
#   bash benchmarks/gpu_check.sh --dry-run           # CPU, tiny shapes (CI runs this)
#   bash benchmarks/gpu_check.sh --out docs/gpu_check.md
#
# No network: models are random-init from configs. On a GPU machine without internet, the packages travel as
# wheels: RAINBOWPO_WHEELS=/path/to/wheels installs everything found there (torch CUDA, flash-attn, vllm …)
# into the environment first (pip --no-index). The environment is .venv (launch/setup_env.sh) when present,
# else the python on PATH. The whole check is bounded by RAINBOWPO_GPU_CHECK_TIMEOUT seconds (default 470).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
[[ -x "$ROOT/.venv/bin/python" ]] && PY="$ROOT/.venv/bin/python"
if [[ -n "${RAINBOWPO_WHEELS:-}" ]]; then
  echo "[gpu_check] installing wheels from $RAINBOWPO_WHEELS"
  "$PY" -m pip install -q --no-index --find-links "$RAINBOWPO_WHEELS" "$RAINBOWPO_WHEELS"/*.whl
fi
cd "$ROOT"
exec timeout "${RAINBOWPO_GPU_CHECK_TIMEOUT:-470}" "$PY" benchmarks/gpu_check.py "$@"
