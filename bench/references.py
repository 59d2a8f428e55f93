"""Yardsticks for the GET 1 KiB target, measured in the same run as the gateway (``bench/run.py
--references``).

    python bench/references.py proxy PORT UPSTREAM_URL   # a straightforward ClientSession proxy
    python bench/references.py serve PORT                # aiohttp answering 1 KiB itself
    python bench/references.py bare PORT UPSTREAM_URL    # the gateway's proxy pieces, no layers

The first two are issue 2's. It measured them once, on its own machine, next to nginx: the plain
proxy at 0.14x, aiohttp serving the same 1 KiB without proxying at 0.71x, "the room between is
what good engineering wins". The same ratios move a lot from one machine to the next (a slower
interpreter build or CPU cuts Python's share more than nginx's), so ``--references`` measures them
in the same run as the gateway, under the same pinning and load. The third is the gateway's own
floor (``bare_app``): the distance from it to the gateway is what the gateway's layers cost.

All run on uvloop, with no access log, as the gateway does. The proxy is what one writes first
with aiohttp: a ``ClientSession`` with a keep-alive pool, the hop-by-hop headers dropped, the
answer streamed back with ``StreamResponse``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import uvloop
from aiohttp import ClientSession, TCPConnector, web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the bare loop imports gateway

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host"})
session_key = web.AppKey("session", ClientSession)


def proxy_app(upstream: str) -> web.Application:
    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        async with ClientSession(connector=TCPConnector(limit=0), auto_decompress=False) as session:
            app[session_key] = session
            yield

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with request.app[session_key].request(
            request.method,
            upstream + request.raw_path,
            headers=headers,
            data=request.content if request.body_exists else None,
            allow_redirects=False,
        ) as answer:
            response = web.StreamResponse(
                status=answer.status,
                headers={k: v for k, v in answer.headers.items() if k.lower() not in _HOP},
            )
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", proxy)
    return app


def bare_app(upstream: str) -> web.Application:
    """The gateway's floor: aiohttp's server with the gateway's own proxy pieces (header rules, the
    upstream pool, the one-write relay of a small answer) and nothing else: no middleware, no access
    log, no tracing, no route table, aiohttp's plain runner. Not a yardstick the issue names; it
    shows what the gateway's layers above the proxy cost."""
    from gateway.headers import response_headers, upstream_headers
    from gateway.pool import TargetPool, exchange
    from gateway.proxy import _relay_response, _whole_response

    pool = TargetPool(upstream)

    async def proxy(request: web.Request) -> web.StreamResponse:
        headers = upstream_headers(
            request.headers, remote=request.remote, scheme=request.scheme, host=request.host
        )
        headers["Host"] = pool.host_header
        protocol = await pool.acquire(5.0)
        try:
            message, payload = await exchange(
                protocol, method=request.method, target=request.raw_path, headers=headers, body=None,
                chunked=False, read_timeout=30.0,
            )  # fmt: skip
            if type(payload) is bytes:  # the whole answer came with its head, as the proxy takes it
                response = _whole_response(
                    message.code, message.reason, response_headers(message.headers), payload
                )
                pool.release(protocol)
                return response
            response = await _relay_response(request, message, payload)
        except BaseException:
            protocol.close()
            raise
        if payload.is_eof():
            pool.release(protocol)
        else:
            protocol.close()
        return response

    app = web.Application()
    app.router.add_get("/{tail:.*}", proxy)
    return app


def serve_app() -> web.Application:
    body = b"k" * 1024  # what the bench's upstream serves at /1k

    async def serve(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_get("/1k", serve)
    app.router.add_get("/health", serve)
    return app


def main(argv: list[str]) -> None:
    mode, port = argv[0], int(argv[1])
    if mode == "proxy":
        app = proxy_app(argv[2].rstrip("/"))
    elif mode == "bare":
        app = bare_app(argv[2].rstrip("/"))
    else:
        app = serve_app()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main(sys.argv[1:])
