"""A deadline on a peer that stops taking what is written to it, for both sides' protocols.

asyncio pauses a protocol's writing when the transport's buffer fills and resumes it once the peer
has read enough. ``WriteDeadline`` runs a timer from the pause: resumed in time, it is cancelled;
otherwise ``_write_timed_out`` says what giving up means (the server aborts a client that does not
read its answer, the upstream pool fails an upload the upstream stopped reading).
"""

from __future__ import annotations

import asyncio
from contextvars import Context

__all__ = ["WriteDeadline"]


class WriteDeadline:
    """Mixed into an ``asyncio.Protocol`` subclass, before it (its ``resume_writing`` runs first)."""

    _loop: asyncio.AbstractEventLoop
    _send_timer: asyncio.TimerHandle | None = None

    def _arm_send_timer(self, timeout: float) -> None:
        """From ``pause_writing``: ``timeout`` seconds for the peer to take enough to go on."""
        if self._send_timer is None:
            # An empty context: the timer must not keep a request's context variables alive.
            self._send_timer = self._loop.call_later(timeout, self._send_timed_out, context=Context())

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        self._cancel_send_timer()

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self) -> None:
        self._send_timer = None
        self._write_timed_out()

    def _write_timed_out(self) -> None:
        raise NotImplementedError
