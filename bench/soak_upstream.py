"""Stub upstream for bench/soak.py: the cluster registry and the streaming service in one app.

    python bench/soak_upstream.py PORT

    GET  /health                      200 "ok"
    GET  /api/v1/clusters[/...]       200, 1 KiB of b"k"
    POST /api/v1/clusters             reads the whole body, 201 {"bytes": n, "name": ...}
    GET  /api/v1/stream/sse?n=&ms=    text/event-stream: n events (default 20), one every ms
                                      milliseconds (default 100): "id: i" + "data: {"seq": i}"

Every answer carries ``x-soak-upstream: stub`` (so the load side can tell the stub's answers from
the gateway's own) and ``x-soak-subject`` echoing the ``x-auth-subject`` the gateway set (so it can
check that identities are not mixed up between concurrent requests).
"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web

ONE_KIB = b"k" * 1024


def _marks(request: web.Request) -> dict[str, str]:
    return {"x-soak-upstream": "stub", "x-soak-subject": request.headers.get("x-auth-subject", "")}


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def get_1k(request: web.Request) -> web.Response:
    return web.Response(body=ONE_KIB, content_type="application/octet-stream", headers=_marks(request))


async def post_cluster(request: web.Request) -> web.Response:
    raw = await request.read()
    try:
        name = json.loads(raw).get("name")
    except ValueError:
        return web.json_response({"error": "stub: body is not JSON"}, status=400, headers=_marks(request))
    return web.json_response({"bytes": len(raw), "name": name}, status=201, headers=_marks(request))


async def sse(request: web.Request) -> web.StreamResponse:
    n = int(request.query.get("n", "20"))
    interval = int(request.query.get("ms", "100")) / 1000
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **_marks(request)}
    )
    await response.prepare(request)
    for seq in range(n):
        await response.write(f"id: {seq}\ndata: {json.dumps({'seq': seq})}\n\n".encode())
        if seq < n - 1:
            await asyncio.sleep(interval)
    await response.write_eof()
    return response


def main() -> None:
    port = int(sys.argv[1])
    app = web.Application(client_max_size=1024**2)
    app.router.add_get("/health", health)
    app.router.add_get("/api/v1/stream/sse", sse)
    app.router.add_post("/api/v1/clusters", post_cluster)
    app.router.add_get("/api/v1/clusters", get_1k)
    app.router.add_get("/api/v1/clusters/{tail:.*}", get_1k)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
