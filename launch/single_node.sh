#!/usr/bin/env bash
# Usage: bash launch/single_node.sh CONFIG.yaml [NUM_ACCELERATORS] [key=value ...]
#   bash launch/single_node.sh configs/rainbowpo.yaml 8 model.path=/models/sft data.train=pairs.jsonl
# One machine, NUM_ACCELERATORS ranks (GPUs, or CPU processes with gloo when no GPU is present).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 ]]; then sed -n '2,4p' "$0"; exit 2; fi
CONFIG="$1"; shift
NPROC=1
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then NPROC="$1"; shift; fi
[[ -f "$ROOT/.venv/bin/activate" ]] && source "$ROOT/.venv/bin/activate"
cd "$ROOT"
exec deepspeed --num_accelerators "$NPROC" --master_port "${MASTER_PORT:-29500}" \
  --module rainbowpo.train "$CONFIG" "$@"
