"""Row formats → (prompt text, response texts). SPEC §2.

- standard:       {"prompt": str, "chosen": str, "rejected": str}
- conversational: {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
- implicit:       {"chosen": [full conversation], "rejected": [full conversation]} sharing a prefix
- sft:            {"prompt": str|[messages], "completion": str|[messages]} or {"messages": [...]}
Conversations are rendered with the tokenizer's chat template; the prompt gets the generation prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from rainbowpo.data import render


class BadRow(ValueError):
    """A row that cannot be used; `kind` names the problem for the skip counters."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class RowTexts:
    prompt: str
    responses: tuple[str, ...]  # (chosen, rejected) or (completion,)


def detect_format(row: dict, mode: str) -> str:
    if mode == "sft":
        return "sft"
    if "prompt" not in row and isinstance(row.get("chosen"), list):
        return "implicit"
    conversational = isinstance(row.get("chosen"), list) or isinstance(row.get("prompt"), list)
    return "conversational" if conversational else "standard"


def row_texts(row: dict, fmt: str, mode: str, tokenizer) -> RowTexts:
    row = {k: v for k, v in row.items() if v is not None}  # `datasets` fills absent columns with None
    fmt = detect_format(row, mode) if fmt == "auto" else fmt
    if mode == "sft" or fmt == "sft":
        return _sft(row, tokenizer)
    if fmt == "standard":
        prompt, chosen, rejected = (_text(row, k) for k in ("prompt", "chosen", "rejected"))
    elif fmt == "conversational":
        prompt_msgs = _messages(row, "prompt")
        prompt = render_prompt(tokenizer, prompt_msgs)
        chosen, rejected = (
            _render_response(tokenizer, prompt_msgs, _messages(row, k), k) for k in ("chosen", "rejected")
        )
    else:  # implicit prompt: the longest common message prefix
        full_c, full_r = _messages(row, "chosen"), _messages(row, "rejected")
        k = 0
        while k < min(len(full_c), len(full_r)) - 1 and full_c[k] == full_r[k]:
            k += 1
        if k == 0:
            raise BadRow("no_common_prompt", "chosen and rejected share no prompt messages (implicit format)")
        prompt = render_prompt(tokenizer, full_c[:k])
        chosen = _render_response(tokenizer, full_c[:k], full_c[k:], "chosen")
        rejected = _render_response(tokenizer, full_c[:k], full_r[k:], "rejected")
    if chosen == rejected:
        raise BadRow("chosen_equals_rejected", "'chosen' and 'rejected' are identical")
    return RowTexts(prompt, (chosen, rejected))


def _sft(row: dict, tokenizer) -> RowTexts:
    if "messages" in row:
        msgs = _messages(row, "messages")
        if msgs[-1].get("role") != "assistant" or len(msgs) < 2:
            raise BadRow("broken_messages", "'messages' must end with an assistant turn after a prompt")
        return RowTexts(
            render_prompt(tokenizer, msgs[:-1]),
            (_render_response(tokenizer, msgs[:-1], msgs[-1:], "messages"),),
        )
    if isinstance(row.get("prompt"), list):
        prompt_msgs = _messages(row, "prompt")
        completion_msgs = (
            _messages(row, "completion")
            if isinstance(row.get("completion"), list)
            else [{"role": "assistant", "content": _text(row, "completion")}]
        )
        return RowTexts(
            render_prompt(tokenizer, prompt_msgs),
            (_render_response(tokenizer, prompt_msgs, completion_msgs, "completion"),),
        )
    return RowTexts(_text(row, "prompt"), (_text(row, "completion"),))


def _text(row: dict, key: str) -> str:
    if key not in row or row[key] is None:
        raise BadRow("missing_column", f"missing column {key!r} (columns: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow("not_a_string", f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow("empty", f"{key!r} is empty")
    return value


def _messages(row: dict, key: str) -> list[dict]:
    if key not in row or row[key] is None:
        raise BadRow("missing_column", f"missing column {key!r} (columns: {sorted(row)})")
    msgs = row[key]
    ok = (
        isinstance(msgs, list)
        and msgs
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in msgs
        )
    )
    if not ok:
        raise BadRow(
            "broken_messages", f"{key!r} must be a non-empty list of {{role, content}} string messages"
        )
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def render_prompt(tokenizer, messages: list[dict]) -> str:
    try:
        return render.render_prompt(tokenizer, messages)
    except render.NoChatTemplate:
        raise BadRow(
            "no_chat_template", "conversational rows need a tokenizer with a chat template"
        ) from None


def _render_response(tokenizer, prompt_msgs: list[dict], response_msgs: list[dict], key: str) -> str:
    """The text the template adds after the prompt's generation prompt; the end-of-turn EOS is left to the tokenizer step."""
    if not response_msgs or not all(m.get("content", "").strip() for m in response_msgs):
        raise BadRow("empty", f"{key!r} has no response content")
    prompt = render_prompt(tokenizer, prompt_msgs)
    full = tokenizer.apply_chat_template(prompt_msgs + response_msgs, tokenize=False)
    if not full.startswith(prompt):
        raise BadRow(
            "template_mismatch", f"{key!r}: the chat template does not render the prompt as a prefix"
        )
    response = full[len(prompt) :]
    eos = tokenizer.eos_token or ""
    stripped = response.rstrip()
    if eos and stripped.endswith(eos):
        response = stripped[: -len(eos)]
    return response
