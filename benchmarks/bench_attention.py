"""Packed attention on CPU: per-segment sdpa vs. one 4D block-diagonal mask vs. padding, same batches.

    python benchmarks/bench_attention.py [--workload runs/bench/workload] [--steps 8] [--layouts a,b]

Policy forward + backward through `SequenceScorer` on the shared workload's model and the first
`--steps` batches of 8 pairs (as bench_train.py), 2 threads; prints seconds per batch for each layout.
Used for the packing paragraph of docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS = {  # name → (attn request, packing, share_prompt)
    "packed_sdpa": ("packed_sdpa", True, False),
    "packed_mask": ("packed_mask", True, False),
    "padded_sdpa": ("sdpa", False, False),
    "packed_sdpa_shared_prompt": ("packed_sdpa", True, True),
}


def main() -> None:
    from bench_train import prepare_workload
    from transformers import AutoModelForCausalLM

    from rainbowpo.attention import select_attention
    from rainbowpo.config import load_config
    from rainbowpo.data.collate import collate
    from rainbowpo.data.tokenize import load_examples
    from rainbowpo.logprobs import SequenceScorer
    from rainbowpo.train import load_tokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", type=Path, default=ROOT / "runs" / "bench" / "workload")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {list(LAYOUTS)}")
    args = p.parse_args()
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)
    prepare_workload(args.workload)
    model_dir = args.workload / "model+tokenizer"
    cfg = load_config(None, [f"model.path={model_dir}", f"data.train={args.workload / 'train_trl_order.jsonl'}",
                             "data.max_length=512", "data.max_prompt_length=256"])  # fmt: skip
    tokenizer = load_tokenizer(cfg)
    examples, _ = load_examples(cfg.data, cfg.data.train, tokenizer, "preference", 0)
    batches = [examples[i : i + 8] for i in range(0, 8 * args.steps, 8)]
    results = {}
    for name in args.layouts.split(","):
        request, packing, share = LAYOUTS[name]
        attn = select_attention(request, packing, share)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
        scorer = SequenceScorer(model)
        start = time.perf_counter()
        for exs in batches:
            logp, _ = scorer(collate(exs, packing=packing, share_prompt=share, pad_id=tokenizer.pad_token_id))
            logp.sum().backward()
        results[name] = round((time.perf_counter() - start) / len(batches), 3)
        print(f"{name}: {results[name]:.3f} s per batch of 8 pairs (forward + backward)", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
