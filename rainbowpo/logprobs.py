"""Per-sequence log-likelihoods (and reference entropies) with the LM head applied only where needed.

    scorer = SequenceScorer(model)             # wraps any AutoModelForCausalLM; deepspeed wraps the scorer
    logp, entropy = scorer(batch, with_entropy=True)   # [S] sums over response tokens

The model body gives hidden states; only the response positions (`batch.target_index`) go through the
LM head. When their logits would exceed `keep_logits_mb` (positions × vocab × 4 bytes) the head runs in
chunks recomputed in backward, so no [tokens, vocab] tensor is kept for the batch; below it one such tensor
stays in memory and nothing is recomputed: `HeadLogProb` turns the logits into the softmax in place, keeps
only that for backward and turns it into the logits' gradient in place there (log_softmax + gather under
autograd keeps two [tokens, vocab] tensors and makes two more in backward). `check_head` compares its
log-probs and gradients with autograd's on the first batch.
The head is called as a module (never by reading `.weight`): under ZeRO-3 its hooks gather the weight.
What the model's own forward does to the logits after its LM head is applied too (`logit_transform`:
Cohere `logit_scale`, Granite `logits_scaling`, Gemma-2/3 `final_logit_softcapping`); `check_head` compares
the result with `log_softmax(model(...).logits)` once before training, so a new architecture that transforms
its logits in another way stops the run instead of training on the wrong distribution.

Mixture-of-experts models: with `aux_coef > 0` the body also returns its router logits and the model's own
load-balancing loss is kept in `scorer.aux_loss` for the trainer to add.
"""

from __future__ import annotations

import sys

import torch
from torch.utils.checkpoint import checkpoint

from rainbowpo.attention import PACKED_SDPA, block_mask_4d


