"""Run under `deepspeed --num_accelerators 2`: print each rank's partitioned parameter counts and the
policy's log-probs on the first micro-batch, then export — the test compares them with a reload."""

import json
import sys

import torch

from rainbowpo import train
from rainbowpo.config import load_config
from rainbowpo.engine import partitioned_numel

if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    cfg = load_config(None, args)
    run = train.setup(cfg)
    batch = train.make_batch(cfg, run.tokenizer, run.train_set[:2]).to(run.dist.device)
    logp, _ = run.policy.evaluate(batch)
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in run.policy.scorer.parameters())
    report = {
        "rank": run.dist.rank,
        "total": total,
        "policy": partitioned_numel(run.policy.scorer),
        "reference": run.reference.ref.partitioned_numel(),
        "logp": logp.tolist(),
    }
    print("PROBE " + json.dumps(report), flush=True)
    train.export(run, cfg.output.dir + "/final")
    torch.distributed.barrier()
