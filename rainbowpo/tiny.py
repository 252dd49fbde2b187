"""Tiny tokenizers and models built on the fly — for tests, the demo and benchmarks (no hub downloads).

tok = train_sentencepiece(texts, "runs/tok", vocab_size=320)        # byte fallback, adds BOS
tok = train_bpe(texts, "runs/tok_bpe", vocab_size=300)               # `tokenizers` BPE, no BOS
model = build_tiny_model(tok, "runs/model", arch="llama", layers=2)  # random weights, saved
"""

from __future__ import annotations

import os
from collections.abc import Iterable

#: A minimal ChatML-style template (generation prompt supported) for conversational tests.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_sentencepiece(
    texts: Iterable[str], out_dir: str, vocab_size: int = 320, chat_template: str | None = None
):
    """Train a sentencepiece BPE model (byte fallback, BOS added; vocab ≥ 256 bytes + characters), save as HF."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    os.makedirs(out_dir, exist_ok=True)
    texts = list(texts)
    floor = 256 + 4 + len(set("".join(texts))) + 8  # byte pieces + specials + characters + a few merges
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=os.path.join(out_dir, "tokenizer"),
        vocab_size=max(vocab_size, floor),
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        minloglevel=2,
        hard_vocab_limit=False,
    )
    tok = LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True, add_eos_token=False)
    tok.pad_token = tok.convert_ids_to_tokens(0)
    if chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(out_dir)
    return tok


def train_bpe(texts: Iterable[str], out_dir: str, vocab_size: int = 300, chat_template: str | None = None):
    """Train a byte-level BPE with `tokenizers` (no BOS; EOS `</s>`, pad `<pad>`) and save it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(list(texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", pad_token="<pad>")
    if chat_template:
        tok.chat_template = chat_template
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


def build_tiny_model(
    tokenizer,
    out_dir: str | None = None,
    arch: str = "llama",
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
    **extra,
):
    """A randomly initialized causal LM sized for CPU tests; saved if out_dir.

    `arch` is any transformers model type (llama, qwen2, mistral, gemma2, cohere, granite, qwen2_moe,
    mixtral, …); `extra` config keys are passed through, e.g. a tiny MoE:
    build_tiny_model(tok, arch="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)"""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if out_dir:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    return model
