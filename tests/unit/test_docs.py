"""Docs that must match the code."""

from __future__ import annotations

import re
from pathlib import Path

from rainbowpo.config_doc import markdown

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_doc_is_generated_from_the_config_tree():
    assert (ROOT / "docs" / "configuration.md").read_text() == markdown(), (
        "docs/configuration.md is stale: python -m rainbowpo.config_doc > docs/configuration.md"
    )


def test_relative_links_in_docs_exist():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_readme_starts_with_the_two_commands():
    block = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in block] == ["bash launch/demo.sh", "bash tests/run.sh"]
