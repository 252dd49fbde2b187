"""Train a policy with the RainbowPO objective (or SFT) — the one loop, read top to bottom.

    python -m rainbowpo.train configs/rainbowpo.yaml model.path=/models/llama3-8b-sft data.train=pairs.jsonl
    deepspeed --num_gpus 8 --module rainbowpo.train configs/paper/rainbowpo_llama3_8b.yaml
    deepspeed --num_accelerators 2 --module rainbowpo.train configs/tiny/rainbowpo_tiny.yaml   # CPU, gloo

Per optimizer step: for each micro-batch of this rank → policy log-probs → reference log-probs
(online | cached | none) → preference_loss → backward of (Σ pair losses) · world / pairs-in-step, so the
step's gradient is the mean over all its pairs however they are split (SPEC §1.9) → step → metrics
reduced once → maybe eval / checkpoint. The loop runs total_steps + 1 times so the last eval and save
happen before `if last_step: break`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rainbowpo import checkpoint as ckpt
from rainbowpo import engine as ds
from rainbowpo import lora, lora_fused
from rainbowpo.attention import select_attention
from rainbowpo.config import Config, ConfigError, load_config
from rainbowpo.data.collate import collate
from rainbowpo.data.sampler import StepPlanner, token_budget_grad_accum
from rainbowpo.data.tokenize import load_examples
from rainbowpo.host import retain_freed_memory
from rainbowpo.logprobs import check_head, vocab_size
from rainbowpo.metrics import MetricsLogger, Throughput
from rainbowpo.objective import preference_loss
from rainbowpo.reference import build_reference

METRIC_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "phi/mean",
    "lengths/chosen",  # mean response tokens (EOS included): length exploitation shows here first
    "lengths/rejected",
)


class NonFiniteLossError(RuntimeError):
    """A non-finite loss or gradient with train.on_nan: stop."""


USER_ERRORS = (ValueError, NonFiniteLossError, ckpt.CheckpointError, ds.RankLostError)  # one line by main()


@dataclass
class Run:
    """Everything the loop needs, built once by `setup`."""

    cfg: Config
    dist: ds.DistInfo
    tokenizer: object
    train_set: Sequence  # rainbowpo.data.cache.TokenizedSet: memory-mapped ids, rows built on access
    eval_set: Sequence
    planner: StepPlanner
    grad_accum: int
    total_steps: int
    policy: ds.PolicyEngine
    reference: object
    objective: object
    vocab: int
    timings: dict = field(default_factory=dict)  # seconds: data_s, policy_s, reference_s
    logger: MetricsLogger | None = None
    state: dict = field(default_factory=lambda: {"step": 0})
    resume: ckpt.Resume | None = None


# ----------------------------------------------------------------------------- entry point


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """`CONFIG.yaml key=value ...`; the deepspeed launcher's `--local_rank=N` is accepted and ignored."""
    args = [a for a in argv if not a.startswith("--local_rank")]
    if "--local_rank" in argv:  # `--local_rank N` form
        i = argv.index("--local_rank")
        args = [a for k, a in enumerate(argv) if k not in (i, i + 1)]
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    config = args[0] if args and "=" not in args[0] else None
    return config, args[1:] if config else args


def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(config_path, overrides)
    except ValueError as exc:
        sys.exit(f"config error: {exc}")
    try:
        train(cfg)
        ds.shutdown()
    except USER_ERRORS as exc:  # our one-line messages: data, checkpoints, caches, NaN
        if os.environ.get("RAINBOWPO_TRACEBACK"):
            raise
        sys.exit(f"error: {exc}\n(set RAINBOWPO_TRACEBACK=1 for the traceback)")


def train(cfg: Config) -> dict:
    run = setup(cfg)
    try:
        return loop(run)
    except RuntimeError as exc:  # a peer that died surfaces as a gloo/NCCL error in some collective
        if run.dist.world_size > 1 and ds.is_comm_failure(exc):
            raise ds.diagnose_lost_ranks(exc) from None
        raise
    finally:
        if run.logger:
            run.logger.close()


# ----------------------------------------------------------------------------- setup


