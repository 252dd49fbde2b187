"""Per-sequence log-likelihoods (and reference entropies) with the LM head applied only where needed.

    scorer = SequenceScorer(model)             # wraps any AutoModelForCausalLM; deepspeed wraps the scorer
    logp, entropy = scorer(batch, with_entropy=True)   # [S] sums over response tokens

The model body gives hidden states; only the response positions (`batch.target_index`) go through the
LM head. When their logits would exceed `keep_logits_mb` (positions × vocab × 4 bytes) the head runs in
chunks recomputed in backward, so no [tokens, vocab] tensor is kept for the batch; below it the logits
stay in memory and nothing is recomputed.
The head is called as a module (never by reading `.weight`): under ZeRO-3 its hooks gather the weight.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from rainbowpo.attention import PACKED_SDPA, block_mask_4d


def vocab_size(model) -> int:
    """V of SPEC §1: the LM head's output dimension (not the tokenizer length)."""
    head = model.get_output_embeddings()
    return int(getattr(head, "out_features", None) or model.config.vocab_size)


def _token_stats(
    head, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None, with_entropy: bool
):
    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logprobs = torch.log_softmax(logits, dim=-1)  # its fused backward beats logsumexp's by ~20 % on CPU
    logp = logprobs.gather(-1, targets[:, None]).squeeze(-1)
    if not with_entropy:
        return logp, torch.zeros_like(logp)
    entropy = -(logprobs.exp() * logprobs).sum(-1)
    return logp, entropy


class SequenceScorer(torch.nn.Module):
    def __init__(self, model, chunk_size: int = 1024, keep_logits_mb: float = 512):
        super().__init__()
        self.model = model
        self.chunk_size, self.keep_logits_mb = chunk_size, keep_logits_mb

    def forward(self, batch, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        body = _decoder(self.model)
        kwargs = self._model_kwargs(batch)
        if body is None:  # no reachable body: full logits (every position), then pick the response ones
            logits = self.model(**kwargs).logits
            flat = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.target_index)
            head = torch.nn.Identity()
        else:
            hidden = body(**kwargs).last_hidden_state
            flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.target_index)
            head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        logits_mb = flat.shape[0] * vocab_size(self.model) * 4 / 2**20
        recompute = torch.is_grad_enabled() and logits_mb > self.keep_logits_mb
        chunk = self.chunk_size if recompute or not torch.is_grad_enabled() else max(1, flat.shape[0])
        logps, entropies = [], []
        for start in range(0, flat.shape[0], chunk):
            h, t = flat[start : start + chunk], batch.target_ids[start : start + chunk]
            if recompute:
                lp, ent = checkpoint(_token_stats, head, h, t, softcap, with_entropy, use_reentrant=False)
            else:
                lp, ent = _token_stats(head, h, t, softcap, with_entropy)
            logps.append(lp)
            entropies.append(ent)
        seq = batch.target_seq
        zeros = torch.zeros(batch.num_seqs, dtype=torch.float32, device=flat.device)
        logp = zeros.index_add(0, seq, torch.cat(logps)) if logps else zeros
        entropy = zeros.index_add(0, seq, torch.cat(entropies)).detach() if with_entropy and logps else None
        return logp, entropy

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
