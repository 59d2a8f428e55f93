"""Structured logs: one JSON object per line, written off the event loop.

Writing to a slow stderr pipe must never stall request handling, so records go through a queue
to a listener thread. The access log is one line per request with the fields operators filter on.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import json.encoder
import logging
import os
import queue
import re
import sys
import threading
import time
import traceback
from typing import Any, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .keys import relayed_key, request_id_key, route_key, span_key, target_key
from .middleware.tracing import current_trace
from .routing import shown_path

_now = time.time
_perf_counter = time.perf_counter

__all__ = ["JsonAccessLogger", "JsonFormatter", "configure_logging", "flush_logs", "lines_dropped"]

# Attributes every LogRecord has; anything else was passed in ``extra`` and is emitted as a field.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SECRET_WORDS = ("authorization", "password", "secret", "token", "cookie", "dsn")
# The user and password of a URL, wherever a line quotes one (ZIPKIN_URL and AUTH_JWKS_URL may
# carry them; a collector or issuer that fails is logged with its URL). A URL keeps any of
# RFC 3986's sub-delimiters (!$&'()*+,;=) unescaped in its userinfo, the apostrophe included.
_USERINFO = re.compile(r"(?<=://)[^/@\s\"]*@")


def _without_userinfo(line: str) -> str:
    return _USERINFO.sub("***@", line) if "@" in line else line


_second: tuple[int, str] = (-1, "")
_millisecond: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    # The date is formatted once per second, the whole stamp once per millisecond, rather than
    # per line: the access log writes thousands a second. Tuples, replaced whole, as the loop and
    # the writer thread both call this.
    global _second, _millisecond
    ms = int(created * 1000)
    cached = _millisecond
    if cached[0] == ms:
        return cached[1]
    second = ms // 1000
    date = _second
    if date[0] != second:
        date = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    text = f"{date[1]}.{ms % 1000:03d}Z"
    _millisecond = (ms, text)
    return text


class JsonFormatter(logging.Formatter):
    def format_entry(self, entry: dict[str, Any]) -> str:
        return json.dumps(entry, default=str, ensure_ascii=False)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = "[redacted]" if any(w in key.lower() for w in _SECRET_WORDS) else value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return _without_userinfo(json.dumps(entry, default=str, ensure_ascii=False))


class _TextFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # The access lines' ISO 8601 UTC stamp, not logging's local "2026-11-27 08:59:04,002":
        # one format per file for whoever parses it.
        return _timestamp(record.created)

    def format_entry(self, entry: dict[str, Any]) -> str:
        head = f"{entry.pop('ts')} {entry.pop('level').upper()} {entry.pop('logger')}: {entry.pop('msg')}"
        return head + " " + " ".join(f"{k}={v}" for k, v in entry.items())

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {
            k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")
        }
        if extras:
            line += " " + " ".join(
                f"{k}={'[redacted]' if any(w in k.lower() for w in _SECRET_WORDS) else v}"
                for k, v in extras.items()
            )
        return _without_userinfo(line)


# The most the writer may fall behind, in characters of lines not yet written: with stderr not
# read (a log shipper that stalled, a full pipe) the queue would otherwise grow by every request's
# line until the process runs out of memory. Past it, lines are dropped and counted, and the
# count is written once the writer catches up.
MAX_PENDING = 16 * 1024 * 1024
# What a log record is taken to cost beyond its message, for that bound.
_RECORD_SIZE = 256
_DROPS_REPORT_EVERY = 10.0  # seconds
STOP_TIMEOUT = 5.0  # seconds the exiting process waits for the writer to drain its queue


class _Writer:
    """One thread that owns stderr: formats log records and writes every line off the event loop.

    The loop thread only enqueues: a LogRecord, or for the access log a batch of finished JSON
    lines (or, in text format, plain dicts). Building a LogRecord per request costs more than the
    rest of the line put together, and waking this thread once per request costs a GIL hand-off
    each time.

    The thread writes to a descriptor of its own (a copy of stderr's), not through ``sys.stderr``:
    blocked on a pipe nobody reads, it would hold the stream's lock, and the interpreter, which
    flushes ``sys.stderr`` on its way out, could then never exit.
    """

    def __init__(self, stream: TextIO, formatter: logging.Formatter) -> None:
        self.formatter = formatter
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stream = stream
        self._encoding = getattr(stream, "encoding", None) or "utf-8"
        self._fd = _own_descriptor(stream)
        # Characters offered and written, and lines dropped: ``queued`` and ``dropped`` change
        # under the lock (any thread may log), ``written`` on the writer thread only.
        self._lock = threading.Lock()
        self.queued = self.written = self.dropped = 0
        self._reported = 0
        self._reported_at = 0.0
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def offer(self, item: Any, size: int, lines: int) -> None:
        """Queue ``item`` (``lines`` lines, about ``size`` characters), or drop it while the
        writer is more than ``MAX_PENDING`` behind."""
        with self._lock:
            if self.queued - self.written > MAX_PENDING:
                self.dropped += lines
                return
            self.queued += size
        self.queue.put((item, size))

    def _run(self) -> None:
        get = self.queue.get
        while (queued := get()) is not None:
            item, size = queued
            try:
                if isinstance(item, threading.Event):  # flush_logs() waits for it
                    item.set()
                else:
                    self._write(self._format(item))
            except Exception:  # a log line must never take the writer down
                traceback.print_exc(file=sys.stderr)
            self.written += size
            if self.dropped != self._reported:
                self._report_drops()

    def _format(self, item: Any) -> str:
        if not isinstance(item, list):
            return self.formatter.format(item) + "\n"
        # A batch of access lines (JSON) or entries (text).
        format_entry = self.formatter.format_entry  # type: ignore[attr-defined]
        lines = []
        for entry in item:
            if isinstance(entry, str):
                lines.append(entry)
                continue
            entry["ts"] = _timestamp(entry["ts"])
            lines.append(format_entry(entry))
        return "\n".join(lines) + "\n"

    def _write(self, text: str) -> None:
        if self._fd is None:  # not a file (a test's buffer)
            self._stream.write(text)
            self._stream.flush()
            return
        data = memoryview(text.encode(self._encoding, "backslashreplace"))
        while data:
            data = data[os.write(self._fd, data) :]

    def _report_drops(self) -> None:
        # Once the queue has emptied, or every few seconds while it stays full: one line for
        # many lost ones, not one each.
        now = time.monotonic()
        if not self.queue.empty() and now - self._reported_at < _DROPS_REPORT_EVERY:
            return
        dropped = self.dropped
        record = logging.makeLogRecord(
            {
                "name": "gateway.logs",
                "levelno": logging.WARNING,
                "levelname": "WARNING",
                "msg": "log lines dropped: stderr is not keeping up",
                "dropped": dropped - self._reported,
            }
        )
        self._reported, self._reported_at = dropped, now
        with contextlib.suppress(Exception):
            self._write(self.formatter.format(record) + "\n")

    def stop(self) -> None:
        _flush_access()
        self.queue.put(None)
        # Bounded: a writer blocked on a pipe nobody reads must not keep the process from exiting.
        self._thread.join(timeout=STOP_TIMEOUT)
        if self._fd is not None and not self._thread.is_alive():
            os.close(self._fd)
            self._fd = None


def _own_descriptor(stream: TextIO) -> int | None:
    try:
        stream.flush()
        return os.dup(stream.fileno())
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None


class _EnqueueHandler(logging.Handler):
    def __init__(self, writer: _Writer) -> None:
        super().__init__()
        self._offer = writer.offer

    def emit(self, record: logging.LogRecord) -> None:
        # Formatting happens on the writer thread; only the message args are resolved here so a
        # mutable argument cannot change before it is written.
        record.msg, record.args = record.getMessage(), None
        # Inside a request, the line leads to its trace: the span in progress is a contextvar of
        # this (the loop's) thread, so it must be read here, not on the writer thread.
        ref = current_trace()
        if ref is not None and not hasattr(record, "trace_id"):
            record.trace_id, record.span_id, record.request_id = ref.trace_id, ref.span_id, ref.request_id
        self._offer(record, len(record.msg) + _RECORD_SIZE, 1)


_writer: _Writer | None = None
access_entries: queue.SimpleQueue[Any] | None = None
# JSON access lines are built on the loop in one f-string (see JsonAccessLogger.log): cheaper than
# a dict per request encoded later, and the same bytes.
_access_json = True

# Access entries are gathered on the loop and handed to the writer at most every ACCESS_FLUSH
# seconds (or every ACCESS_BATCH entries), one queue put per batch.
ACCESS_FLUSH = 0.05
ACCESS_BATCH = 512
_batch: list[str | dict[str, Any]] = []
_batch_size = 0  # characters, about
_flush_handle: asyncio.TimerHandle | None = None


def _flush_access() -> None:
    global _batch, _batch_size, _flush_handle
    _flush_handle = None
    if _batch and _writer is not None:
        _writer.offer(_batch, _batch_size, len(_batch))
    _batch, _batch_size = [], 0


def _add_access(entry: str | dict[str, Any]) -> None:
    global _flush_handle, _batch_size
    _batch.append(entry)
    _batch_size += len(entry) if isinstance(entry, str) else _RECORD_SIZE + len(entry["path"])
    if len(_batch) >= ACCESS_BATCH:
        if _flush_handle is not None:
            _flush_handle.cancel()
        _flush_access()
    elif _flush_handle is None:
        _flush_handle = asyncio.get_running_loop().call_later(ACCESS_FLUSH, _flush_access)


def lines_dropped() -> int:
    """Log lines dropped so far because stderr was not keeping up (``MAX_PENDING``)."""
    return _writer.dropped if _writer is not None else 0


def flush_logs(timeout: float = 5.0) -> None:
    """Wait until every line logged so far, access lines included, is written.

    For a process that ends in ``os._exit`` (a forked worker): atexit, where the writer is
    otherwise flushed, does not run there, and the lines still queued or batched (the access lines
    of the requests that finished while draining, "stopped") were lost.
    """
    if _writer is None:
        return
    _flush_access()
    written = threading.Event()
    _writer.queue.put((written, 0))
    written.wait(timeout)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger through one writer thread to stderr, in the chosen format."""
    global _writer, access_entries, _access_json
    _access_json = fmt == "json"
    if _writer is not None:
        _writer.stop()
        atexit.unregister(_writer.stop)
    formatter = (
        JsonFormatter()
        if fmt == "json"
        else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    _writer = _Writer(sys.stderr, formatter)
    access_entries = _writer.queue
    atexit.register(_writer.stop)
    root = logging.getLogger()
    root.handlers[:] = [_EnqueueHandler(_writer)]
    root.setLevel(level)
    # A library's warning (PyJWT's about a short key, a deprecation) is a line like the others,
    # not raw text between the JSON lines.
    logging.captureWarnings(True)
    # Per-record bookkeeping nobody reads.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False


class JsonAccessLogger(AbstractAccessLogger):
    """One line per request: what an operator greps for, never the Authorization header."""

    def __init__(self, logger: logging.Logger, log_format: str = "") -> None:
        super().__init__(logger, log_format)
        self._logger_json = _str(logger.name)

    @property
    def enabled(self) -> bool:
        return access_entries is not None and self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        get = request.get
        route = get(route_key)
        target = get(target_key)
        span = get(span_key)
        request_id = get(request_id_key)
        remote = request.remote
        path = shown_path(request)
        bytes_in = getattr(request.content, "total_bytes", 0)
        bytes_out = response.body_length
        if response.status == 101 and (relayed := get(relayed_key)) is not None:  # a WebSocket session
            bytes_in += relayed[0]
            bytes_out += relayed[1]
        # Stamped when the request was parsed (gateway.httpserver); aiohttp's loop-clock figure if not.
        received = getattr(request, "received", None)
        if received is not None:
            time = _perf_counter() - received
        if not _access_json:
            _add_access(
                {
                    "ts": _now(),  # formatted on the writer thread
                    "level": "info",
                    "logger": self.logger.name,
                    "msg": "request",
                    "method": request.method,
                    "path": path,
                    "route": route.prefix if route is not None else None,
                    "service": route.service if route is not None else None,
                    "upstream": target.url if target is not None else None,
                    "status": response.status,
                    "bytes_in": bytes_in,
                    "bytes_out": bytes_out,
                    "duration_ms": round(time * 1000, 3),
                    "request_id": request_id,
                    "trace_id": span.trace_id if span is not None else None,
                    "span_id": span.span_id if span is not None else None,
                    "remote": remote,
                }
            )
            return
        # The same fields, order and separators as json.dumps of the dict above; the duration in
        # whole microseconds, written as milliseconds (round() and a float's repr cost more than
        # the rest of the line's numbers together). No helper calls: this runs once per request.
        us = int(time * 1_000_000)
        if route is not None:
            route_json = f'{_str(route.prefix)}, "service": {_str(route.service)}'
        else:
            route_json = 'null, "service": null'
        if span is not None:
            span_json = f'"{span.trace.trace_id}", "span_id": "{span.span_id}"'
        else:
            span_json = 'null, "span_id": null'
        _add_access(
            f'{{"ts": "{_timestamp(_now())}", "level": "info", "logger": {self._logger_json}, '
            f'"msg": "request", "method": {_str(request.method)}, "path": {_str(path)}, '
            f'"route": {route_json}, "upstream": {"null" if target is None else _str(target.url)}, '
            f'"status": {response.status}, "bytes_in": {bytes_in}, "bytes_out": {bytes_out}, '
            f'"duration_ms": {us // 1000}.{us % 1000:03d}, '
            f'"request_id": {"null" if request_id is None else _str(request_id)}, '
            f'"trace_id": {span_json}, "remote": {"null" if remote is None else _str(remote)}}}'
        )


_str = json.encoder.encode_basestring
