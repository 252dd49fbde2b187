#!/usr/bin/env bash
# Usage: bash launch/multi_node.sh HOSTFILE CONFIG.yaml [key=value ...]
#   HOSTFILE lines: "node0 slots=8" (one per machine). With passwordless ssh, run it once on node0.
#   Without ssh, run it on every node with NODE_RANK=i (and MASTER_ADDR set to node0's address):
#     NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash launch/multi_node.sh hostfile configs/rainbowpo.yaml
# output.dir must be on a filesystem every node sees (checkpoints are written by all ranks).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 2 ]]; then sed -n '2,7p' "$0"; exit 2; fi
HOSTFILE="$1"; CONFIG="$2"; shift 2
[[ -f "$ROOT/.venv/bin/activate" ]] && source "$ROOT/.venv/bin/activate"
cd "$ROOT"
ARGS=(--hostfile "$HOSTFILE" --master_port "${MASTER_PORT:-29500}")
if [[ -n "${NODE_RANK:-}" ]]; then
  ARGS+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:?set MASTER_ADDR to node0}")
fi
exec deepspeed "${ARGS[@]}" --module rainbowpo.train "$CONFIG" "$@"
