"""Configuration changes without downtime: re-read ``GATEWAY_CONFIG`` and swap the route table.

``SIGHUP`` calls ``reload_routes``. The file (with ``SERVICE_*_URL`` applied, as at start) is
parsed off the event loop; a bad file is refused with one log line and the table in force stays.
A good one replaces routes and upstreams in one assignment: new requests use it, requests in
flight finish on the table they started with. A service whose settings did not change keeps its
``Upstream`` (warm connections, passive-health state); the others are retired: idle connections
close now, busy ones when their response is done. Other settings (auth, limits, listen address)
need a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

from aiohttp import web

from .health import health_checker_key
from .keys import route_table_key
from .metrics import metrics_key
from .routing import RouteTable
from .settings import Route, ServiceSettings, SettingsError, load_settings
from .upstream import Upstream

__all__ = ["install_table", "reload_routes"]

log = logging.getLogger("gateway.reload")


async def reload_routes(app: web.Application, environ: Mapping[str, str] | None = None) -> bool:
    """Reload services and routes from the environment's ``GATEWAY_CONFIG``; True when applied.

    Reloads run one at a time, each reading the file after the one before installed its table,
    so the last signal's file is the one in force.
    """
    async with app[route_table_key].reloading:
        return await _reload(app, environ)


async def _reload(app: web.Application, environ: Mapping[str, str] | None) -> bool:
    try:
        settings = await asyncio.get_running_loop().run_in_executor(None, load_settings, environ)
    except SettingsError as exc:
        log.error("configuration reload rejected; the current routes stay", extra={"error": str(exc)})
        app[metrics_key].config_reloads.labels("rejected").inc()
        return False
    except Exception as exc:
        # A bug in reading the settings must not end the table in force either, nor surface only
        # as "Task exception was never retrieved" from the signal handler's task.
        log.exception("configuration reload rejected; the current routes stay", extra={"error": repr(exc)})
        app[metrics_key].config_reloads.labels("rejected").inc()
        return False

    replaced = install_table(app, settings.routes, settings.services)
    app[metrics_key].config_reloads.labels("ok").inc()
    log.info(
        "configuration reloaded",
        extra={
            "config_file": settings.config_file,
            "routes": len(settings.routes),
            "services": len(settings.services),
            "replaced_services": replaced,
        },
    )
    return True


def install_table(
    app: web.Application, routes: Sequence[Route], services: Mapping[str, ServiceSettings]
) -> list[str]:
    """Put ``routes`` and ``services`` in force in one assignment; the names of the services
    whose upstream was replaced (or removed) are returned."""
    live = app[route_table_key]
    old = live.current
    upstreams: dict[str, Upstream] = {}
    for name, service in services.items():
        kept = old.upstreams.get(name)
        upstreams[name] = kept if kept is not None and kept.service == service else Upstream(service)
    live.current = RouteTable(routes, upstreams)
    replaced = sorted(name for name, upstream in old.upstreams.items() if upstreams.get(name) is not upstream)
    for name in replaced:
        old.upstreams[name].retire()
    if health_checker_key in app:
        app[health_checker_key].invalidate()
    return replaced
