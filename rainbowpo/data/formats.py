"""Row formats → a prompt and its responses, as strings or as chat messages. SPEC §2, docs/data.md.

Preference rows (`data.format: auto` decides per source, from the source's first row):

- standard:       {"prompt": str, "chosen": str, "rejected": str}
- conversational: {"prompt": [messages], "chosen": [messages] | str, "rejected": [messages] | str}; responses
                  that repeat the prompt's messages have them removed
- implicit:       {"chosen": [conversation], "rejected": [conversation]}: the prompt is the longest shared
                  message prefix (TRL's `maybe_extract_prompt` rule). A string "prompt" next to conversational
                  responses (ultrafeedback_binarized, llama3-ultrafeedback-armorm) is this format too — the
                  prefix is the prompt and the string must equal its last user turn — or, when the responses
                  are assistant turns only, the string is the user turn.
- sft:            {"prompt": str|[messages], "completion": str|[messages]} or {"messages": [...]}

A response is the assistant turn(s) after the prompt and must end with an assistant turn; a multi-turn
prompt keeps all earlier turns. Messages keep every field (`tool_calls`, `reasoning_content`, ...) and go
to the chat template as they are; only fields that are None (`datasets` fills absent struct fields with
None) are dropped. Columns the format does not name are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("standard", "conversational", "implicit", "sft")


class BadRow(ValueError):
    """A row that cannot be used; `kind` names the problem for the skip counters."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ParsedRow:
    """`prompt` is a string (responses are strings) or a message list (responses are message lists)."""

    prompt: str | list[dict]
    responses: tuple  # (chosen, rejected) or (completion,)


def is_messages(value) -> bool:
    """TRL's `is_conversational` test: a list whose first item is a dict with a role."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def detect_format(row: dict, mode: str) -> str:
    """The format a row's columns imply (see the module docstring)."""
    if mode == "sft":
        return "sft"
    row = _present(row)
    if is_messages(row.get("prompt")):
        return "conversational"
    return "implicit" if is_messages(row.get("chosen")) or is_messages(row.get("rejected")) else "standard"


def source_format(first_row: dict, forced: str, mode: str) -> str:
    """A source's format: `data.format` when set, else what its first row implies."""
    if mode == "sft" or forced == "sft":
        return "sft"
    return forced if forced != "auto" else detect_format(first_row, mode)


def parse_row(row: dict, fmt: str, mode: str) -> ParsedRow:
    """The row's prompt and responses under its source's format `fmt`; BadRow when it does not fit."""
    row = _present(row)
    if mode == "sft" or fmt == "sft":
        return _sft(row)
    _check_same_format(row, fmt)
    if fmt == "standard":
        return ParsedRow(_text(row, "prompt"), (_text(row, "chosen"), _text(row, "rejected")))
    if fmt == "conversational":
        prompt = _messages(row, "prompt")
        return ParsedRow(prompt, tuple(_response(row, k, prompt) for k in ("chosen", "rejected")))
    return _implicit(row)


def _present(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None}  # `datasets` fills absent columns with None


def _shape(value) -> str:
    if isinstance(value, str):
        return "a string"
    return "a message list" if is_messages(value) else "other"


def _check_same_format(row: dict, fmt: str) -> None:
    """One source holds one format: a column whose type belongs to another format is a bad row."""
    want = {
        "standard": {"prompt": "a string", "chosen": "a string", "rejected": "a string"},
        "conversational": {"prompt": "a message list"},
        "implicit": {"chosen": "a message list", "rejected": "a message list"},
    }[fmt]
    for key, shape in want.items():
        got = _shape(row.get(key)) if key in row else "other"
        if got != "other" and got != shape:
            raise BadRow(
                "mixed_formats",
                f"{key!r} is {got} but this source's rows are {fmt} ({key!r} {shape}; decided by its first "
                "row or data.format): one source holds one format — split the file or fix the row",
            )


