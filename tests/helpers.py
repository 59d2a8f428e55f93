"""Plain helpers for the tests: config builders, polling with a deadline, raw HTTP exchanges."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from aiohttp import web
from multidict import CIMultiDict

# The fuzz tests' example counts are for one ordinary run of the suite, which must stay fast:
# FUZZ_SCALE=10 pytest tests/gateway/test_fuzz.py searches ten times as long, for a deeper look.
FUZZ_SCALE = float(os.environ.get("FUZZ_SCALE", "1"))


def fuzz_examples(n: int) -> int:
    """``n`` hypothesis examples, scaled by ``FUZZ_SCALE``."""
    return max(1, round(n * FUZZ_SCALE))


def one_service(url: str | list[str], prefix: str = "/", **route: Any) -> dict[str, Any]:
    """A config with one service ``svc`` and one route to it: auth off, any body type or size
    (the proxy's own behaviour; validation and limits have their own tests)."""
    route.setdefault("content_types", ["*/*"])
    route.setdefault("max_body", "unlimited")
    service: dict[str, Any] = {"urls": url} if isinstance(url, list) else {"url": url}
    for key in ("timeout", "eject_seconds"):
        if key in route:
            service[key] = route.pop(key)
    return {
        "services": {"svc": service},
        "routes": [{"prefix": prefix, "service": "svc", "auth": "none", **route}],
    }


async def wait_for(predicate: Callable[[], bool], deadline_s: float = 5.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds; fail the test after ``deadline_s`` seconds."""
    deadline = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:g}s waiting for {what}")
        await asyncio.sleep(0.01)


async def open_slow_reader(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``port`` whose receive buffer is tiny and which the test then does not
    read: the server's writes back up after a few KB, as behind a client that stopped reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock, limit=4096)


async def raw_exchange(port: int, request: bytes, deadline_s: float = 5.0) -> bytes:
    """Send ``request`` bytes (which should say ``Connection: close``) and read until EOF."""
    async with asyncio.timeout(deadline_s):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            await writer.drain()
            return await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()


def get_request(path: str, headers: list[tuple[str, str]]) -> bytes:
    """A GET for ``raw_exchange`` with ``headers`` written as given: repeated names, any casing,
    whitespace around values and empty values reach the server as they are here."""
    lines = [f"GET {path} HTTP/1.1", "Host: gateway", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def raw_url(client: Any, raw_path: str) -> Any:
    """An absolute URL for ``raw_path`` that the client sends byte for byte (no normalisation)."""
    from yarl import URL

    return URL(f"http://{client.host}:{client.port}{raw_path}", encoded=True)


async def send_raw_path(client: Any, raw_path: str, method: str = "GET", **kwargs: Any) -> Any:
    """Request ``raw_path`` exactly as written; the response comes back already read."""
    async with client.session.request(method, raw_url(client, raw_path), **kwargs) as response:
        await response.read()
    return response


def _zipkin_validator() -> jsonschema.Draft4Validator:
    spec = yaml.safe_load((Path(__file__).parent / "gateway" / "data" / "zipkin2-api.yaml").read_text())
    definitions = spec["definitions"]

    def anchor(node: Any) -> None:
        # The official patterns are unanchored ("[a-f0-9]{16,32}" matches inside any string).
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str):
                node["pattern"] = "^(?:" + node["pattern"] + ")$"
            for value in node.values():
                anchor(value)
        elif isinstance(node, list):
            for value in node:
                anchor(value)

    anchor(definitions)
    schema = {"definitions": definitions, "$ref": "#/definitions/ListOfSpans"}
    return jsonschema.Draft4Validator(schema, format_checker=jsonschema.FormatChecker())


VALIDATOR = _zipkin_validator()


def zipkin_span_problems(span: dict[str, Any]) -> list[str]:
    """What the schema cannot say about a span our programs report, as a Zipkin server would see
    it: ids of exactly 16/32 hex that are not all zero (the schema's pattern takes 17 to 31),
    epoch *microseconds* of now (milli- or nanoseconds would be off by 1000), a duration (every
    span we send is finished), a kind, and a local endpoint named for the service."""
    problems = []
    if len(span.get("traceId", "")) not in (16, 32):
        problems.append("traceId is neither 16 nor 32 hex")
    for key in ("traceId", "id", "parentId"):
        if isinstance(span.get(key), str) and not span[key].strip("0"):
            problems.append(f"{key} is all zero")
    if span.get("parentId") == span.get("id"):
        problems.append("the span is its own parent")
    now_us = time.time() * 1_000_000
    timestamp = span.get("timestamp")
    if not isinstance(timestamp, int) or not now_us - 3600e6 < timestamp <= now_us + 60e6:
        problems.append(f"timestamp {timestamp!r} is not epoch microseconds of the last hour")
    duration = span.get("duration")
    if not isinstance(duration, int) or not 1 <= duration < 600e6:
        problems.append(f"duration {duration!r} is not microseconds of a finished span")
    if span.get("kind") not in ("SERVER", "CLIENT"):
        problems.append(f"kind {span.get('kind')!r}")
    if not span.get("localEndpoint", {}).get("serviceName"):
        problems.append("no localEndpoint.serviceName")
    return problems


class Collector:
    """A Zipkin v2 collector: every POSTed batch must be JSON validating against the official
    schema (whole, patterns anchored), and each span must pass ``zipkin_span_problems``.

    A batch that does not is answered 400, as Zipkin would, and makes every later read of
    ``spans`` fail with the reason (an assertion in the handler would only reach the reporter).
    """

    def __init__(self, max_body: int | None = None) -> None:
        self._spans: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.posts = 0
        # A body over the limit is answered 413, as every collector does over its own (Zipkin's
        # 10 MiB, the OpenTelemetry collector's 20 MiB, the aiohttp app's 1 MiB by default).
        self.max_body = max_body
        self.too_large = 0
        self.unavailable = 0  # posts still to answer 503, as a collector that is restarting

    @property
    def spans(self) -> list[dict[str, Any]]:
        assert not self.refused, self.refused[0]
        return self._spans

    async def handle(self, request: web.Request) -> web.Response:
        problems: list[str] = []
        if request.content_type != "application/json":
            problems.append(f"Content-Type {request.content_type}")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.too_large += 1
            raise
        if self.max_body is not None and len(raw) > self.max_body:
            self.too_large += 1
            return web.Response(status=413)
        if self.unavailable:
            self.unavailable -= 1
            return web.Response(status=503)
        body = json.loads(raw)
        problems += [f"schema: {e.message} at {list(e.absolute_path)}" for e in VALIDATOR.iter_errors(body)]
        for span in body if isinstance(body, list) else []:
            problems += [f"{problem} in {span}" for problem in zipkin_span_problems(span)]
        if problems:
            self.refused.append(f"spans refused: {problems}")
            return web.Response(status=400)
        self.posts += 1
        self._spans.extend(body)
        return web.Response(status=202)

    def by_kind(self, kind: str) -> list[dict[str, Any]]:
        return [s for s in self.spans if s.get("kind") == kind]


ROOT = Path(__file__).resolve().parents[1]
# Variables the programs read; a test's environment starts without any of them.
_PROGRAM_VARIABLES = (
    "GATEWAY_", "SERVICE_", "AUTH_", "POSTGRES_", "REDIS_", "INTELLIGENCE_", "LOG_", "CORS_",
    "TRUSTED_", "ZIPKIN_", "TRACE_", "RATE_LIMIT_", "CHAT_CACHE_",
)  # fmt: skip


def program_env(**env: str) -> dict[str, str]:
    """This process's environment minus the programs' settings, plus ``env``; imports come from this
    worktree and only errors are logged, so what a refused start prints is all there is on stderr."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(_PROGRAM_VARIABLES)}
    return {**base, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "ERROR", **env}


def run_program(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` to its end, output captured."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def refusal(result: subprocess.CompletedProcess[str]) -> str:
    """The one line a program prints when it refuses to start: exit 2, no traceback, nothing else."""
    output = f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert "Traceback" not in result.stderr + result.stdout, output
    assert result.returncode == 2, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host``; on both families for ``::`` (which the gateway binds dual-stack)."""
    host = host.strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        if host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A redis-server of the test's own on a free port, which the test may stop."""

    def __init__(self, tmp: Path | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise AssertionError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.dir = tmp if tmp is not None else Path(tempfile.mkdtemp(prefix="private-redis-"))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"private redis-server on port {self.port} did not start")
            time.sleep(0.02)  # polling a child process from a sync fixture, under a deadline

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        self.process = None

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=2)


async def wait_ready(
    base: str, process: asyncio.subprocess.Process, log: Path, deadline_s: float = 15
) -> None:
    """Poll ``base``/health/ready until it answers 200; fail with the process's log if it died."""
    import aiohttp

    deadline = time.monotonic() + deadline_s
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"{base}/health/ready") as ready:
                    if ready.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            assert process.returncode is None, log.read_text(errors="replace")
            assert time.monotonic() < deadline, "the gateway did not become ready"
            await asyncio.sleep(0.01)


def signals_in(pid: int, field: str) -> set[signal.Signals]:
    """The signals a process has in ``field`` of its /proc status: ``SigCgt`` (caught by a
    handler), ``SigIgn`` (ignored), ``SigBlk`` (blocked)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line for line in status.splitlines() if line.startswith(f"{field}:")).split()[1], 16)
    return {s for s in signal.Signals if mask & (1 << (s - 1))}


def ignore_sigint() -> None:
    """In a program about to start (``preexec_fn``): SIGINT ignored, as a shell starts a background job."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _in_child(open_files: int | None, sigint_ignored: bool) -> None:
    if open_files is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    if sigint_ignored:
        ignore_sigint()


@dataclass
class GatewayProcess:
    """A ``python -m gateway`` started by ``running_gateway``."""

    process: asyncio.subprocess.Process
    port: int
    log: Path
    host: str = "127.0.0.1"  # GATEWAY_HOST; "::" is reached at ::1

    @property
    def base(self) -> str:
        return self.url_at("::1" if self.host.strip("[]") == "::" else self.host)

    def url_at(self, address: str) -> str:
        """The gateway's base URL through ``address`` (``127.0.0.1``, ``::1``)."""
        return f"http://[{address}]:{self.port}" if ":" in address else f"http://{address}:{self.port}"


@asynccontextmanager
async def running_gateway(
    config: dict[str, Any],
    tmp_path: Path,
    *,
    open_files: int | None = None,
    sigint_ignored: bool = False,
    host: str = "127.0.0.1",
    **env: str,
) -> AsyncIterator[GatewayProcess]:
    """``python -m gateway`` with ``config`` as its file and ``env`` added, ready when entered (its
    output in ``log``); killed on the way out unless the test stopped it. ``open_files`` sets the
    process's RLIMIT_NOFILE (``ulimit -n``), ``sigint_ignored`` starts it with SIGINT ignored;
    ``host`` is its GATEWAY_HOST."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port(host)
    variables = {
        "PATH": os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT),
        "GATEWAY_CONFIG": str(path),
        "GATEWAY_HOST": host,
        "GATEWAY_PORT": str(port),
        **env,
    }
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", cwd=ROOT, env=variables, stdout=log, stderr=log,
            preexec_fn=partial(_in_child, open_files, sigint_ignored) if open_files is not None or sigint_ignored else None,
        )  # fmt: skip
    gateway = GatewayProcess(process, port, log_path, host)
    try:
        await wait_ready(gateway.base, process, log_path)
        yield gateway
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@dataclass
class RawResponse:
    """One response as read off the socket."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(data: bytes) -> list[RawResponse]:
    """Split the bytes of (pipelined) responses; framed by Content-Length or chunked, else EOF."""
    responses: list[RawResponse] = []
    while data:
        head, sep, data = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete response head: {head[:200]!r}"
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, _, value = line.partition(":")
            headers.add(name, value.strip())
        if headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size_line, _, data = data.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    data = data.partition(b"\r\n")[2]
                    break
                body, data = body + data[:size], data[size + 2 :]
        elif "Content-Length" in headers:
            length = int(headers["Content-Length"])
            body, data = data[:length], data[length:]
        else:
            body, data = data, b""
        responses.append(RawResponse(int(status_line.split(" ")[1]), headers, body))
    return responses
