"""``python -m intelligence [serve]``."""

from __future__ import annotations

import os

from gateway.logs import configure_logging
from gateway.server import Listener, run, serve

from .app import create_app


def main() -> int:
    configure_logging(os.environ.get("LOG_LEVEL", "INFO").upper(), os.environ.get("LOG_FORMAT", "json"))
    host = os.environ.get("INTELLIGENCE_HOST", "127.0.0.1")
    port = int(os.environ.get("INTELLIGENCE_PORT", "8081"))
    run(serve([Listener(create_app(), host, port, "intelligence")], shutdown_timeout=30.0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
