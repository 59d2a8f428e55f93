"""Upload sink for the memory test: reads any request body in chunks, discards it, answers its size.

python bench/sink.py PORT
"""

from __future__ import annotations

import sys

from aiohttp import web


async def sink(request: web.Request) -> web.Response:
    received = 0
    while chunk := await request.content.readany():
        received += len(chunk)
    return web.json_response({"bytes": received})


def main() -> None:
    port = int(sys.argv[1])
    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", sink)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handle_signals=True)


if __name__ == "__main__":
    main()