def resolve_defaults(cfg: Config) -> Config:
    """Fill the settings whose default depends on the machine (printed with the resolved config)."""
    if cfg.data.share_prompt is not None:
        return cfg
    share = cfg.train.mode == "preference" and cfg.data.packing
    share = (
        share
        and select_attention(cfg.model.attn_implementation, True, False, cfg.model.dtype)
        != "flash_attention_2"
    )
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, share_prompt=share))


def setup(cfg: Config) -> Run:
    cfg = resolve_defaults(cfg)
    lora.check_runtime(cfg, ds.zero_stage(ds.load_ds_preset(cfg.deepspeed.config)))  # QLoRA: before any load
    dist = ds.init_distributed(cfg.train.dist_timeout_minutes)
    seed_everything(cfg.train.seed)
    torch.set_flush_denormal(True)  # saturated losses on CPU otherwise crawl through denormal GEMMs
    if dist.device.type == "cpu" and cfg.train.retain_host_memory:
        retain_freed_memory()  # no page faults for each step's large tensors
    clock = time.perf_counter()
    tokenizer = load_tokenizer(cfg)
    mode = cfg.train.mode
    train_set, summary = load_examples(cfg.data, cfg.data.train, tokenizer, mode, cfg.train.seed)
    eval_set = (
        load_examples(cfg.data, cfg.data.eval, tokenizer, mode, cfg.train.seed)[0] if cfg.data.eval else []
    )
    timings = {"data_s": time.perf_counter() - clock}
    lengths = train_set.num_tokens.tolist()  # from the offsets: no row is materialized
    grad_accum = _grad_accum(cfg, dist, lengths)
    planner = StepPlanner(
        lengths,
        cfg.train.global_batch_pairs,
        dist.world_size,
        grad_accum,
        cfg.train.seed,
        cfg.train.micro_batch_tokens,
        cfg.train.shuffle,
    )
    total_steps = planner.steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    attn = select_attention(
        cfg.model.attn_implementation, cfg.data.packing, cfg.data.share_prompt, cfg.model.dtype
    )
    objective = cfg.objective.build() if mode == "preference" else None
    resume = ckpt.plan_resume(cfg.output.resume, os.path.join(cfg.output.dir, "checkpoints"), dist.world_size)
    if resume and resume.universal:
        ckpt.prepare_universal(resume, dist.is_main)
    clock = time.perf_counter()
    policy = ds.PolicyEngine.build(
        cfg, dist, grad_accum, total_steps, attn, load_universal=bool(resume and resume.universal)
    )
    timings["policy_s"], clock = time.perf_counter() - clock, time.perf_counter()
    reference = build_reference(
        cfg,
        dist,
        bool(objective and objective.needs_entropy),
        train_set,
        lambda exs: make_batch(cfg, tokenizer, exs),
        grad_accum,
        attn,
        eval_set if mode == "preference" else (),
        policy=policy,
    )
    timings["reference_s"] = time.perf_counter() - clock
    run = Run(cfg, dist, tokenizer, train_set, eval_set, planner, grad_accum, total_steps, policy, reference,
              objective, vocab_size(policy.scorer.model), timings, resume=resume)  # fmt: skip
    if dist.is_main:
        print_header(run, summary, attn)
    return run


