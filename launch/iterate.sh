#!/usr/bin/env bash
# Iterative RainbowPO, sample → score → select → train → evaluate, round after round (data_prep/iterate.py):
#   bash launch/iterate.sh CONFIG.yaml [--rounds R] [--hostfile HOSTFILE] [key=value ...]
#   bash launch/iterate.sh configs/iterate/demo.yaml --rounds 2
# Resumable: run the same command again after a kill; finished rounds and stages are skipped.
# Output: output.dir/round-0 … round-R, report.md and reward_by_round.png.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 ]]; then sed -n '2,6p' "$0"; exit 2; fi
PY=python
[[ -x "$ROOT/.venv/bin/python" ]] && PY="$ROOT/.venv/bin/python"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m data_prep.iterate "$@"
