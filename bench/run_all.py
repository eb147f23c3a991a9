"""Run every benchmark in ``bench/`` and write BENCHMARKS.md from what they measured.

Each benchmark runs as its own process with ``--json``, one after the other (so
none takes another's CPU), against a broker of its own on free ports
(KAFKA_BOOTSTRAP_SERVERS is removed from their environment). BENCHMARKS.md
gets, per benchmark, one table of its figures beside their goals and the
references measured in the same run, with its command and notes; and above
them the machine, the versions and the command. A benchmark that fails is
reported as failed, with the end of its output, and the others still run.
GPU figures are never measured here: the last section quotes the files a GPU
run left in ``bench/results/``, with their dates.

    make bench        # = .venv/bin/python bench/run_all.py
    .venv/bin/python bench/run_all.py --only scoring,freshness --out /tmp/B.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, script, arguments): in the order they run and appear.
BENCHES: list[tuple[str, str, list[str]]] = [
    ("scoring", "bench_scoring.py", []),
    ("freshness", "bench_freshness.py", []),
    ("serving", "bench_serving.py", []),
    ("rouge", "bench_rouge.py", []),
    ("step", "bench_step.py", []),
    ("replay", "bench_replay.py", []),
    ("resume", "bench_resume.py", []),
    ("learning", "bench_learning.py", []),
    # The same bench with issue #23's chosen training (bench/sweep_defaults.py): the "after"
    # beside the "before" above, which keeps the demo's one step per window.
    (
        "learning-23",
        "bench_learning.py",
        ["--steps-per-window", "2", "--rehearsal", "8", "--learning-rate", "2e-3"],
    ),
    ("forgetting", "bench_forgetting.py", []),
]
PACKAGES = ["torch", "transformers", "peft", "faust-streaming", "aiokafka", "rouge-score"]


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        memory = "unknown memory"
    return f"{os.cpu_count()} cores ({cpu}), {memory}, {platform.system()} {platform.release()}"


def _versions() -> str:
    from lorastream.dev.broker import KAFKA_VERSION

    found = [f"Python {platform.python_version()}", f"Apache Kafka {KAFKA_VERSION} (KRaft)"]
    for name in PACKAGES:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return ", ".join(found)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(result: dict) -> list[str]:
    lines = ["| figure | measured | reference (same run) | goal | met |", "|---|---|---|---|---|"]
    for row in result["rows"]:
        met = {True: "yes", False: "**no**", None: ""}[row["met"]]
        cells = [row["figure"], row["value"], row["reference"], row["goal"], met]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines


def _run(name: str, script: str, args: list[str], tmp: Path) -> tuple[dict | None, str, float]:
    out = tmp / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, str(ROOT / "bench" / script), *args, "--json", str(out)]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    done = subprocess.run(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    seconds = time.perf_counter() - started
    print(done.stdout[-4000:], flush=True)
    if done.returncode != 0 or not out.exists():
        return None, done.stdout[-2000:], seconds
    return json.loads(out.read_text()), "", seconds


def _gpu_section() -> list[str]:
    lines = ["## On a GPU (not measured by this run)", ""]
    results = sorted((ROOT / "bench" / "results").glob("*/step*.txt"))
    if not results:
        return [*lines, "No GPU run has been recorded.", ""]
    lines += [
        "`make bench` runs on the machine it is started on; these are the outputs a GPU run",
        "left in `bench/results/` (command in the `run-*.sh` beside each), quoted as they are.",
        "",
    ]
    for path in results:
        text = path.read_text().splitlines()
        head = [line for line in text if line.startswith("model ")][:1]
        table = [i for i, line in enumerate(text) if line.lstrip().startswith("kind ")]
        if not table:
            continue
        body = []
        for line in text[table[-1] :]:
            if not line.strip() or line.startswith("("):
                break
            body.append(line)
        lines += [f"`{path.relative_to(ROOT)}`:", "", "```", *head, *body, "```", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated names: " + ",".join(n for n, *_ in BENCHES))
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = parser.parse_args()
    chosen = set(args.only.split(",")) if args.only else {n for n, *_ in BENCHES}
    unknown = chosen - {n for n, *_ in BENCHES}
    if unknown:
        parser.error(f"--only: no benchmark named {', '.join(sorted(unknown))}")
    started = datetime.now(UTC)
    sections: list[str] = []
    failed = []
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        for name, script, bench_args in BENCHES:
            if name not in chosen:
                continue
            result, tail, seconds = _run(name, script, bench_args, Path(tmp))
            if result is None:
                failed.append(name)
                sections += [
                    f"## {name}: FAILED",
                    "",
                    f"`bench/{script}` failed after {seconds:.0f} s; the end of its output:",
                    "",
                    "```",
                    tail.rstrip(),
                    "```",
                    "",
                ]
                continue
            sections += [
                f"## {result['title']}",
                "",
                f"`{shlex.join(['.venv/bin/python', f'bench/{script}', *bench_args])}` "
                f"({seconds:.0f} s)",
                "",
            ]
            sections += _table(result)
            if result.get("notes"):
                sections += ["", *[f"- {note}" for note in result["notes"]]]
            sections.append("")
    minutes = (datetime.now(UTC) - started).total_seconds() / 60
    command = "make bench" if not args.only else f"bench/run_all.py --only {args.only}"
    header = [
        "# Benchmarks",
        "",
        f"Written by `{command}` on {started:%Y-%m-%d %H:%M} UTC in {minutes:.0f} minutes. "
        "Every figure below comes from that run; a reference sits beside the figure it was "
        "measured with, in the same run, on the same machine.",
        "",
        f"- Machine: {_machine()}",
        f"- Versions: {_versions()}",
        "- Broker: a local single-node KRaft broker per benchmark, on the same machine, "
        "so the broker's own CPU counts against every figure",
        "",
    ]
    if failed:
        header += [f"**Failed:** {', '.join(failed)} (see below).", ""]
    args.out.write_text("\n".join(header + sections + _gpu_section()).rstrip() + "\n")
    print(f"\nwrote {args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
