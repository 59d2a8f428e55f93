#!/usr/bin/env python3
"""CPU instructions per proxied request, counted by valgrind: a measure that noise cannot move.

    python bench/instructions.py                      # GET 1 KiB, full middleware chain
    python bench/instructions.py --path /1m           # GET 1 MiB (see the caveat below)
    python bench/instructions.py --env LOG_LEVEL=WARNING   # e.g. without the access log
    python bench/instructions.py --keep /tmp/cg.out   # keep callgrind's file for callgrind_annotate

On this shared machine two wrk runs of the same build differ by 30%; the instruction count of the
same build differs by about 1%, whatever else runs. So: compare two versions of the gateway with
this (same number, both ways), and quote speed from bench/run.py. Instructions are not time (cache
misses, system calls and the kernel's share are not in them), and glibc's large ``memcpy`` runs as
``rep movsb``, which valgrind counts one instruction per byte: for large bodies the count is
dominated by copies and overstates them.

How: the gateway runs under ``valgrind --tool=callgrind`` with counting off; a loopback client
sends warm-up requests, counting is switched on, exactly ``--requests`` requests go through
(``--connections`` keep-alive connections), counting is switched off and the counts are read. The
upstream is nginx serving the same files as bench/run.py. Needs ``valgrind`` and ``nginx``
(Debian packages); about 30 s for the default 1600 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
VALGRIND = shutil.which("valgrind") or "/usr/bin/valgrind"
CALLGRIND_CONTROL = shutil.which("callgrind_control") or "/usr/bin/callgrind_control"
# The same route as bench/run.py: every middleware present, none of them refusing.
CONFIG = """services:
  bench: {{url: 'http://127.0.0.1:{port}'}}
routes:
  - {{prefix: /, service: bench, max_body: unlimited, auth: none, rate_limit: 1000000/second,
      content_types: ['*/*']}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_upstream(tmp: Path, port: int) -> subprocess.Popen[bytes]:
    docroot = tmp / "www"
    docroot.mkdir()
    (docroot / "1k").write_bytes(b"k" * 1024)
    (docroot / "1m").write_bytes(b"m" * 1024 * 1024)
    prefix = tmp / "nginx"
    prefix.mkdir()
    for path in (tmp, docroot, prefix, *docroot.iterdir()):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)  # nginx workers may run as nobody
    text = (BENCH / "nginx" / "upstream.conf").read_text()
    for key, value in {"PREFIX": prefix, "PORT": port, "DOCROOT": docroot}.items():
        text = text.replace(f"@{key}@", str(value))
    (prefix / "nginx.conf").write_text(text)
    return subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf")], stderr=subprocess.DEVNULL
    )


def wait_up(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health/ready", timeout=5).read()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{what} did not start") from None
            time.sleep(0.2)


async def drive(port: int, path: str, requests: int, connections: int) -> int:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n".encode()

    async def one_connection(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(count):
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise SystemExit(f"unexpected answer: {head[:200]!r}")
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            if length is None:
                raise SystemExit("the answer has no Content-Length")
            await reader.readexactly(int(length.group(1)))
        writer.close()

    per = max(1, requests // connections)
    await asyncio.gather(*(one_connection(per) for _ in range(connections)))
    return per * connections


def gateway_env(tmp: Path, upstream_port: int, gateway_port: int, extra: list[str]) -> dict[str, str]:
    """The environment of the measured process: this checkout's gateway on ``gateway_port``, the
    bench route to ``upstream_port`` (its config written into ``tmp``), then ``extra`` (K=V)."""
    (tmp / "gateway.yaml").write_text(CONFIG.format(port=upstream_port))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "LOG_", "RATE_LIMIT_"))}
    env.update(
        GATEWAY_HOST="127.0.0.1",
        GATEWAY_PORT=str(gateway_port),
        GATEWAY_CONFIG=str(tmp / "gateway.yaml"),
        LOG_LEVEL="INFO",
        LOG_FORMAT="json",
        PYTHONPATH=str(ROOT),
    )
    for item in extra:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def measured_program(core: bool, reference: str | None, upstream_port: int, gateway_port: int) -> list[str]:
    """The arguments after ``python``: the gateway, its core chain, or one of bench/references.py."""
    if reference:
        upstream = f"http://127.0.0.1:{upstream_port}"
        return [str(BENCH / "references.py"), reference, str(gateway_port), upstream]
    return [str(BENCH / "core.py")] if core else ["-m", "gateway"]


def stop(procs: list[subprocess.Popen[bytes]], tmp: Path) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(tmp, ignore_errors=True)


def add_run_arguments(parser: argparse.ArgumentParser, *, requests: int) -> None:
    """What is measured, and how it is driven (shared with bench/bytecodes.py)."""
    parser.add_argument(
        "--requests", type=int, default=requests, help=f"requests counted (default {requests})"
    )
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    parser.add_argument("--path", default="/1k", help="/1k or /1m (default /1k)")
    parser.add_argument("--env", nargs="*", default=[], metavar="K=V", help="extra gateway environment")
    parser.add_argument(
        "--core", action="store_true", help="core middlewares only: tracing, errors, routing (bench/core.py)"
    )
    parser.add_argument(
        "--reference",
        choices=("proxy", "serve", "bare"),
        help="count bench/references.py instead of the gateway (the plain aiohttp proxy, aiohttp itself, the bare loop)",
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(parser, requests=1600)
    parser.add_argument("--keep", metavar="FILE", help="copy callgrind's output here")
    args = parser.parse_args()
    for tool in (NGINX, VALGRIND, CALLGRIND_CONTROL):
        if not Path(tool).exists():
            raise SystemExit(f"{tool} not found (Debian: apt-get install nginx valgrind)")

    tmp = Path(tempfile.mkdtemp(prefix="gateway-instructions-"))
    upstream_port, gateway_port = free_port(), free_port()
    env = gateway_env(tmp, upstream_port, gateway_port, args.env)
    out = tmp / "callgrind.out"
    procs = [start_upstream(tmp, upstream_port)]
    program = measured_program(args.core, args.reference, upstream_port, gateway_port)
    gateway = subprocess.Popen(
        [VALGRIND, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
         sys.executable, *program],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "wb"),
    )  # fmt: skip
    procs.append(gateway)
    try:
        wait_up(gateway_port, gateway, "the gateway (under valgrind)", timeout=120)
        asyncio.run(drive(gateway_port, args.path, 320, args.connections))  # warm up
        subprocess.run([CALLGRIND_CONTROL, "-i", "on", str(gateway.pid)], check=True, capture_output=True)
        counted = asyncio.run(drive(gateway_port, args.path, args.requests, args.connections))
        subprocess.run([CALLGRIND_CONTROL, "-i", "off", str(gateway.pid)], check=True, capture_output=True)
        subprocess.run([CALLGRIND_CONTROL, "-d", str(gateway.pid)], check=True, capture_output=True)
        total = 0
        for name in glob.glob(f"{out}*"):
            for line in open(name):
                if line.startswith("totals:"):
                    total += int(line.split()[1])
            if args.keep and os.path.getsize(name):
                shutil.copy(name, args.keep)
        print(f"GET {args.path}: {total / counted / 1000:.1f}k instructions per request ({counted} requests)")
        return 0
    finally:
        stop(procs, tmp)


if __name__ == "__main__":
    sys.exit(main())
