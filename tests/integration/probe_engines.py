"""Run under `deepspeed --num_accelerators 2`: write each rank's partitioned parameter counts and the
policy's log-probs on the first micro-batch into output.dir/probe_rank{r}.json, then export — the test
compares them with a reload."""

import json
import sys

from rainbowpo import train
from rainbowpo.config import load_config
from rainbowpo.engine import partitioned_numel, shutdown

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
    with open(f"{cfg.output.dir}/probe_rank{run.dist.rank}.json", "w") as f:  # not stdout: ranks interleave
        json.dump(report, f)
    train.export(run, cfg.output.dir + "/final")
    shutdown()
