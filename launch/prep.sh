#!/usr/bin/env bash
# Usage: bash launch/prep.sh [--hostfile HOSTS] --model MODEL_DIR --prompts PROMPTS.jsonl --out OUT_DIR [pipeline flags]
#   bash launch/prep.sh --model runs/sft/final --prompts prompts.jsonl --out runs/prep \
#        --n 8 --reward data_prep.tasks.sort_task:reward --method rso --procs 8        # one machine, 8 GPUs
#   bash launch/prep.sh --hostfile hosts --model ... --out /shared/prep ...            # every GPU of every host
# generate → score → select (each stage resumes from OUT_DIR); pairs land in OUT_DIR/pairs.jsonl.
# --hostfile: `deepspeed --hostfile HOSTS --module data_prep.pipeline` (lines "node0 slots=8"), one process per
# GPU generating shard RANK/WORLD_SIZE, then rank 0 scores and selects. Without ssh run it on every node with
# NODE_RANK=i MASTER_ADDR=node0 (as launch/multi_node.sh). OUT_DIR must be on a filesystem every node sees.
# --engine vllm runs in .venv-vllm when it exists (bash launch/setup_env.sh --vllm).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 ]]; then sed -n '2,10p' "$0"; exit 2; fi
HOSTFILE=""
if [[ "$1" == "--hostfile" ]]; then HOSTFILE="${2:?--hostfile needs a file}"; shift 2; fi
VENV="$ROOT/.venv"
for arg in "$@"; do [[ "$arg" == "vllm" && -x "$ROOT/.venv-vllm/bin/python" ]] && VENV="$ROOT/.venv-vllm"; done
[[ -f "$VENV/bin/activate" ]] && source "$VENV/bin/activate"
cd "$ROOT"
if [[ -z "$HOSTFILE" ]]; then exec python -m data_prep.pipeline "$@"; fi
ARGS=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29501}")
FLAGS=()  # the launcher would read --n as an abbreviation of its own flags: pass it as --samples
for arg in "$@"; do
  case "$arg" in --n) FLAGS+=(--samples) ;; --n=*) FLAGS+=("--samples=${arg#--n=}") ;; *) FLAGS+=("$arg") ;; esac
done
if [[ -n "${NODE_RANK:-}" ]]; then
  ARGS+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node0}")
fi
exec deepspeed "${ARGS[@]}" --module data_prep.pipeline "${FLAGS[@]}"
