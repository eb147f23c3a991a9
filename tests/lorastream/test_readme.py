"""The README says what a version's directory holds and what a GenerationResult needs (#22)."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).parents[2] / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readme_lists_exactly_the_files_of_a_version() -> None:
    """The first paragraph of "Serving the adapters by hand" names every file the store
    writes: its file-name constants, the manifest, and PEFT's model card (which
    tests/trainer/test_store.py finds in a real saved version)."""
    from trainer.manifest import MANIFEST_FILE
    from trainer.store import (
        ADAPTER_FILE,
        CONFIG_FILE,
        EVAL_SET_FILE,
        METADATA_FILE,
        OPTIMIZER_FILE,
        REHEARSAL_FILE,
    )

    paragraph = _section("Serving the adapters by hand").split("\n\n", 1)[0]
    named = set(re.findall(r"`([\w.-]+\.(?:safetensors|json|jsonl|md))`", paragraph))
    written = {
        ADAPTER_FILE,
        CONFIG_FILE,
        OPTIMIZER_FILE,
        METADATA_FILE,
        EVAL_SET_FILE,
        REHEARSAL_FILE,
        MANIFEST_FILE,
        "README.md",
    }
    assert named == written, (sorted(named - written), sorted(written - named))


def test_the_readme_says_the_entropy_is_required() -> None:
    text = " ".join(README.split())
    assert "the entropy, which is required" in text
    assert "one of entropy_delta, or the pair entropy_before and entropy_after, is required" in (
        text
    )
