"""One-buffer LoRA linear: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ (Hu et al. 2021, eq. 3, s = alpha / r) with W, b frozen.

peft's `lora.Linear.forward` computes `base(x) + lora_B(lora_A(dropout(x))) * scaling`: three more
output-sized tensors per adapted layer in forward (B·A·x, its scaled copy, the sum) and two more in backward.
`LoraLinear` writes the low-rank term into the base output in place (`addmm_` with alpha = s) and the input
gradient likewise, keeping what autograd keeps for peft's version (x, x·Aᵀ and the weights) and nothing more.

`fuse(peft_model)` routes every peft `lora.Linear` through it whenever the call is plain LoRA (one active
adapter, dropout 0, no DoRA or other variant, not merged, same dtype everywhere, no autocast, no ZeRO-3
partitioned weight); anything else, the adapter disabled included, goes to peft's own forward.
`check(peft_model)` compares both on a random input at start-up (`model.lora.fused: false` turns it off).
"""

from __future__ import annotations

import types

import torch


class LoraLinear(torch.autograd.Function):
    """Forward: y = F.linear(x, W, b); y += s·(x Aᵀ) Bᵀ in place. Backward (G = ∂L/∂y, flattened to rows):
    ∂B = s·Gᵀ(x Aᵀ), ∂A = s·(G B)ᵀ x, ∂x = G W + s·(G B) A — the last again accumulated in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float):
        xa = x @ lora_a.t()
        y = torch.nn.functional.linear(x, weight, bias)
        y.view(-1, y.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), lora_b.t(), alpha=scaling)
        ctx.scaling = scaling
        ctx.save_for_backward(x, weight, lora_a, lora_b, xa)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, xa = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gb = g @ lora_b  # [rows, r]
        need_x, _, _, need_a, need_b = ctx.needs_input_grad[:5]
        grad_a = (gb.t() @ x.reshape(-1, x.shape[-1])).mul_(s) if need_a else None
        grad_b = (g.t() @ xa.reshape(-1, xa.shape[-1])).mul_(s) if need_b else None
        grad_x = None
        if need_x:
            grad_x = (g @ weight).addmm_(gb, lora_a, alpha=s).view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None


def fuse(peft_model) -> int:
    """Give every peft lora.Linear of `peft_model` the LoraLinear fast path; returns how many."""
    from peft.tuners.lora import Linear

    count = 0
    for module in peft_model.modules():
        if type(module) is Linear and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)  # bound: a deepcopy rebinds it
            count += 1
    return count


def _fused_forward(layer, x, *args, **kwargs):
    operands = None if args or kwargs else _operands(layer, x)
    if operands is None:
        return layer._peft_forward(x, *args, **kwargs)
    return LoraLinear.apply(x, *operands)


def _operands(layer, x):
    """(W, b, A, B, s) when this call is plain LoRA the fast path computes exactly; else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant:
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity) or getattr(layer, "fan_in_fan_out", False):
        return None
    base = layer.get_base_layer()
    if type(base) is not torch.nn.Linear or torch.is_autocast_enabled(x.device.type):
        return None
    weight, bias = base.weight, base.bias
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    tensors = (weight, lora_a, lora_b) + ((bias,) if bias is not None else ())
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return None  # a trained base weight needs its own gradient: peft's path
    if any(hasattr(t, "ds_id") or t.dtype != x.dtype or t.device != x.device for t in tensors):
        return None  # ZeRO-3 partitioned, or a cast peft would make
    return weight, bias, lora_a, lora_b, float(layer.scaling[name])


def check(peft_model, rtol: float | None = None) -> float:
    """LoraLinear against peft's forward on the first fused layer (random x, incoming gradient): largest
    difference of the output and of ∂x, ∂A, ∂B relative to each one's largest entry; ValueError above
    `rtol` (1e-5 fp32, 1e-2 16-bit). 0.0 when no layer takes the fast path."""
    layer = next((m for m in peft_model.modules() if hasattr(m, "_peft_forward")), None)
    if layer is None:
        return 0.0
    base = layer.get_base_layer()
    device = base.weight.device
    rng = torch.Generator(device).manual_seed(0)  # its own generator: training's random stream is untouched
    x = torch.randn(2, 5, base.in_features, dtype=base.weight.dtype, device=device, generator=rng)
    if _operands(layer, x) is None:
        return 0.0
    if rtol is None:
        rtol = 1e-5 if x.dtype == torch.float32 else 1e-2
    name = layer.active_adapters[0]
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    saved = lora_b.detach().clone()
    try:
        with torch.no_grad():
            lora_b.normal_(generator=rng)  # B starts at 0: a random B makes the low-rank term count
        results = [_output_and_grads(run, x, lora_a, lora_b) for run in (layer.forward, layer._peft_forward)]
    finally:
        with torch.no_grad():
            lora_b.copy_(saved)
    worst = 0.0
    for fast, slow in zip(*results, strict=True):
        scale = slow.abs().max().clamp(min=1e-12)
        worst = max(worst, float((fast - slow).abs().max() / scale))
    if not worst <= rtol:
        raise ValueError(
            f"the fused LoRA linear (rainbowpo.lora_fused.LoraLinear) differs from peft's by {worst:.3g} of the "
            f"largest entry (> {rtol}); model.lora.fused: false trains with peft's own forward"
        )
    return worst


def _output_and_grads(run, x, lora_a, lora_b):
    with torch.enable_grad():
        xi = x.clone().requires_grad_()
        y = run(xi)
        weights = torch.linspace(0.5, 1.5, y.shape[-1], dtype=y.dtype, device=y.device)
        return (y.detach(), *torch.autograd.grad((y * weights).sum(), (xi, lora_a, lora_b)))
