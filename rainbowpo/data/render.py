"""The one prompt renderer: a prompt (text or messages) → token ids, used by every stage.

Training (`rainbowpo.data.tokenize`), generation, scoring and evaluation (`data_prep`) all call
`prompt_ids` (or `render_prompt` + `encode_prompt`), so they agree on the chat template and on BOS:

- a string prompt is used as it is; a list of messages goes through the tokenizer's chat template with
  the generation prompt appended (`chat_template_kwargs`, e.g. ``{"enable_thinking": False}``, passed on);
- the rendered text is tokenized with the tokenizer's special tokens unless the template already wrote
  the BOS, so the ids hold exactly one BOS (none for tokenizers without one), and never end with EOS.

Engines receive these ids (vLLM as `TokensPrompt`), never the text, so nothing re-tokenizes a prompt.

A conversational response's ids (`response_ids`) are the ids of the whole rendered conversation minus
the prompt's ids, so they end with whatever the template writes at the end of an assistant turn
(`<|eot_id|>`, `<|im_end|>\\n`), once; EOS is appended only when that ends in no special token.
"""

from __future__ import annotations

from collections.abc import Mapping


class NoChatTemplate(ValueError):
    """Conversational input for a tokenizer without a chat template."""


class TemplatePrefixError(ValueError):
    """The template renders prompt + response so that it does not start with the prompt's own rendering."""


def render_prompt(tokenizer, prompt: str | list[dict], chat_template_kwargs: Mapping | None = None) -> str:
    """The prompt's text: a string as it is, messages through the chat template + generation prompt."""
    if isinstance(prompt, str):
        return prompt
    return _apply(tokenizer, prompt, True, chat_template_kwargs)


def render_conversation(tokenizer, messages: list[dict], chat_template_kwargs: Mapping | None = None) -> str:
    """A whole conversation's text through the chat template (no generation prompt)."""
    return _apply(tokenizer, messages, False, chat_template_kwargs)


def _apply(tokenizer, messages: list[dict], generation_prompt: bool, kwargs: Mapping | None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("conversational prompts need a tokenizer with a chat template")
    return tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=generation_prompt, **dict(kwargs or {})
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


def response_ids(
    tokenizer,
    prompt: list[dict],
    response: list[dict],
    prompt_token_ids: list[int],
    chat_template_kwargs: Mapping | None = None,
) -> list[int]:
    """ids(render(prompt + response)) minus `prompt_token_ids` (= `prompt_ids(prompt)`), checked to be a prefix.

    The response ends as the template ends an assistant turn; when that is no special token (a template
    that writes no end-of-turn marker) EOS is appended, so every response still ends the sequence.
    """
    full = encode_prompt(
        tokenizer, render_conversation(tokenizer, list(prompt) + list(response), chat_template_kwargs)
    )
    n = len(prompt_token_ids)
    if full[:n] != prompt_token_ids:
        at = next((i for i, (a, b) in enumerate(zip(full, prompt_token_ids)) if a != b), min(n, len(full)))
        raise TemplatePrefixError(
            f"the chat template renders prompt + response so that it does not start with the prompt rendered "
            f"with add_generation_prompt=True: they part at token {at} (prompt: "
            f"{tokenizer.decode(prompt_token_ids[at : at + 6])!r}, conversation: {tokenizer.decode(full[at : at + 6])!r}); "
            "the response ids are the conversation's minus the prompt's, so the template must render the prompt "
            "as a prefix (check data.chat_template_kwargs, e.g. enable_thinking, or the template)"
        )
    ids = full[n:]
    if not ends_turn(tokenizer, ids):
        ids = ids + [tokenizer.eos_token_id]
    return ids


def ends_turn(tokenizer, ids: list[int]) -> bool:
    """True when the last non-whitespace token is EOS or another special token (the template's end of turn)."""
    special = set(tokenizer.all_special_ids)
    special |= {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    special -= {tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id} - {
        tokenizer.eos_token_id
    }
    for i in reversed(ids):
        if i in special or i == tokenizer.eos_token_id:
            return True
        if tokenizer.decode([i]).strip():
            return False
    return False
