"""The one prompt renderer: a prompt (text or messages) → token ids, used by every stage.

Training (`rainbowpo.data.tokenize`), generation, scoring and evaluation (`data_prep`) all call
`prompt_ids` (or `render_prompt` + `encode_prompt`), so they agree on the chat template and on BOS:

- a string prompt is used as it is; a list of messages goes through the tokenizer's chat template with
  the generation prompt appended (`chat_template_kwargs`, e.g. ``{"enable_thinking": False}``, passed on);
- the rendered text is tokenized with the tokenizer's special tokens unless the template already wrote
  the BOS, so the ids hold exactly one BOS (none for tokenizers without one), and never end with EOS.

Engines receive these ids (vLLM as `TokensPrompt`), never the text, so nothing re-tokenizes a prompt.
"""

from __future__ import annotations

from collections.abc import Mapping


class NoChatTemplate(ValueError):
    """Conversational input for a tokenizer without a chat template."""


def render_prompt(tokenizer, prompt: str | list[dict], chat_template_kwargs: Mapping | None = None) -> str:
    """The prompt's text: a string as it is, messages through the chat template + generation prompt."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("conversational prompts need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(
        list(prompt), tokenize=False, add_generation_prompt=True, **dict(chat_template_kwargs or {})
    )


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Rendered prompt text → ids with exactly one BOS (where the tokenizer has one) and no trailing EOS."""
    bos = tokenizer.bos_token
    already_has_bos = bool(bos) and text.startswith(bos)
    ids = tokenizer(text, add_special_tokens=not already_has_bos).input_ids
    if (
        tokenizer.eos_token_id is not None
        and ids
        and ids[-1] == tokenizer.eos_token_id
        and not text.endswith(tokenizer.eos_token or "\0")
    ):
        ids = ids[:-1]  # tokenizers that append EOS to every encode: the prompt must not end the sequence
    return ids


def prompt_ids(tokenizer, prompt: str | list[dict], chat_template_kwargs: Mapping | None = None) -> list[int]:
    """`render_prompt` then `encode_prompt`: the token ids every stage feeds the model for this prompt."""
    return encode_prompt(tokenizer, render_prompt(tokenizer, prompt, chat_template_kwargs))
