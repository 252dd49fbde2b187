"""benchmarks/gpu_check.py: the FLOP count behind MFU (by hand), the table's verdicts, the numerics checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import gpu_check, gpu_numerics  # noqa: E402

SHAPE = dict(hidden=4, layers=2, heads=2, kv_heads=1, ffn=8, vocab=10)


def test_matmul_params_by_hand():
    # per layer: q, o 4·4 each; k, v 4·2 each (head dim 2, one kv head); gate/up/down 3·4·8 → 144; head 4·10
    assert gpu_check.matmul_params(SHAPE) == 2 * (32 + 16 + 96) + 40 == 328


def test_flops_per_token_by_hand():
    # T = 6: 6N + 6·L·T·d = 1968 + 288; the reference forward adds 2N + 2·L·T·d = 656 + 96
    assert gpu_check.flops_per_token(SHAPE, 6, reference_forward=False) == 2256
    assert gpu_check.flops_per_token(SHAPE, 6, reference_forward=True) == 2256 + 752


def test_peak_flops_lookup():
    assert gpu_check.peak_flops("NVIDIA H200", None) == pytest.approx(989.5e12)
    assert gpu_check.peak_flops("NVIDIA A100-SXM4-80GB", None) == pytest.approx(312e12)
    assert gpu_check.peak_flops("Some New GPU", None) is None
    assert gpu_check.peak_flops("Some New GPU", 100.0) == pytest.approx(1e14)


def test_verdicts():
    assert gpu_check.verdict({"ok": True, "value": 1e-7, "tolerance": 1e-5}) == "ok"
    assert gpu_check.verdict({"ok": False, "value": 1e-3, "tolerance": 1e-5}) == "FAIL"
    assert gpu_check.verdict({"ok": False, "value": None}) == "ERROR"
    slow = {"ok": True, "value": 10.0, "mfu": 0.31, "target": "MFU ≥ 40%"}
    assert gpu_check.verdict(slow) == "below target (MFU ≥ 40%)"
    assert gpu_check.verdict({**slow, "mfu": 0.41}) == "ok"


def test_relative_diff_floors_small_values_at_one():
    a, b = torch.tensor([101.0, 0.5]), torch.tensor([100.0, 0.25])
    assert gpu_numerics.relative_diff(a, b) == pytest.approx(0.25)  # |0.5 − 0.25| / max(0.25, 1)


NUMERICS = dict(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, vocab=128, prompt=(3, 9), response=(2, 7))


def test_packed_vs_padded_fp32_passes():
    row = gpu_numerics.packed_vs_padded(NUMERICS, torch.device("cpu"), torch.float32, pairs=4)
    assert row["ok"] and row["value"] <= 1e-5


def test_packed_vs_padded_bf16_bound_is_the_rounding_noise():
    row = gpu_numerics.packed_vs_padded(NUMERICS, torch.device("cpu"), torch.bfloat16, pairs=4)
    assert 1e-5 <= row["tolerance"] <= gpu_numerics.BF16_CAP  # bf16 rounding is never zero here
    assert row["ok"], row


def test_chunked_head_check_detects_a_wrong_gradient(monkeypatch):
    shape = {**NUMERICS, "chunk": 4}
    assert gpu_numerics.chunked_head_grads(shape, torch.device("cpu"), pairs=2)["ok"]
    from rainbowpo import logprobs  # the check runs the trainer's own scorer: break its recompute path

    original = logprobs._token_stats

    def halved_in_recompute(head, hidden, targets, softcap, with_entropy):
        logp, ent = original(head, hidden, targets, softcap, with_entropy)
        return (logp * 0.5, ent) if torch.is_grad_enabled() and hidden.shape[0] <= 4 else (logp, ent)

    monkeypatch.setattr(logprobs, "_token_stats", halved_in_recompute)
    assert not gpu_numerics.chunked_head_grads(shape, torch.device("cpu"), pairs=2)["ok"]
