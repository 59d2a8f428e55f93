"""Reporting finished spans to a Zipkin v2 collector, without ever slowing a request.

aiozipkin's own transport keeps an unbounded list between sends and drops whole batches silently
when the collector is slow; this one keeps a buffer bounded in spans and in bytes, counts what it
drops, and sends from one background task with its own connection pool and a short timeout.

Collectors refuse a body over their size limit with 413 (Zipkin's server: Armeria's 10 MiB;
the OpenTelemetry collector's zipkin receiver, which Tempo and Jaeger v2 run: 20 MiB; an nginx
in front: 1 MiB unless told otherwise). So a batch is bounded in bytes as well as in spans, as
zipkin-reporter's ``messageMaxBytes`` bounds its messages, by default under the smallest of
these; a batch refused with 413 all the same is split in halves until the collector takes them
(and later batches are kept under the size it refused), and only a span that no batch can carry
is dropped. Each span is serialised once, as it finishes: a batch is a join of ready bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
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
    """Batches spans in a bounded buffer and posts them to ``url`` every ``interval`` seconds.

    A batch holds at most ``batch_size`` spans and ``max_batch_bytes`` bytes of JSON; the buffer
    at most ``max_buffer`` spans and ``max_buffer_bytes`` bytes. What does not fit is dropped and
    counted in ``dropped`` (``gateway_spans_dropped_total``).
    """

    def __init__(
        self,
        url: str,
        *,
        max_buffer: int = 10_000,
        max_buffer_bytes: int = 16_000_000,
        batch_size: int = 500,
        max_batch_bytes: int = 1_000_000,
        interval: float = 1.0,
        timeout: float = 2.0,
    ) -> None:
        self.url = url
        self.max_buffer = max_buffer
        self.max_buffer_bytes = max_buffer_bytes
        self.batch_size = batch_size
        self.max_span_bytes = max_batch_bytes - 2  # one span alone, in its brackets
        # Lowered to what the collector showed it takes, when it refuses a batch as too large.
        self.max_batch_bytes = max_batch_bytes
        self.interval = interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.buffer: deque[bytes] = deque()  # each span's JSON
        self.buffered_bytes = 0
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
        data = json.dumps(span_json(record), separators=(",", ":")).encode()
        size = len(data)
        if size > self.max_span_bytes or self.buffered_bytes + size > self.max_buffer_bytes:
            self.dropped += 1  # no batch could carry it, or the collector is behind by that much
            return
        self.buffer.append(data)
        self.buffered_bytes += size
        if len(self.buffer) >= self.batch_size or self.buffered_bytes >= self.max_batch_bytes:
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
            self.buffered_bytes = 0
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
            if not await self._deliver(self._take_batch()):
                return

    def _take_batch(self) -> list[bytes]:
        """The oldest spans, up to ``batch_size`` of them and ``max_batch_bytes`` in all (at least one)."""
        buffer, batch = self.buffer, []
        size, limit = 1, self.max_batch_bytes  # "[" and "]", and a comma before every span but the first
        while buffer and len(batch) < self.batch_size:
            grown = size + len(buffer[0]) + 1
            if batch and grown > limit:
                break
            size = grown
            batch.append(buffer.popleft())
        self.buffered_bytes -= size - 1 - len(batch)
        return batch

    async def _deliver(self, batch: list[bytes]) -> bool:
        """Post ``batch``, in halves as long as the collector says it is too large; a span it
        refuses alone is dropped. False when the collector failed otherwise: what is left of the
        batch is dropped, and the rest of the buffer waits for the next round."""
        parts = [batch]
        try:
            while parts:
                part = parts[-1]  # popped once settled: a send cut short is counted below
                outcome = await self._post(part)
                parts.pop()
                if outcome is _Outcome.SENT:
                    self.sent += len(part)
                elif outcome is _Outcome.TOO_LARGE and len(part) > 1:
                    self._refused_as_too_large(sum(map(len, part)) + len(part) + 1)
                    half = len(part) // 2
                    parts += (part[half:], part[:half])  # oldest first
                elif outcome is _Outcome.TOO_LARGE:
                    self.dropped += 1
                    log.warning(
                        "zipkin collector refused a span as too large; dropped",
                        extra={"url": self.url, "bytes": len(part[0])},
                    )
                else:
                    self.dropped += len(part)
                    return False
            return True
        finally:  # a failure, or a send cut short (the reporter closing), loses what was left
            self.dropped += sum(map(len, parts))

    def _refused_as_too_large(self, size: int) -> None:
        limit = max(size // 2, 1)
        if limit < self.max_batch_bytes:
            self.max_batch_bytes = limit
            log.warning(
                "zipkin collector refused a batch as too large; sending smaller batches",
                extra={"url": self.url, "bytes": size, "max_batch_bytes": limit},
            )

    async def _post(self, batch: list[bytes]) -> _Outcome:
        assert self._session is not None
        try:
            async with self._session.post(
                self.url,
                data=b"[" + b",".join(batch) + b"]",
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
                    return _Outcome.SENT
                if response.status == 413:
                    return _Outcome.TOO_LARGE
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
        return _Outcome.FAILED


class _Outcome(enum.Enum):
    SENT = "sent"
    TOO_LARGE = "too large"  # 413: the collector's body limit
    FAILED = "failed"
