"""Streams a large body through HTTP with the stdlib, never holding more than one chunk.

    python bench/transfer.py download URL SIZE
    python bench/transfer.py upload URL SIZE

Prints one JSON line: {"bytes", "seconds", "status", "response"}. Exit code 1 on a short transfer
or a non-200 status.
"""

from __future__ import annotations

import http.client
import json
import sys
import time
from urllib.parse import urlsplit

CHUNK = 1024 * 1024


def main() -> int:
    mode, url, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    path = parts.path or "/"
    start = time.perf_counter()
    response_text = ""
    if mode == "download":
        conn.request("GET", path)
        resp = conn.getresponse()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        moved = 0
        while n := resp.readinto(view):
            moved += n
    elif mode == "upload":
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        chunk = b"\0" * CHUNK
        moved = 0
        while moved < size:
            piece = chunk if size - moved >= CHUNK else chunk[: size - moved]
            conn.send(piece)
            moved += len(piece)
        resp = conn.getresponse()
        response_text = resp.read().decode("utf-8", "replace")[:200]
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    conn.close()
    print(json.dumps({"bytes": moved, "seconds": seconds, "status": resp.status, "response": response_text}))
    return 0 if resp.status == 200 and moved == size else 1


if __name__ == "__main__":
    raise SystemExit(main())
