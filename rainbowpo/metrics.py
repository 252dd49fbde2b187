"""Metrics: metrics.jsonl (rank 0), optional TensorBoard / W&B, tqdm progress bar, throughput.

One record per logged optimizer step with the SPEC §3 keys: loss, rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, phi/mean, lengths/chosen,
lengths/rejected (mean response tokens), lr, grad_norm,
tokens_per_second, epoch, step.
"""

from __future__ import annotations

import json
import math
import os
import time

from tqdm.auto import tqdm

from rainbowpo.config import LoggingConfig


class MetricsLogger:
    """metrics.jsonl + optional TensorBoard/W&B on rank 0.

    W&B gets the resolved config; `wandb_id` (saved in each checkpoint) makes a resumed run continue the same
    W&B run instead of starting a new one."""

    def __init__(
        self,
        cfg: LoggingConfig,
        out_dir: str,
        is_main: bool,
        total_steps: int,
        start_step: int,
        run_config: dict | None = None,
        wandb_id: str | None = None,
    ):
        self.cfg, self.is_main = cfg, is_main
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.tb = self.wandb = self.bar = None
        self.wandb_id: str | None = None
        if not is_main:
            return
        os.makedirs(out_dir, exist_ok=True)
        _truncate_after(self.path, start_step)  # a resumed run rewrites the steps after its checkpoint
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
        if cfg.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.wandb_project, dir=out_dir, id=wandb_id, resume="allow", config=run_config
            )
            self.wandb_id = self.wandb.id
        if cfg.progress:
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def log(self, record: dict, prefix: str = "") -> None:
        if not self.is_main:
            return
        step = record["step"]
        if prefix or step % self.cfg.every == 0:
            row = {f"{prefix}{k}" if k not in ("step", "epoch") else k: _clean(v) for k, v in record.items()}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.tb:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and k != "step":
                        self.tb.add_scalar(k, v, step)
            if self.wandb:
                self.wandb.log(row, step=step)

    def progress(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


class Throughput:
    """Tokens per second of one optimizer step (wall clock, non-pad tokens over all ranks)."""

    def __init__(self):
        self.start = time.perf_counter()

    def rate(self, tokens: float) -> float:
        now = time.perf_counter()
        elapsed, self.start = now - self.start, now
        return tokens / max(elapsed, 1e-9)


def read_metrics(path: str) -> list[dict]:
    """Records of a metrics.jsonl; a half-written last line (a killed run) is ignored."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _truncate_after(path: str, step: int) -> None:
    if not os.path.isfile(path):
        return
    keep = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
