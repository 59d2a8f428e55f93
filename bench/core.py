#!/usr/bin/env python3
"""The gateway with only the core of its middleware chain, for ``bench/run.py --core``.

Issue 2's performance target is stated twice: for the proxy core, and for the same bench "with
the middlewares of later issues switched on". The gateway has no setting that switches its
middlewares off (a production gateway should not have one), so this launcher builds the app as
``python -m gateway`` does and keeps only request ids and tracing, the error envelope and
routing. Out: metrics, CORS, body checks, both rate-limit stages, authentication and schema
validation. Everything else (the proxy, the response hook, the JSON access log) is unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gateway.cli as gateway_cli
from gateway.app import create_app

CORE = ("tracing_middleware", "error_middleware", "routing_middleware")


def create_core_app(settings: Any) -> Any:
    app = create_app(settings)
    app.middlewares[:] = [m for m in app.middlewares if m.__qualname__.split(".")[0] in CORE]
    assert len(app.middlewares) == len(CORE), [m.__qualname__ for m in app.middlewares]
    return app


if __name__ == "__main__":
    gateway_cli.create_app = create_core_app
    raise SystemExit(gateway_cli.main(["serve"]))
