"""Replay speed on the real broker: events/s and windows/s, read alone and read + train.

Produces N learning events of one adapter (the four prompt → response pairs of
the tests, repeated), then times (1) the dry-run pass, which reads and groups
the range without training, (2) the replay itself in this process (read,
train every window, announce each version in its transaction), and (3) the
``lorastream replay`` command end to end, process start and model load
included. Uses KAFKA_BOOTSTRAP_SERVERS if set, else starts the local broker on
free ports for the run.

    .venv/bin/python bench/bench_replay.py [--events 1000] [--base-model PATH] [--device cpu]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.broker import bench_bootstrap
from bench.report import Row, add_json_option, write_json
from lorastream.dev.events import learning_event
from lorastream.dev.topics import make_topics, produce
from lorastream.dev.workers import LORASTREAM, worker_env
from lorastream.settings import load_settings
from lorastream.stages import replay_config, replay_decoder
from schemas import encode
from trainer import Replay, WindowTrainer


def _events(n: int) -> list[tuple[bytes, bytes]]:
    return [(b"tutor", encode(learning_event("tutor", i))) for i in range(n)]


async def main(n: int, base_model: Path | None, device: str, json_path: Path | None = None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    with bench_bootstrap(tmp) as bootstrap:
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        topics = await make_topics(bootstrap, prefix, partitions=1)
        await produce(bootstrap, topics.learning_events, _events(n))
        flags = {"base_model": base_model, "device": device}
        settings = load_settings(
            bootstrap_servers=bootstrap,
            topic_prefix=prefix,
            adapter_dir=tmp / "adapters",
            home=tmp / "home",
            **{k: v for k, v in flags.items() if v is not None},
        )

        config = replay_config(settings, source="tutor", target="tutor-inproc")
        replay = Replay(config, replay_decoder(settings, "tutor", rescore=False))
        t0 = time.perf_counter()
        plan = await replay.plan()
        read = time.perf_counter() - t0
        counts = plan.adapters["tutor"]

        t0 = time.perf_counter()
        core = await asyncio.to_thread(WindowTrainer.load, config.training)
        loaded = time.perf_counter() - t0
        async with replay.session() as session:
            report = await replay.run(core, session)
        steps = sorted(t.step_seconds for t in report.trained)

        env = {
            **os.environ,
            **worker_env(bootstrap, prefix, tmp / "home", LORASTREAM_ADAPTER_DIR=str(tmp / "cli")),
        }
        if base_model is not None:
            env["LORASTREAM_BASE_MODEL"] = str(base_model)
        t0 = time.perf_counter()
        subprocess.run(
            [LORASTREAM, "replay", "--adapter", "tutor", "--into", "tutor-cli", "--device", device],
            env=env,
            check=True,
            capture_output=True,
            timeout=3600,
        )
        command = time.perf_counter() - t0

        windows = len(report.trained)
        print(f"events: {n} of one adapter, 1 partition, windows of {settings.window_size}")
        print(f"base model: {core.base.name} on {core.base.device} (loaded in {loaded:.2f}s)")
        print(
            f"read and group only (dry run): {read:.2f}s -> {n / read:,.0f} events/s "
            f"({counts.windows} windows, {counts.open_events} left open)"
        )
        print(
            f"replay in process: {report.seconds:.2f}s -> {report.events / report.seconds:,.1f} "
            f"events/s, {windows / report.seconds:.2f} windows/s ({windows} versions announced)"
        )
        print(
            f"  step: median {steps[len(steps) // 2] * 1000:.1f} ms, "
            f"p90 {steps[int(len(steps) * 0.9)] * 1000:.1f} ms; the rest is reading, "
            f"writing files and one transaction per version: "
            f"{(report.seconds - sum(steps)) / windows * 1000:.1f} ms per window"
        )
        print(
            f"`lorastream replay` end to end: {command:.2f}s -> {n / command:,.1f} events/s "
            "(process start, imports and model load included)"
        )
        if json_path is not None:
            read_rate = f"{n / read:,.0f} events/s (read and group only)"
            median = steps[len(steps) // 2] * 1000
            rest = (report.seconds - sum(steps)) / windows * 1000
            write_json(
                json_path,
                "Replay speed (lorastream replay, #7)",
                [
                    Row("read and group only (dry run)", f"{n / read:,.0f} events/s"),
                    Row(
                        "replay in process",
                        f"{report.events / report.seconds:,.1f} events/s",
                        reference=read_rate,
                    ),
                    Row("replay in process, windows", f"{windows / report.seconds:.2f} windows/s"),
                    Row("step, median per window", f"{median:.1f} ms"),
                    Row("reading, files and one transaction, per window", f"{rest:.1f} ms"),
                    Row(
                        "`lorastream replay` end to end",
                        f"{command:.2f} s ({n / command:,.1f} events/s)",
                        reference=f"{report.seconds:.2f} s (replay in process)",
                    ),
                ],
                [
                    f"{n} learning events of one adapter, 1 partition, windows of "
                    f"{settings.window_size}: {windows} versions announced, "
                    f"{counts.open_events} events left open.",
                    f"base model {Path(str(core.base.name)).name} on {core.base.device} "
                    f"(loaded in {loaded:.2f}s, not in the in-process figures).",
                    "The end-to-end figure includes process start, imports and model load.",
                    "Issue #7 states no speed goal: it asks for replay speed (events/s, "
                    "windows/s, tiny model, CPU) for 1,000 events.",
                ],
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--base-model", type=Path, default=None)
    parser.add_argument("--device", default="cpu")
    add_json_option(parser)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.base_model, args.device, args.json))
