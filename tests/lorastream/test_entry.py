"""The script's first step (lorastream.entry): a stop signal that Python could not raise,
because it came while the main thread ran a ``__del__`` method or a weakref callback, is
delivered again instead of being printed as "Exception ignored" and dropped. A Ctrl-C
during the imports left ``lorastream train`` running (#22)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

# The signal comes while a finaliser runs: Python's handler raises inside __del__, where
# the interpreter can only print the exception and go on.
_PROGRAM = """
import signal, sys, time
from lorastream.entry import interrupts_survive
{setup}
if {survive}:
    interrupts_survive()

class Finalised:
    def __del__(self):
        signal.raise_signal({signum})
        time.sleep(0.01)

try:
    Finalised()  # dropped at once: __del__ runs here
    for _ in range(50):
        time.sleep(0.01)
    print("went on", flush=True)
except {caught} as exc:
    print("stopped", getattr(exc, "code", ""), flush=True)
    sys.exit(3)
"""

_SIGTERM_AS_A_STAGE_HAS_IT = (
    "def _term(signum, frame):\n"
    "    raise SystemExit(128 + signum)\n"
    "signal.signal(signal.SIGTERM, _term)"
)

CASES = {
    "SIGINT": (signal.SIGINT, "", "KeyboardInterrupt"),
    "SIGTERM": (signal.SIGTERM, _SIGTERM_AS_A_STAGE_HAS_IT, "SystemExit"),
}


def _run(
    signum: int, setup: str, caught: str, *, survive: bool
) -> subprocess.CompletedProcess[str]:
    program = _PROGRAM.format(signum=int(signum), setup=setup, caught=caught, survive=survive)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(program)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("name", CASES)
def test_an_interrupt_raised_inside_a_finaliser_is_delivered_again(name: str) -> None:
    signum, setup, caught = CASES[name]
    ran = _run(signum, setup, caught, survive=True)
    assert ran.returncode == 3, (ran.stdout, ran.stderr)
    said = "stopped 143" if signum == signal.SIGTERM else "stopped"
    assert ran.stdout.strip() == said, ran.stdout
    assert "Exception ignored" not in ran.stderr and "Traceback" not in ran.stderr, ran.stderr


@pytest.mark.parametrize("name", CASES)
def test_without_it_python_drops_the_interrupt(name: str) -> None:
    """What the first step is for: plain Python prints the interrupt and goes on."""
    signum, setup, caught = CASES[name]
    ran = _run(signum, setup, caught, survive=False)
    assert ran.returncode == 0 and ran.stdout.strip() == "went on", (ran.stdout, ran.stderr)
    assert "Exception ignored" in ran.stderr


def test_other_errors_in_a_finaliser_are_still_reported() -> None:
    program = textwrap.dedent(
        """
        from lorastream.entry import interrupts_survive
        interrupts_survive()
        class Broken:
            def __del__(self):
                raise ValueError("a finaliser's own bug")
        Broken()
        print("went on")
        """
    )
    ran = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60
    )
    assert ran.returncode == 0 and ran.stdout.strip() == "went on", ran.stderr
    assert "Exception ignored" in ran.stderr and "a finaliser's own bug" in ran.stderr


def test_the_script_takes_the_first_step_before_the_command_line() -> None:
    """The installed script and ``python -m lorastream`` both start at lorastream.entry,
    and importing the package imports nothing slow before it."""
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lorastream"]
    assert script.value == "lorastream.entry:main"
    ran = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, lorastream.entry; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('lorastream', 'typer', 'torch', 'aiokafka', 'importlib.metadata')))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.stdout.strip() == "['lorastream', 'lorastream.entry']", ran.stdout + ran.stderr
