"""Stop signals before a program has installed its own handlers (``serve()``, the supervisor's,
``up``'s): each ``__main__`` calls this first, before the imports, which take most of a second."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable


def stop_at_once_while_starting(signals: Iterable[signal.Signals]) -> None:
    """End the process at once, with 128 + the signal, on any of ``signals`` left to its default.

    Nothing is bound yet, so there is nothing to drain. Python's own SIGINT handler printed a
    KeyboardInterrupt traceback, and as PID 1 in a container, where the kernel drops signals left
    to their default action, a SIGTERM was ignored until the grace period's SIGKILL. A signal
    ignored at start (``nohup``, a background job) stays ignored. Installed in the order given:
    the callers put SIGTERM last, so a process that catches SIGTERM catches them all (the tests
    wait for that in ``/proc``).
    """
    for signum in signals:
        if signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(signum, _exit)


def _exit(signum: int, _frame: object) -> None:
    os._exit(128 + signum)