def _implicit(row: dict) -> ParsedRow:
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    prompt = chosen[:k]
    if isinstance(row.get("prompt"), str):
        text = _text(row, "prompt")
        if k == 0 and chosen[0].get("role") == rejected[0].get("role") == "assistant":
            prompt = [{"role": "user", "content": text}]  # responses without the user turn: the string is it
        elif k > 0:
            users = [m for m in prompt if m.get("role") == "user"]
            last = users[-1].get("content") if users else None
            if not isinstance(last, str) or last.strip() != text.strip():
                raise BadRow(
                    "prompt_mismatch",
                    f"'prompt' ({_short(text)}) is not the last user turn that 'chosen' and 'rejected' share "
                    f"({_short(last)}): the prompt column and the conversations disagree",
                )
    if not prompt:
        raise BadRow(
            "no_common_prompt",
            "'chosen' and 'rejected' share no leading messages, so they hold no prompt (implicit format: "
            "both must start with the same prompt turns)",
        )
    return ParsedRow(
        prompt, (_response_turns(chosen[k:], "chosen"), _response_turns(rejected[k:], "rejected"))
    )


def _response(row: dict, key: str, prompt: list[dict]) -> list[dict]:
    """A conversational response: a string is one assistant turn; a repeat of the prompt is removed."""
    if isinstance(row.get(key), str):
        return _response_turns([{"role": "assistant", "content": _text(row, key)}], key)
    msgs = _messages(row, key)
    if len(msgs) > len(prompt) and msgs[: len(prompt)] == prompt:
        msgs = msgs[len(prompt) :]
    return _response_turns(msgs, key)


def _response_turns(msgs: list[dict], key: str) -> list[dict]:
    """Assistant (and tool) turns ending with an assistant turn that says something."""
    if not msgs:
        raise BadRow("empty", f"{key!r} has no response after the prompt")
    if msgs[-1].get("role") != "assistant":
        raise BadRow(
            "last_turn_not_assistant",
            f"{key!r}: the last message is a {msgs[-1].get('role')!r} turn; a response must end with an "
            "assistant turn",
        )
    other = [m.get("role") for m in msgs if m.get("role") in ("user", "system")]
    if other:
        raise BadRow(
            "response_not_assistant",
            f"{key!r}: the response after the prompt holds a {other[0]!r} turn; only the final assistant "
            "turn(s) may follow the prompt (put earlier turns in the prompt)",
        )
    last = msgs[-1]
    if not (_has_text(last.get("content")) or last.get("tool_calls")):
        raise BadRow("empty", f"{key!r}: the final assistant turn has no content")
    return msgs


def _has_text(content) -> bool:
    return bool(content.strip()) if isinstance(content, str) else bool(content)


def _sft(row: dict) -> ParsedRow:
    if "messages" in row:
        msgs = _messages(row, "messages")
        if len(msgs) < 2:
            raise BadRow("broken_messages", "'messages' must hold a prompt and a final assistant turn")
        return ParsedRow(msgs[:-1], (_response_turns(msgs[-1:], "messages"),))
    if is_messages(row.get("prompt")) or is_messages(row.get("completion")):
        prompt = (
            _messages(row, "prompt")
            if is_messages(row.get("prompt"))
            else [{"role": "user", "content": _text(row, "prompt")}]
        )
        return ParsedRow(prompt, (_response(row, "completion", prompt),))
    return ParsedRow(_text(row, "prompt"), (_text(row, "completion"),))


def _text(row: dict, key: str) -> str:
    if key not in row:
        raise BadRow("missing_column", f"missing column {key!r} (columns: {sorted(row)})")
    value = row[key]
    if not isinstance(value, str):
        raise BadRow("not_a_string", f"{key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRow("empty", f"{key!r} is empty")
    return value


def _messages(row: dict, key: str) -> list[dict]:
    """A non-empty list of {role, content, ...} dicts, every field kept except those that are None."""
    if key not in row:
        raise BadRow("missing_column", f"missing column {key!r} (columns: {sorted(row)})")
    msgs = row[key]
    if not isinstance(msgs, list) or not msgs:
        raise BadRow(
            "broken_messages",
            f"{key!r} must be a non-empty list of {{role, content}} messages, got {_short(msgs)}",
        )
    out = []
    for i, m in enumerate(msgs):
        m = _present(m) if isinstance(m, dict) else m
        content_ok = isinstance(m, dict) and (
            isinstance(m.get("content"), (str, list)) or ("content" not in m and "tool_calls" in m)
        )
        if not (content_ok and isinstance(m.get("role"), str)):
            raise BadRow(
                "broken_messages",
                f"{key!r} must be a non-empty list of {{role, content}} messages; message {i} is {_short(m)}",
            )
        out.append(m)
    return out


def _short(value, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."