def vocab_size(model) -> int:
    """V of SPEC §1: the LM head's output dimension (not the tokenizer length)."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or model.config.vocab_size)


def logit_transform(config) -> tuple[float, float | None]:
    """(scale, softcap) that the model's own `*ForCausalLM.forward` applies after `lm_head`:
    logits · scale, then tanh(logits / cap) · cap. Cohere multiplies by `logit_scale`, Granite divides by
    `logits_scaling`, Gemma-2/3 soft-cap with `final_logit_softcapping` (text config for multimodal ones)."""
    config = getattr(config, "text_config", None) or config
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None and str(config.model_type).startswith("cohere"):
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    cap = getattr(config, "final_logit_softcapping", None)
    return scale, (float(cap) if cap else None)


def _token_stats(head, hidden: torch.Tensor, targets: torch.Tensor, transform: tuple, with_entropy: bool):
    scale, softcap = transform
    logits = head(hidden).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logprobs = torch.log_softmax(logits, dim=-1)  # its fused backward beats logsumexp's by ~20 % on CPU
    logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


class HeadLogProb(torch.autograd.Function):
    """log p(target) = z[target] − logsumexp(z), z = scale · (h Wᵀ + b), one [N, V] fp32 buffer in all.

    Forward: the logits become the softmax p in place, which is all backward keeps (besides h and W).
    Backward: ∂ log p(t)/∂z = onehot(t) − p, so g · (onehot − p) is written over p in place, then
    ∂h = scale · G W and ∂W = scale · Gᵀ h. A second backward through the same graph finds p modified and
    autograd raises; it never reuses a stale buffer silently."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale: float):
        logits = torch.nn.functional.linear(hidden, weight, bias).float()  # fp32 weights: no copy is made
        if scale != 1.0:
            logits.mul_(scale)
        picked = logits.gather(-1, targets[:, None]).squeeze(-1)
        peak = logits.amax(-1, keepdim=True)
        probs = logits.sub_(peak).exp_()
        total = probs.sum(-1, keepdim=True)
        probs.div_(total)
        ctx.scale = scale
        ctx.save_for_backward(hidden, weight, bias, targets, probs)
        return picked - (peak + total.log()).squeeze(-1)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, probs = ctx.saved_tensors
        g = grad.float()[:, None]
        dz = probs.mul_(-g).scatter_add_(1, targets[:, None], g)
        if ctx.scale != 1.0:
            dz.mul_(ctx.scale)
        dz = dz.to(hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = dz @ weight if need_h else None
        grad_weight = dz.t() @ hidden if need_w else None
        grad_bias = dz.sum(0) if need_b else None
        return grad_hidden, grad_weight, grad_bias, None, None


def fused_head_applies(head, transform: tuple) -> bool:
    """HeadLogProb reads the weight itself: a plain Linear whose weight is whole (not ZeRO-3 partitioned,
    which the module's own hooks gather) and no soft-cap (Gemma-2's tanh goes through autograd)."""
    return type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_id") and transform[1] is None


class SequenceScorer(torch.nn.Module):
    def __init__(self, model, chunk_size: int = 1024, keep_logits_mb: float = 512, aux_coef: float = 0.0):
        super().__init__()
        self.model = model
        self.chunk_size, self.keep_logits_mb = chunk_size, keep_logits_mb
        self.aux_coef = aux_coef if is_moe(model) else 0.0
        self.aux_loss: torch.Tensor | None = None  # the last forward's router load-balancing loss (MoE)

    def forward(self, batch, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        body = _decoder(self.model)
        kwargs = self._model_kwargs(batch)
        if self.aux_coef > 0 and torch.is_grad_enabled():
            kwargs["output_router_logits"] = True
        if body is None:  # no reachable body: full logits (every position), then pick the response ones
            out = self.model(**kwargs)
            logits = out.logits
            flat = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index)
            head, transform = torch.nn.Identity(), (1.0, None)  # the model applied its own transform
        else:
            out = body(**kwargs)
            hidden = out.last_hidden_state
            flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_index)
            head, transform = self.model.get_output_embeddings(), logit_transform(self.model.config)
        self.aux_loss = self._router_loss(out, batch) if "output_router_logits" in kwargs else None
        logits_mb = flat.shape[0] * vocab_size(self.model) * 4 / 2**20
        recompute = torch.is_grad_enabled() and logits_mb > self.keep_logits_mb
        chunk = self.chunk_size if recompute or not torch.is_grad_enabled() else max(1, flat.shape[0])
        logps, entropies = [], []
        fused = (
            torch.is_grad_enabled()
            and not recompute
            and not with_entropy
            and fused_head_applies(head, transform)
        )
        for start in range(0, flat.shape[0], chunk):
            h, t = flat[start : start + chunk], batch.target_ids[start : start + chunk]
            if fused:
                lp, ent = HeadLogProb.apply(h, head.weight, head.bias, t, transform[0]), None
            elif recompute:
                lp, ent = checkpoint(_token_stats, head, h, t, transform, with_entropy, use_reentrant=False)
            else:
                lp, ent = _token_stats(head, h, t, transform, with_entropy)
            logps.append(lp)
            entropies.append(ent)
        seq = batch.target_seq
        zeros = torch.zeros(batch.num_seqs, dtype=torch.float32, device=flat.device)
        logp = zeros.index_add(0, seq, torch.cat(logps)) if logps else zeros
        entropy = zeros.index_add(0, seq, torch.cat(entropies)).detach() if with_entropy and logps else None
        return logp, entropy

    def _router_loss(self, out, batch) -> torch.Tensor | None:
        """The model's own `load_balancing_loss_func` over this forward's router logits (as its forward does)."""
        logits = getattr(out, "router_logits", None)
        loss_fn = getattr(sys.modules[type(self.model).__module__], "load_balancing_loss_func", None)
        if not logits or loss_fn is None:
            return None
        cfg = self.model.config
        experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
        mask = batch.attention_mask if batch.segments is None else None
        return loss_fn(logits, experts, cfg.num_experts_per_tok, mask)

    def _model_kwargs(self, batch) -> dict:
        kwargs = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)
        impl = self.model.config._attn_implementation
        if batch.segments is None:
            kwargs["attention_mask"] = batch.attention_mask
        elif impl == PACKED_SDPA:
            kwargs["rainbowpo_segments"] = batch.segments
        elif impl in ("sdpa", "eager"):
            kwargs["attention_mask"] = block_mask_4d(
                batch.segments, batch.input_ids.shape[1], batch.input_ids.device
            )
        # flash_attention_2: position_ids restarting at 0 mark the packed sequences (varlen kernel)
        return kwargs


