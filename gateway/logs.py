"""Structured logs: one JSON object per line, written off the event loop.

Writing to a slow stderr pipe must never stall request handling, so records go through a queue
to a listener thread. The access log is one line per request with the fields operators filter on.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .keys import request_id_key, route_key, target_key

__all__ = ["JsonAccessLogger", "JsonFormatter", "configure_logging"]

# Attributes every LogRecord has; anything else was passed in ``extra`` and is emitted as a field.
_RECORD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_SECRET_WORDS = ("authorization", "password", "secret", "token", "cookie", "dsn")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                entry[key] = "[redacted]" if any(w in key.lower() for w in _SECRET_WORDS) else value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
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
        return line


_listener: logging.handlers.QueueListener | None = None


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger through a queue to one stderr handler with the chosen format."""
    global _listener
    if _listener is not None:
        _listener.stop()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, stream, respect_handler_level=False)
    _listener.start()
    atexit.register(_listener.stop)
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(records)]
    root.setLevel(level)
    # aiohttp's own access logger is replaced by JsonAccessLogger.
    logging.getLogger("aiohttp.access").propagate = True


class JsonAccessLogger(AbstractAccessLogger):
    """One line per request: what an operator greps for, never the Authorization header."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        route = request.get(route_key)
        target = request.get(target_key)
        content = request.content
        self.logger.info(
            "request",
            extra={
                "method": request.method,
                "path": request.path,
                "route": route.prefix if route is not None else None,
                "service": route.service if route is not None else None,
                "upstream": target.url if target is not None else None,
                "status": response.status,
                "bytes_in": getattr(content, "total_bytes", 0),
                "bytes_out": response.body_length,
                "duration_ms": round(time * 1000, 3),
                "request_id": request.get(request_id_key),
                "remote": request.remote,
            },
        )
