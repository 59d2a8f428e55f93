"""``python -m gateway up``: everything needed to try the gateway, in one process."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence

from .app import create_app
from .devauth import dev_secret, mint_token
from .logs import configure_logging
from .server import Listener, run, serve
from .settings import Settings

__all__ = ["run_up"]

log = logging.getLogger("gateway.up")


def run_up(settings: Settings) -> int:
    configure_logging(settings.log_level, settings.log_format)
    auth = settings.auth
    dev_mode = auth.enabled and not (auth.jwt_secret or auth.jwks_url)
    if dev_mode:
        secret = dev_secret(settings.data_dir)
        settings = dataclasses.replace(
            settings, auth=dataclasses.replace(auth, jwt_secret=secret, algorithms=("HS256",))
        )
    app = create_app(settings)

    def banner(bound: Sequence[tuple[Listener, int]]) -> None:
        port = bound[0][1]
        lines = [f"gateway is up on http://{settings.host}:{port}"]
        if dev_mode:
            token = mint_token(settings, subject="dev-user", scopes=[], ttl=24 * 3600)
            lines += [
                f"development token (24 h, secret in {settings.data_dir}):",
                f"  export TOKEN={token}",
                f'  curl -H "Authorization: Bearer $TOKEN" http://{settings.host}:{port}/health/detailed',
            ]
        print("\n".join(lines), file=sys.stderr, flush=True)

    run(
        serve(
            [Listener(app, settings.host, settings.port, "gateway")],
            shutdown_timeout=settings.shutdown_timeout,
            on_started=banner,
        )
    )
    return 0
