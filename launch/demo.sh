#!/usr/bin/env bash
# The main job end to end on an embedded tiny model (CPU is enough; ~3 minutes on 2 cores):
#   SFT warm start → rejection sampling (RSO) → RainbowPO on 2 ranks with ZeRO-3 → held-out report.
# Usage: bash launch/demo.sh [--seed S] [--seeds K] [--compare dpo,simpo] [--rounds R] [--fresh]
#   --rounds R: iterative RainbowPO instead (R rounds of sample → RSO → train → eval; runs/demo/iterate/report.md)
# Output: runs/demo/report.md and PNG plots; stages finished earlier are reused unless --fresh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/launch/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" launch/demo.py "$@"