def _decoder(model):
    """The model body (`model.model` for HF causal LMs), or None when it is not reachable."""
    body = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    if body is None or body is model or model.get_output_embeddings() is None:
        return None
    return body


def is_moe(model) -> bool:
    """A sparse mixture-of-experts causal LM (its config counts experts per token)."""
    return getattr(model.config, "num_experts_per_tok", None) is not None


def router_aux_coef(model, configured: float | None) -> float:
    """train.router_aux_loss_coef, or the model config's own `router_aux_loss_coef`; 0 for dense models."""
    if not is_moe(model):
        return 0.0
    return float(configured if configured is not None else getattr(model.config, "router_aux_loss_coef", 0.0))


@torch.no_grad()
def check_head(scorer: SequenceScorer, batch, atol: float | None = None) -> float:
    """Fast-path log-probs vs log_softmax of the model's own `forward(...).logits` on `batch`; returns the
    largest mean difference per response token, raises ValueError naming the model when it exceeds `atol`
    (default 1e-3 for fp32 weights; 0.1 for 16-bit ones, whose own forward rounds the transformed logits).
    Also HeadLogProb's input gradient against autograd's (relative to its largest entry, same `atol`)."""
    model = scorer.model
    if atol is None:
        atol = 1e-3 if next(model.parameters()).dtype == torch.float32 else 0.1
    fast, _ = scorer(batch)
    logits = model(**scorer._model_kwargs(batch)).logits.float()
    flat = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index)
    per_token = torch.log_softmax(flat, -1).gather(-1, batch.target_ids[:, None]).squeeze(-1)
    own = torch.zeros_like(fast).index_add(0, batch.target_seq, per_token)
    tokens = torch.zeros_like(fast).index_add(0, batch.target_seq, torch.ones_like(per_token)).clamp(min=1)
    worst = float(((fast - own).abs() / tokens).max()) if fast.numel() else 0.0
    if not worst <= atol:
        raise ValueError(
            f"log-probs of the fast LM-head path differ from {type(model).__name__}'s own logits by {worst:.3g} "
            f"per token (> {atol}): this architecture transforms its logits after the LM head in a way "
            "rainbowpo.logprobs.logit_transform does not know. Add it there (see the model's forward) before "
            "training"
        )
    gradient = _check_fused_gradient(scorer, batch)
    if not gradient <= atol:
        raise ValueError(
            f"the fused LM-head gradient (rainbowpo.logprobs.HeadLogProb) differs from autograd's by {gradient:.3g} "
            f"of its largest entry (> {atol}) on {type(model).__name__}; train.keep_logits_mb: 0 trains "
            "without it (the head is then recomputed in chunks under autograd)"
        )
    return worst


def _check_fused_gradient(scorer: SequenceScorer, batch, positions: int = 64) -> float:
    """HeadLogProb against autograd through log_softmax on up to `positions` response positions: the
    largest difference of ∂(Σ c·log p)/∂h relative to its largest entry (0.0 when the fused path is not
    used). Per-position weights c make a wrong scaling of the incoming gradient show."""
    model = scorer.model
    body, head = _decoder(model), model.get_output_embeddings()
    transform = logit_transform(model.config)
    if body is None or not fused_head_applies(head, transform) or batch.target_index.numel() == 0:
        return 0.0
    hidden = body(**scorer._model_kwargs(batch)).last_hidden_state
    index = batch.target_index[:positions]
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
    targets = batch.target_ids[:positions]
    weights = torch.linspace(0.5, 1.5, len(index), device=h.device)
    with torch.enable_grad():
        h_fused, h_auto = h.clone().requires_grad_(), h.clone().requires_grad_()
        fused = HeadLogProb.apply(h_fused, head.weight, head.bias, targets, transform[0])
        auto, _ = _token_stats(head, h_auto, targets, transform, False)
        (grad_fused,) = torch.autograd.grad((fused * weights).sum(), h_fused)
        (grad_auto,) = torch.autograd.grad((auto * weights).sum(), h_auto)
    scale = grad_auto.abs().max().clamp(min=1e-12)
    return float((grad_fused - grad_auto).abs().max() / scale)
