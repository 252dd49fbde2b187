"""Run LoRA trainings one after another in this process (one rank) and write what the tests compare.

    python tests/integration/lora_probe.py cases.json      # {"name": {"overrides": [...], "lr0": bool}}

For each case, into <output.dir>/probe.json: the base model's log-probs on the first micro-batch (a plain
Hugging Face model, no adapter code), the reference's and the policy's on it before training, the policy's
after training, and which weights changed (trained state vs the base folder's safetensors).
"""

import json
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rainbowpo import train
from rainbowpo.config import load_config
from rainbowpo.engine import shutdown
from rainbowpo.logprobs import SequenceScorer


def changed_weights(run) -> dict:
    """{"base": names of base weights that differ from the folder's, "adapter_nonzero_B": count}."""
    state = run.policy.full_state_dict()
    base = load_file(f"{run.cfg.model.path}/model.safetensors")
    prefix = "base_model.model."
    differs = []
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key[len(prefix) :].replace(".base_layer.", ".")
        if not torch.equal(value, base[name]):
            differs.append(name)
    nonzero_b = sum(int(v.abs().sum() > 0) for k, v in state.items() if ".lora_B.default." in k)
    return {"base_changed": differs, "adapter_nonzero_B": nonzero_b}


def probe(name: str, case: dict) -> None:
    cfg = load_config(None, case["overrides"])
    if case.get("lr0"):  # the config refuses lr 0 (a typo guard); the test wants an exact no-op optimizer
        object.__setattr__(cfg.train, "lr", 0.0)
    # loaded before setup: once a ZeRO-3 engine exists, from_pretrained would partition this model too
    plain = AutoModelForCausalLM.from_pretrained(
        cfg.model.path, dtype=torch.float32, attn_implementation="sdpa"
    )
    run = train.setup(cfg)
    batch = train.make_batch(run.cfg, run.tokenizer, run.train_set[:2]).to(run.dist.device)
    with torch.no_grad():
        base_logp = SequenceScorer(plain)(batch)[0]
    ref_logp = run.reference.stats(batch)[0]
    before = run.policy.evaluate(batch)[0]
    train.loop(run)
    after = run.policy.evaluate(batch)[0]
    report = {"base_logp": base_logp.tolist(), "ref_logp": ref_logp.tolist(), "policy_before": before.tolist(),
              "policy_after": after.tolist(), **changed_weights(run)}  # fmt: skip
    with open(f"{cfg.output.dir}/probe.json", "w") as f:
        json.dump(report, f)
    print(f"probe {name} done", flush=True)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        cases = json.load(f)
    for case_name, spec in cases.items():
        probe(case_name, spec)
    shutdown()
