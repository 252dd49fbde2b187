"""Security rules of docs/reliability.md, checked over the source tree."""

from __future__ import annotations

import re
from pathlib import Path

from rainbowpo.config import load_config

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("rainbowpo", "data_prep", "launch", "benchmarks") for p in (ROOT / d).rglob("*.py")]


def test_sources_found():
    assert len(SOURCES) > 20


def test_torch_load_only_with_weights_only():
    for path in SOURCES:
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"


def test_no_shell_strings():
    pattern = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(")
    for path in SOURCES:
        assert not pattern.search(path.read_text()), path


def test_remote_code_off_unless_asked():
    cfg = load_config(None, ["model.path=m", "data.train=p.jsonl"])
    assert cfg.model.trust_remote_code is False
    for path in SOURCES:
        assert "trust_remote_code=True" not in path.read_text(), path
