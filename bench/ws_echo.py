"""WebSocket echo upstream for bench/autobahn.py: text back as text, binary back as binary.

python bench/ws_echo.py PORT

No message size limit and no permessage-deflate, so what the harness sees through the gateway is
the gateway's relay, not this server's limits. aiohttp answers pings and the close handshake
itself. GET /health answers 200 (without an upgrade), for the readiness poll.
"""

from __future__ import annotations

import sys

from aiohttp import WSMsgType, web


async def health(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=0, compress=False)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type is WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


def main() -> None:
    port = int(sys.argv[1])
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/{tail:.*}", echo)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
