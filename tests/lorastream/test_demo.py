"""``lorastream demo``, the README's first command, end to end on the session's broker."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.kafka_util import LORASTREAM

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]


def test_demo_runs_the_whole_pipeline(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "LORASTREAM_HOME": str(tmp_path / "home"),
        "LORASTREAM_ADAPTER_DIR": str(tmp_path / "adapters"),
        "COLUMNS": "200",
    }
    env.pop("LORASTREAM_TOPIC_PREFIX", None)
    done = subprocess.run(
        [LORASTREAM, "demo", "--timeout", "300"],
        env=env,
        capture_output=True,
        text=True,
        timeout=380,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"using the Kafka broker that answers at {kafka_bootstrap}" in output
    # Three bad lines reported by number, one bad record dead-lettered by the scorer.
    assert re.findall(r"generation-results\.jsonl:(\d+): invalid", output) == ["11", "41", "71"]
    assert "dead letters: 1" in output
    announced = re.findall(r"announced (\S+) v(\d+)", output)
    assert sorted(announced) == [
        ("math-tutor", "1"),
        ("math-tutor", "2"),
        ("math-tutor", "3"),
        ("support-bot", "1"),
        ("support-bot", "2"),
    ]
    # The newest versions load with PEFT and lower the loss on the adapters' own pairs.
    for adapter, version in (("math-tutor", 3), ("support-bot", 2)):
        match = re.search(
            rf"{adapter} v{version}: PeftModel\.from_pretrained OK .*base ([\d.]+) → with the adapter ([\d.]+)",
            output,
        )
        assert match, output
        assert float(match[2]) < float(match[1])
    files = sorted(
        p.relative_to(tmp_path / "adapters") for p in (tmp_path / "adapters").rglob("*.safetensors")
    )
    assert len(files) == 10, files  # adapter + optimizer state for each of the 5 versions