def _grad_accum(cfg: Config, dist: ds.DistInfo, lengths: list[int]) -> int:
    if cfg.train.micro_batch_tokens:
        return token_budget_grad_accum(
            lengths,
            cfg.train.global_batch_pairs,
            dist.world_size,
            cfg.train.micro_batch_tokens,
            cfg.train.seed,
            cfg.train.epochs,
            cfg.train.shuffle,
        )
    return cfg.train.grad_accum(dist.world_size)


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    except OSError as exc:
        raise ConfigError(f"model.path: cannot load a tokenizer from {cfg.model.path!r} ({exc})") from None
    if tok.eos_token_id is None:
        raise ConfigError(
            f"model.path: the tokenizer of {cfg.model.path} has no EOS token; set eos_token in it"
        )
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def make_batch(cfg: Config, tokenizer, examples: list):
    return collate(
        examples, packing=cfg.data.packing, share_prompt=cfg.data.share_prompt, pad_id=tokenizer.pad_token_id
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def print_header(run: Run, summary, attn: str) -> None:
    cfg, dist = run.cfg, run.dist
    os.makedirs(cfg.output.dir, exist_ok=True)
    with open(os.path.join(cfg.output.dir, "config.yaml"), "w") as f:
        f.write(cfg.to_yaml())
    tokens = sum(ex.num_tokens for ex in run.train_set)
    print("=" * 80, "\n" + cfg.to_yaml(), "=" * 80, sep="")
    print(summary.format())
    print(
        f"world size {dist.world_size} | micro batch {cfg.train.micro_batch_pairs} pairs"
        f"{f' (≤ {cfg.train.micro_batch_tokens} tokens)' if cfg.train.micro_batch_tokens else ''}"
        f" | accumulation {run.grad_accum} | global batch {cfg.train.global_batch_pairs} pairs"
        f" | ~{tokens / max(1, run.planner.steps_per_epoch):.0f} tokens/step | {run.total_steps} steps"
        f" | attention {attn} | reference {cfg.reference_mode()} | ZeRO stage {ds.zero_stage(run.policy.ds_config)}"
    )
    if cfg.model.uses_lora():
        print(lora.trainable_summary(run.policy.scorer.model))
    if run.planner.dropped_per_epoch:
        print(
            f"{run.planner.dropped_per_epoch} pairs per epoch left out (fewer than the "
            f"{dist.world_size * run.grad_accum} micro-batches of a step; a different few each epoch)"
        )
    if run.policy.scorer.aux_coef > 0 or ds.moe_block_classes(run.policy.scorer.model):
        leaves = [c.__name__ for c in ds.moe_block_classes(run.policy.scorer.model)]
        print(f"mixture of experts: router aux loss coefficient {run.policy.scorer.aux_coef:g}"
              f"{f' | ZeRO-3 leaf modules {leaves}' if ds.zero_stage(run.policy.ds_config) == 3 else ''}")  # fmt: skip
    print("setup: " + ", ".join(f"{k[:-2]} {v:.1f} s" for k, v in run.timings.items()))


# ----------------------------------------------------------------------------- the loop


def loop(run: Run) -> dict:
    cfg, dist = run.cfg, run.dist
    root = os.path.join(cfg.output.dir, "checkpoints")
    if run.resume:
        ckpt.restore(run, run.resume)
    run.logger = MetricsLogger(cfg.logging, cfg.output.dir, dist.is_main, run.total_steps, run.state["step"],
                               run_config=cfg.to_dict(), wandb_id=run.state.get("wandb_id"))  # fmt: skip
    if run.logger.wandb_id:
        run.state["wandb_id"] = run.logger.wandb_id  # saved with each checkpoint: a resume continues the run
    if run.state["step"] == 0:
        verify_settings(run)
    last_record: dict = {}
    while True:
        step = run.state["step"]
        last_step = step == run.total_steps
        if run.eval_set and _due(cfg.train.eval_every, step, last_step):
            run.logger.log(
                {**evaluate(run, run.eval_set, "eval"), "step": step, "epoch": _epoch(run, step)}, "eval/"
            )
        if cfg.output.checkpoints and _due(cfg.output.save_every, step, last_step):
            ckpt.save(run, root)
        if cfg.output.export_every and not last_step and _due(cfg.output.export_every, step, False):
            export(run, os.path.join(cfg.output.dir, "exports", ckpt.step_tag(step)))
        if last_step:
            break
        last_record = train_step(run, step)
        run.state["step"] = step + 1
        run.logger.log(last_record)
        run.logger.progress(last_record)
    if cfg.output.export:
        export(run, os.path.join(cfg.output.dir, "final"))
    return last_record


def train_step(run: Run, step: int) -> dict:
    epoch, index = divmod(step, run.planner.steps_per_epoch)
    micro_batches = run.planner.micro_batches(epoch, index, run.dist.rank)
    step_pairs = run.planner.pairs_in_step(epoch, index)
    sums = torch.zeros(len(METRIC_KEYS) + 1, dtype=torch.float64, device=run.dist.device)  # stays on device
    clock = Throughput()
    aux_sum = 0.0
    for indices in micro_batches:
        batch = make_batch(run.cfg, run.tokenizer, [run.train_set[i] for i in indices]).to(run.dist.device)
        losses, metrics = compute_losses(run, batch, train=True)
        loss = losses.sum() * (run.dist.world_size / step_pairs)
        aux = run.policy.scorer.aux_loss  # MoE router load balancing; DeepSpeed averages it over ranks
        if aux is not None:
            loss = loss + run.policy.scorer.aux_coef * aux / len(micro_batches)
            aux_sum += float(aux.detach()) / len(micro_batches)
        run.policy.backward(loss)
        sums[:-1] += metrics
        sums[-1] += batch.num_tokens
    sums = ds.all_reduce_sum(sums).cpu()  # the step's one host synchronization
    finite_loss = bool(torch.isfinite(sums[0]))
    if not finite_loss and run.cfg.train.on_nan == "stop":
        raise_non_finite(run, f"step {step + 1}", micro_batches, "loss")
    run.policy.step()  # ZeRO discards a step whose gradient norm is non-finite
    grad_norm = run.policy.grad_norm()
    skipped = not (finite_loss and math.isfinite(grad_norm))
    if skipped and run.cfg.train.on_nan == "stop":
        raise_non_finite(run, f"step {step + 1}", micro_batches, "gradient")
    record = dict(zip(METRIC_KEYS, (sums[:-1] / step_pairs).tolist()))
    if run.objective is None:  # SFT: only the loss and the completions' log-prob mean
        record = {"loss": record["loss"], "logps/completion": record["logps/chosen"]}
    record.update(lr=run.policy.lr(), grad_norm=grad_norm, tokens_per_second=clock.rate(float(sums[-1])))
    if run.policy.scorer.aux_coef > 0:
        record["router_aux_loss"] = aux_sum  # rank 0's micro-batches
    if skipped:
        record["skipped_nonfinite"] = 1
        if run.dist.is_main:
            print(
                f"step {step + 1}: non-finite loss or gradient; the step was skipped (train.on_nan: skip_step)"
            )
    return {**record, "epoch": _epoch(run, step + 1), "step": step + 1}


def compute_losses(run: Run, batch, train: bool, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair (SFT: per-example) losses [B] and the summed metric vector of METRIC_KEYS (detached, fp64)."""
    forward = run.policy.forward if train else run.policy.evaluate
    if run.objective is not None:  # first: the reference forward's activations are freed before the policy's
        ref_logp, ref_entropy = run.reference.stats(batch, split)  # cached: rows looked up per split
    logp, _ = forward(batch)
    n = batch.seq_tokens.to(logp.dtype)
    if run.objective is None:  # SFT: token-mean NLL per example, mean over examples
        losses = -logp / n
        metrics = torch.zeros(len(METRIC_KEYS), dtype=torch.float64, device=logp.device)
        metrics[0], metrics[5] = losses.detach().sum(), logp.detach().sum()
        return losses, metrics
    out = preference_loss(
        run.objective,
        logp[0::2],
        logp[1::2],
        n[0::2],
        n[1::2],
        ref_chosen=None if ref_logp is None else ref_logp[0::2],
        ref_rejected=None if ref_logp is None else ref_logp[1::2],
        ref_chosen_entropy=None if ref_entropy is None else ref_entropy[0::2],
        ref_rejected_entropy=None if ref_entropy is None else ref_entropy[1::2],
        vocab_size=run.vocab,
    )
    margins = out.chosen_rewards - out.rejected_rewards
    values = [out.losses.detach(), out.chosen_rewards, out.rejected_rewards, margins, (margins > 0).to(margins.dtype),
              logp[0::2].detach(), logp[1::2].detach(), out.phi, n[0::2], n[1::2]]  # fmt: skip
    return out.losses, torch.stack([v.double().sum() for v in values])


@torch.no_grad()
def evaluate(run: Run, examples: list, split: str, limit: int | None = None) -> dict:
    """Metrics on `examples`, sharded over ranks; every rank runs the same number of forwards (ZeRO-3)."""
    micro, world = run.cfg.train.micro_batch_pairs, run.dist.world_size
    chunks = [list(range(i, min(i + micro, len(examples)))) for i in range(0, len(examples), micro)][:limit]
    mine = chunks[run.dist.rank :: world]
    n_forwards = (len(chunks) + world - 1) // world
    sums = torch.zeros(len(METRIC_KEYS), dtype=torch.float64, device=run.dist.device)
    for i in range(n_forwards):
        chunk = mine[i] if i < len(mine) else chunks[0]  # a repeat keeps collectives in step; not counted
        batch = make_batch(run.cfg, run.tokenizer, [examples[j] for j in chunk]).to(run.dist.device)
        _, metrics = compute_losses(run, batch, train=False, split=split)
        if i < len(mine):
            sums += metrics
    sums = ds.all_reduce_sum(sums).cpu()
    count = sum(len(c) for c in chunks)
    return dict(zip(METRIC_KEYS, (sums / max(1, count)).tolist()))


def verify_settings(run: Run) -> None:
    """A one-micro-batch eval per rank before the first step: a broken setting fails in seconds, not hours.

    Also `check_head`: the fast LM-head path's log-probs equal log_softmax(model(...).logits) on this
    rank's first micro-batch (stops with ValueError when an architecture transforms its logits unknown)."""
    first = run.planner.micro_batches(0, 0, run.dist.rank)[0]
    batch = make_batch(run.cfg, run.tokenizer, [run.train_set[i] for i in first]).to(run.dist.device)
    run.policy.engine.eval()
    check_head(run.policy.scorer, batch)
    lora_fused.check(run.policy.scorer.model)
    run.policy.engine.train()
    metrics = evaluate(run, run.train_set, "train", limit=run.dist.world_size)
    if run.dist.is_main:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in ("loss", "rewards/accuracies"))
        print(f"verifying settings on one micro-batch per rank: {shown}")
    if not math.isfinite(metrics["loss"]) and run.cfg.train.on_nan == "stop":
        checked = list(range(min(len(run.train_set), run.dist.world_size * run.cfg.train.micro_batch_pairs)))
        raise_non_finite(
            run, "the settings check before step 1", [checked] if run.dist.is_main else [], "loss"
        )


def raise_non_finite(run: Run, where: str, micro_batches: list, what: str) -> None:
    rows = sorted(r for part in ds.all_gather_objects(
        [run.train_set[i].row_id for mb in micro_batches for i in mb]) for r in part)  # fmt: skip
    last = ckpt.complete_checkpoints(os.path.join(run.cfg.output.dir, "checkpoints"))
    raise NonFiniteLossError(
        f"non-finite {what} at {where} (rows {rows[:32]}{' …' if len(rows) > 32 else ''}); "
        f"no step was taken and nothing saved. Last good checkpoint: {last[-1] if last else 'none'}. "
        "Set train.on_nan: skip_step to skip such steps instead"
    )


def _due(every: int, step: int, last_step: bool) -> bool:
    """Eval/save points: the end, and every `every` steps when every > 0."""
    return step > 0 and (last_step or (every > 0 and step % every == 0))


def _epoch(run: Run, step: int) -> float:
    return step / run.planner.steps_per_epoch


# ----------------------------------------------------------------------------- export


def export(run: Run, out_dir: str) -> None:
    """A Hugging Face folder (config, safetensors, tokenizer) loadable by AutoModelForCausalLM."""
    state = run.policy.full_state_dict()
    if run.dist.is_main and run.cfg.model.uses_lora():
        lora.export(run.policy.scorer.model, state, run.tokenizer, out_dir, out_dir + "_adapter",
                    run.cfg.model.load_in_4bit)  # fmt: skip
        print(f"exported the merged model to {out_dir} and the adapter to {out_dir}_adapter")
    elif run.dist.is_main:
        tmp = out_dir + ".tmp"
        run.policy.scorer.model.save_pretrained(tmp, state_dict=state)
        run.tokenizer.save_pretrained(tmp)
        if os.path.isdir(out_dir):
            ckpt.remove_tree(out_dir)
        os.replace(tmp, out_dir)
        print(f"exported the trained model to {out_dir}")
    ds.barrier()


if __name__ == "__main__":
    main()
