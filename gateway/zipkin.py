"""Reporting finished spans to a Zipkin v2 collector, without ever slowing a request.

aiozipkin's own transport keeps an unbounded list between sends and drops whole batches silently
when the collector is slow; this one keeps a bounded buffer, counts what it drops, and sends from
one background task with its own connection pool and a short timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from typing import Any

import aiohttp
from aiozipkin.record import Record
from aiozipkin.transport import TransportABC

__all__ = ["ZipkinReporter", "span_json"]

log = logging.getLogger("gateway.zipkin")


def span_json(record: Record) -> dict[str, Any]:
    """A Zipkin v2 span without empty fields: the v2 schema allows no ``null`` anywhere."""
    span = record.asdict()
    for key in ("parentId", "kind", "timestamp", "duration", "remoteEndpoint"):
        if span.get(key) is None:
            span.pop(key, None)
    for key in ("annotations", "tags"):
        if not span.get(key):
            span.pop(key, None)
    for key in ("debug", "shared"):
        if not span.get(key):
            span.pop(key, None)
    return span


class ZipkinReporter(TransportABC):
    """Batches spans in a bounded buffer and posts them to ``url`` every ``interval`` seconds."""

    def __init__(
        self,
        url: str,
        *,
        max_buffer: int = 10_000,
        batch_size: int = 500,
        interval: float = 1.0,
        timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.max_buffer = max_buffer
        self.batch_size = batch_size
        self.interval = interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.buffer: deque[dict[str, Any]] = deque()
        self.dropped = 0
        self.sent = 0
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_failure_log = 0.0
        self._failing = False  # since the last failure logged: its recovery is logged once too

    def send(self, record: Record) -> None:
        if len(self.buffer) >= self.max_buffer:
            self.dropped += 1
            return
        self.buffer.append(span_json(record))
        if len(self.buffer) >= self.batch_size:
            self._wake.set()

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self.timeout, trust_env=False)
        self._task = asyncio.create_task(self._run(), name="zipkin-reporter")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            # What is left gets one timeout in all, not one per batch: a full buffer is twenty
            # batches, and a collector that takes just under the timeout for each would hold up
            # the stop for forty seconds, past an orchestrator's grace period.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timeout.total):
                    await self.flush()
            self.dropped += len(self.buffer)
            self.buffer.clear()
            await self._session.close()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Send everything buffered now (also what ``close`` does with what is left)."""
        while self.buffer:
            count = min(len(self.buffer), self.batch_size)
            batch = [self.buffer.popleft() for _ in range(count)]
            sent = False
            try:
                sent = await self._post(batch)
            finally:  # a send cut short (the reporter closing) loses its batch too
                if sent:
                    self.sent += count
                else:
                    self.dropped += count
            if not sent:
                return

    async def _post(self, batch: list[dict[str, Any]]) -> bool:
        assert self._session is not None
        try:
            async with self._session.post(
                self.url,
                data=json.dumps(batch, separators=(",", ":")).encode(),
                headers={"Content-Type": "application/json"},
            ) as response:
                await response.read()
                if response.status < 300:
                    if self._failing:
                        self._failing = False
                        log.info(
                            "zipkin collector available again",
                            extra={"url": self.url, "spans_dropped_total": self.dropped},
                        )
                    return True
                problem = f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = type(exc).__name__
        now = time.monotonic()
        if now - self._last_failure_log > 60:  # the collector being down is news once a minute
            self._last_failure_log = now
            self._failing = True
            log.warning(
                "zipkin collector unavailable; dropping spans", extra={"url": self.url, "error": problem}
            )
        return False
