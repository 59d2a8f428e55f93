"""A stop signal while a program is still starting, before it has installed its own handlers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, program_env, signals_in


def _catches_sigterm(pid: int) -> bool:
    """The program has run its ``__main__``'s first lines: SIGTERM's handler, installed last."""
    return signal.SIGTERM in signals_in(pid, "SigCgt")


@pytest.mark.parametrize("program", ["gateway", "intelligence"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_a_stop_while_the_program_imports_its_code_ends_it_quietly(
    program: str, signum: signal.Signals
) -> None:
    """Ctrl-C in the most of a second the imports take printed a KeyboardInterrupt traceback
    (exit -2); SIGTERM there is what a container's PID 1 ignored, with the kernel dropping
    signals left to their default action. Now both end the process at once, 128 + the signal."""
    process = subprocess.Popen(
        [sys.executable, "-m", program], cwd=ROOT, env=program_env(AUTH_ENABLED="false"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not _catches_sigterm(process.pid):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.001)  # the pace of the polling, not a wait for anything
        process.send_signal(signum)
        _, err = process.communicate(timeout=10)
        assert process.returncode == 128 + signum, err
        assert "Traceback" not in err, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
