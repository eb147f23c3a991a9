"""The ``lorastream`` script's first step, taken before anything heavy is imported: a stop
signal is never lost.

Python turns SIGINT into KeyboardInterrupt (and a stage's SIGTERM handler into
SystemExit) wherever the main thread happens to be. Inside a ``__del__`` method or a
weakref callback (an import lock's, a compiled regex's) the interpreter cannot raise it:
it prints ``Exception ignored in ...`` with a traceback and goes on, as if the signal
had never come. A Ctrl-C during the seconds of imports left ``lorastream train`` running
(#22). Here such an interrupt is delivered again, at the main thread's next chance, and
nothing is printed for it.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

__all__ = ["interrupts_survive", "main"]


def interrupts_survive() -> None:
    """Make an interrupt that the interpreter could not raise (it was in a ``__del__`` or
    a callback) come again, instead of being printed and dropped. Other unraisable
    exceptions go to the hook that was there before."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        again = _signal_of(unraisable.exc_type, unraisable.exc_value)
        if again is None:
            previous(unraisable)
            return
        try:
            _send_again(again)
        except RuntimeError:  # no new thread while the interpreter shuts down: it ends anyway
            previous(unraisable)

    sys.unraisablehook = hook


def _send_again(signum: int) -> None:
    """Send ``signum`` to the main thread again from a thread of its own, a moment from
    now: tripped from here, the handler would run at once, still inside the finaliser
    (this hook runs in it). A real signal also wakes a main thread that sleeps in a
    system call. Should it land in a finaliser again, it comes back here."""
    main = threading.main_thread().ident
    assert main is not None
    resend = threading.Timer(_RESEND_AFTER, signal.pthread_kill, args=(main, signum))
    resend.daemon = True
    resend.start()


# Seconds: long enough for the finaliser that swallowed the interrupt to return.
_RESEND_AFTER = 0.02


def _signal_of(kind: type[BaseException] | None, error: BaseException | None) -> int | None:
    """The signal whose handler raised ``error``, if it was one: KeyboardInterrupt comes
    from SIGINT; SystemExit(143) from a stage's SIGTERM handler
    (:func:`lorastream.cli.stage.stop_deadline_on_early_signals`)."""
    if kind is not None and issubclass(kind, KeyboardInterrupt):
        return signal.SIGINT
    if isinstance(error, SystemExit) and error.code == 128 + signal.SIGTERM:
        return signal.SIGTERM
    return None


def main() -> None:
    """The ``lorastream`` script: :func:`interrupts_survive`, then the command line."""
    interrupts_survive()
    from lorastream.cli import main as run  # seconds of imports; Ctrl-C there exits 130

    run()
