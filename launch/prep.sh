#!/usr/bin/env bash
# Usage: bash launch/prep.sh --model MODEL_DIR --prompts PROMPTS.jsonl --out OUT_DIR [data_prep.pipeline flags]
#   bash launch/prep.sh --model runs/sft/final --prompts prompts.jsonl --out runs/prep \
#        --n 8 --reward data_prep.tasks.sort_task:reward --method rso --procs 2
# generate → score → select (each stage resumes from OUT_DIR); pairs land in OUT_DIR/pairs.jsonl.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 ]]; then sed -n '2,5p' "$0"; exit 2; fi
[[ -f "$ROOT/.venv/bin/activate" ]] && source "$ROOT/.venv/bin/activate"
cd "$ROOT"
exec python -m data_prep.pipeline "$@"
