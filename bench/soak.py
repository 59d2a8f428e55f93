#!/usr/bin/env python3
"""Bounded soak: a mixed workload through the gateway to real upstreams, then invariants.

    python bench/soak.py                                  # 5 minutes, 128 connections
    python bench/soak.py --duration 20 --connections 32   # a short validation run

Starts, on 127.0.0.1 and under a temporary directory: a stub upstream (bench/soak_upstream.py),
the chat API (``python -m intelligence``) on a database of its own (``soak_<random>``, created,
migrated and dropped again), and the gateway (``python -m gateway``) with Redis-backed rate limits
and JWT auth. Drives it for ``--duration`` seconds with ``--connections`` workers, then checks:
no errors, every chat message readable, bounded RSS growth, file descriptors back to baseline,
no traceback in the gateway's log, a clean drain on SIGTERM. Exits non-zero when any fails.

Stdlib and aiohttp for the load; psycopg2 and redis (already installed as the chat API's and the
gateway's own dependencies) only to create/drop the database and delete the run's Redis keys.
See bench/README.md ("Soak").
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import math
import os
import platform
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import (  # noqa: E402  (bench/ is not a package; reuse the wrk harness's process handling)
    _GATEWAY_ENV_PREFIXES,
    LOAD_CPU,
    PROXY_CPU,
    RESULTS,
    ROOT,
    TASKSET,
    BenchError,
    Processes,
    free_port,
    git_commit,
    rss_kib,
    stop_on_sigterm,
    wait_http,
)

# The workload: shares of the non-streaming operations (SSE streams are on a timer per worker).
MIX = (("get_1k", 0.72), ("post_cluster", 0.12), ("chat_write", 0.13), ("chat_read", 0.03))
SSE_EVENTS, SSE_MS = 20, 100  # one stream: 20 events 100 ms apart, about 2 s
HUGE_RATE = "1000000/second"
POOL_MAX_IDLE = 256  # gateway/pool.py TargetPool.max_idle: idle keep-alive sockets kept per target
POOL_IDLE_TIMEOUT = 15.0  # gateway/pool.py TargetPool.idle_timeout
# gateway/limiter.py; subject buckets are "sub:<subject>:<prefix>:<limit>/<period>"
LIMITER_PREFIX = "gateway:rl:"
CLUSTER = {
    "api_server_url": "https://api.soak.example.com:6443",
    "provider": "kind",
    "environment": "testing",
    "labels": {"app.kubernetes.io/part-of": "soak", "tier": "bench"},
}


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def hs256_token(secret: str, subject: str, ttl: int) -> str:
    """A JWT as ``python -m gateway token --sub`` mints it (HS256, sub/iat/nbf/exp), stdlib only."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = b64(
        json.dumps({"sub": subject, "iat": now, "nbf": now, "exp": now + ttl}, separators=(",", ":")).encode()
    )
    signing_input = f"{header}.{claims}".encode()
    sig = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{claims}.{b64(sig)}"


def percentile(values: array | list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1))  # nearest rank
    return ordered[rank]


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.1f}ms" if value < 100 else f"{value:.0f}ms")


def require_loopback(url: str, what: str) -> None:
    host = urlsplit(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host) in ipaddress.ip_network("127.0.0.0/8")
    except ValueError:
        ok = False
    if not ok:
        raise BenchError(f"{what} must be on 127.0.0.0/8, got {host!r}")


# -- the gateway process, seen from /proc -------------------------------------------------------


def _tcp_inodes() -> dict[int, tuple[int, int, str]]:
    """socket inode -> (local port, remote port, state) for every TCP socket on the machine."""
    out: dict[int, tuple[int, int, str]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as fh:
                next(fh)
                for line in fh:
                    parts = line.split()
                    local, remote, state, inode = parts[1], parts[2], parts[3], int(parts[9])
                    out[inode] = (int(local.rsplit(":", 1)[1], 16), int(remote.rsplit(":", 1)[1], 16), state)
        except OSError:
            pass
    return out


def fd_snapshot(pid: int, ports: dict[str, int]) -> dict[str, int]:
    """The process's open fds: total, and its TCP sockets by peer (client side, each upstream, redis)."""
    fds = os.listdir(f"/proc/{pid}/fd")
    tcp = _tcp_inodes()
    counts = Counter({"total": len(fds)})
    by_port = {port: name for name, port in ports.items()}
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if not link.startswith("socket:["):
            continue
        entry = tcp.get(int(link[8:-1]))
        if entry is None:
            counts["other_sockets"] += 1
            continue
        local, remote, state = entry
        if state == "08":  # CLOSE_WAIT: the peer closed, this process has not
            counts["close_wait"] += 1
        if state == "0A":  # LISTEN
            counts["listen"] += 1
        elif local == ports["gateway"]:
            counts["client_conns"] += 1
        elif remote in by_port:
            counts[f"to_{by_port[remote]}"] += 1
        else:
            counts["other_tcp"] += 1
    return dict(counts)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gateway_sample(pid: int, ports: dict[str, int]) -> dict[str, Any]:
    return {"rss_kib": rss_kib(pid)["VmRSS"], "fds": fd_snapshot(pid, ports), "cpu_s": cpu_seconds(pid)}


# -- results ------------------------------------------------------------------------------------


@dataclass(slots=True)
class ErrorEvent:
    t: float  # seconds since the load started (request start)
    op: str
    kind: str  # gateway | upstream | connection | sse | mismatch | chat? (resolved from the access log)
    status: int | None
    detail: str
    request_id: str


@dataclass
class Window:
    requests: Counter = field(default_factory=Counter)  # op -> count
    latencies: dict[str, array] = field(default_factory=dict)  # op -> ms

    def add(self, op: str, latency_ms: float) -> None:
        self.requests[op] += 1
        self.latencies.setdefault(op, array("d")).append(latency_ms)


class Stats:
    def __init__(self, duration: float, window: float) -> None:
        self.duration, self.window = duration, window
        self.windows = {"first": Window(), "last": Window(), "overall": Window()}
        self.errors: list[ErrorEvent] = []
        self.t0 = 0.0

    def _names(self, t: float) -> list[str]:
        names = ["overall"]
        if t < self.window:
            names.append("first")
        if t >= self.duration - self.window:
            names.append("last")
        return names

    def add(self, op: str, started: float, latency_ms: float) -> None:
        for name in self._names(started - self.t0):
            self.windows[name].add(op, latency_ms)

    def error(self, op: str, started: float, kind: str, status: int | None, detail: str, rid: str) -> None:
        self.errors.append(ErrorEvent(started - self.t0, op, kind, status, detail[:300], rid))


# -- the load -----------------------------------------------------------------------------------


class Worker:
    def __init__(self, soak: Soak, idx: int, http: aiohttp.ClientSession, stats: Stats) -> None:
        self.soak, self.idx, self.http, self.stats = soak, idx, http, stats
        self.subject = f"{soak.subject_prefix}{idx}"
        self.auth = {"Authorization": f"Bearer {hs256_token(soak.secret, self.subject, soak.token_ttl)}"}
        self.rng = random.Random(soak.args.seed * 100_003 + idx)
        self.n = 0
        self.session_id: str | None = None
        self.acked: list[dict[str, Any]] = []  # the messages the API acknowledged, in write order
        self.uncertain: set[str] = set()  # ids whose writes failed twice: stored or not
        self.sse_streams = 0

    def _rid(self) -> str:
        self.n += 1
        return f"soak-{self.soak.run_id}-{self.idx}-{self.n}"

    async def call(
        self,
        op: str,
        method: str,
        path: str,
        expect: tuple[int, ...],
        body: Any = None,
        upstream: str = "stub",
    ) -> tuple[int, Any, Any] | None:
        """One request; records latency or the error. Returns (status, headers, parsed body) when
        the status was expected, else None."""
        rid = self._rid()
        headers = {**self.auth, "X-Request-ID": rid}
        data = None
        if body is not None:
            data = json.dumps(body, ensure_ascii=False).encode()
            headers["Content-Type"] = "application/json"
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with self.http.request(method, path, data=data, headers=headers) as resp:
                raw = await resp.read()
                status, rheaders = resp.status, resp.headers
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.stats.add(op, started, (loop.time() - started) * 1000)
            self.stats.error(op, started, "connection", None, repr(exc), rid)
            return None
        self.stats.add(op, started, (loop.time() - started) * 1000)
        parsed: Any = raw
        if rheaders.get("Content-Type", "").startswith("application/json"):
            try:
                parsed = json.loads(raw)
            except ValueError:
                pass
        if status in expect:
            if upstream == "stub" and rheaders.get("x-soak-subject") != self.subject:
                self.stats.error(
                    op, started, "mismatch", status,
                    f"upstream saw x-auth-subject {rheaders.get('x-soak-subject')!r}, sent {self.subject!r}", rid,
                )  # fmt: skip
                return None
            return status, rheaders, parsed
        kind, detail = self.soak.classify(upstream, status, rheaders, parsed)
        self.stats.error(op, started, kind, status, detail, rid)
        return None

    def mismatch(self, op: str, rid_hint: str, detail: str) -> None:
        self.stats.error(op, asyncio.get_running_loop().time(), "mismatch", None, detail, rid_hint)

    # -- operations -------------------------------------------------------------------------------

    async def get_1k(self) -> None:
        got = await self.call("get_1k", "GET", f"/api/v1/clusters/{self.rng.randrange(1000)}", (200,))
        if got is not None and len(got[2]) != 1024:
            self.mismatch("get_1k", "", f"GET 1KiB answered {len(got[2])} bytes")

    async def post_cluster(self) -> None:
        body = {**CLUSTER, "name": f"soak-w{self.idx}-{self.n + 1}"}
        got = await self.call("post_cluster", "POST", "/api/v1/clusters", (201,), body)
        if got is None:
            return
        sent = len(json.dumps(body, ensure_ascii=False).encode())
        answer = got[2] if isinstance(got[2], dict) else {}
        if answer.get("bytes") != sent or answer.get("name") != body["name"]:
            self.mismatch("post_cluster", "", f"the stub received {answer!r}, sent {sent} bytes")

    async def create_session(self) -> None:
        sid = str(uuid.uuid4())
        for attempt in range(3):  # the client id makes retries safe
            got = await self.call(
                "chat_session", "POST", "/api/v1/chat/sessions", (201, 200) if attempt else (201,),
                {"id": sid, "title": f"soak worker {self.idx}"}, upstream="chat",
            )  # fmt: skip
            if got is not None:
                if isinstance(got[2], dict) and got[2].get("id") == sid:
                    self.session_id = sid
                else:
                    self.mismatch("chat_session", "", f"session create answered {str(got[2])[:200]}")
                return

    async def post_message(self, message: dict[str, Any]) -> None:
        mid = str(uuid.uuid4())
        body = {"id": mid, **message}
        path = f"/api/v1/chat/sessions/{self.session_id}/messages"
        got = await self.call("chat_write", "POST", path, (201,), body, upstream="chat")
        if got is None:  # retry once with the same id: idempotent, stored at most once
            got = await self.call("chat_write", "POST", path, (201, 200), body, upstream="chat")
        if got is None:
            self.uncertain.add(mid)
            return
        answer = got[2] if isinstance(got[2], dict) else {}
        if any(answer.get(k) != v for k, v in body.items()):
            self.mismatch("chat_write", "", f"message answer differs from what was sent: {str(answer)[:200]}")
        self.acked.append(body)

    async def chat_write(self) -> None:
        if self.session_id is None:
            await self.create_session()
            if self.session_id is None:
                return
        k = self.n + 1
        if self.rng.random() < 0.25:
            call_id = f"call_{self.idx}_{k}"
            args = json.dumps({"namespace": "default", "selector": f"app=w{self.idx}"})
            await self.post_message(
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": "get_pods", "arguments": args}},
                ]}
            )  # fmt: skip
            await self.post_message(
                {"role": "tool", "tool_call_id": call_id, "content": "2 pods",
                 "tool_results": {"pods": [{"name": f"w{self.idx}-a"}, {"name": f"w{self.idx}-b"}]}}
            )  # fmt: skip
        else:
            await self.post_message(
                {"role": "user", "content": f"soak message {k} from worker {self.idx} — ünï 🚀"}
            )
        if self.acked and self.rng.random() < 0.05:
            # A client retrying a write it already got an answer for: 200, the same message, no copy.
            body = self.acked[-1]
            path = f"/api/v1/chat/sessions/{self.session_id}/messages"
            got = await self.call("chat_resend", "POST", path, (200,), body, upstream="chat")
            if got is not None and (not isinstance(got[2], dict) or got[2].get("id") != body["id"]):
                self.mismatch("chat_resend", "", f"resend answered {str(got[2])[:200]}")

    async def chat_read(self) -> None:
        if self.session_id is None:
            return await self.chat_write()
        got = await self.call(
            "chat_read",
            "GET",
            f"/api/v1/chat/sessions/{self.session_id}/messages?limit=20",
            (200,),
            upstream="chat",
        )
        if got is not None and not (isinstance(got[2], dict) and isinstance(got[2].get("data"), list)):
            self.mismatch("chat_read", "", f"messages page is not an envelope: {str(got[2])[:200]}")

    async def sse(self) -> None:
        """One stream read to the end: every event, in order, arriving as written (not buffered)."""
        self.sse_streams += 1
        rid = self._rid()
        loop = asyncio.get_running_loop()
        headers = {**self.auth, "X-Request-ID": rid, "Accept": "text/event-stream"}
        started = loop.time()
        seqs: list[int] = []
        arrivals: list[float] = []
        timeout = aiohttp.ClientTimeout(total=SSE_EVENTS * SSE_MS / 1000 + 20, sock_read=10)
        cut = None
        try:
            async with self.http.get(
                f"/api/v1/stream/sse?n={SSE_EVENTS}&ms={SSE_MS}", headers=headers, timeout=timeout
            ) as resp:
                if resp.status != 200 or not resp.headers.get("Content-Type", "").startswith(
                    "text/event-stream"
                ):
                    raw = await resp.read()
                    parsed: Any = raw
                    try:
                        parsed = json.loads(raw)
                    except ValueError:
                        pass
                    self.stats.add("sse", started, (loop.time() - started) * 1000)
                    kind, detail = self.soak.classify("stub", resp.status, resp.headers, parsed)
                    self.stats.error("sse", started, kind, resp.status, detail, rid)
                    return
                buf = b""
                async for chunk in resp.content.iter_any():
                    buf += chunk
                    while b"\n\n" in buf:
                        event, buf = buf.split(b"\n\n", 1)
                        for line in event.split(b"\n"):
                            if line.startswith(b"data:"):
                                seqs.append(json.loads(line[5:])["seq"])
                                arrivals.append(loop.time())
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError) as exc:
            cut = repr(exc)
        ttfe = ((arrivals[0] if arrivals else loop.time()) - started) * 1000
        self.stats.add("sse", started, ttfe)
        if cut is not None or seqs != list(range(SSE_EVENTS)):
            in_order = seqs == list(range(len(seqs)))
            self.stats.error(
                "sse", started, "sse", 200,
                f"stream cut short or out of order: {len(seqs)}/{SSE_EVENTS} events"
                f"{'' if in_order else ' (OUT OF ORDER)'}{'; ' + cut if cut else ''}", rid,
            )  # fmt: skip
            return
        spread = arrivals[-1] - arrivals[0]
        if spread < (SSE_EVENTS - 1) * SSE_MS / 1000 * 0.5:
            self.stats.error(
                "sse",
                started,
                "sse",
                200,
                f"events arrived together ({spread * 1000:.0f} ms apart): buffered",
                rid,
            )

    async def run(self, deadline: float, sse_every: float) -> None:
        loop = asyncio.get_running_loop()
        await self.create_session()
        ops = [name for name, _ in MIX]
        weights = [w for _, w in MIX]
        first = min(sse_every, max(1.0, deadline - loop.time() - SSE_EVENTS * SSE_MS / 1000))
        next_sse = loop.time() + self.rng.uniform(0, first)
        while loop.time() < deadline:
            if loop.time() >= next_sse:
                next_sse = loop.time() + sse_every
                await self.sse()
                continue
            await getattr(self, self.rng.choices(ops, weights)[0])()


# -- the run ------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.run_id = secrets.token_hex(4)
        self.db = f"soak_{self.run_id}"
        self.subject_prefix = f"soak-{self.run_id}-w"
        self.cache_prefix = f"soak:{self.run_id}:"
        self.secret = secrets.token_urlsafe(32)
        self.token_ttl = int(args.duration) + 3600
        self.procs = Processes()
        self.tmp = Path(tempfile.mkdtemp(prefix="gateway-soak-"))
        self.ports = {"gateway": free_port(), "stub": free_port(), "chat": free_port(), "redis": 0}
        self.ports["redis"] = urlsplit(args.redis_url).port or 6379
        self.gateway: subprocess.Popen[bytes] | None = None
        self.db_created = False
        self.result: dict[str, Any] = {}
        self.stats = Stats(args.duration, min(args.window, args.duration / 3))
        self.workers: list[Worker] = []
        self.load_ended = 0.0

    # -- classification -------------------------------------------------------------------------

    def classify(self, upstream: str, status: int, headers: Any, body: Any) -> tuple[str, str]:
        """Who made an unexpected answer. The stub marks every answer of its own; the chat API's
        error bodies look like the gateway's, so those are settled later from the access log."""
        detail = body.get("detail") if isinstance(body, dict) else None
        shown = body[:120] if isinstance(body, bytes) else body
        text = f"{status} {detail!r}" if detail is not None else f"{status} {shown!r}"
        if upstream == "stub":
            if headers.get("x-soak-upstream") == "stub":
                return "upstream", text
            if detail is None:
                text += " (NOT the contract's JSON error body)"
            return "gateway", text
        if detail is None:
            return "upstream", text  # the gateway's own answers are always JSON with a detail
        if str(detail).startswith(("Upstream '", "No healthy target")):
            return "gateway", text
        return "chat?", text

    # -- setup ----------------------------------------------------------------------------------

    def pin(self, cpu: str) -> list[str]:
        return [TASKSET, "-c", cpu] if self.args.pin else []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith((*_GATEWAY_ENV_PREFIXES, "CHAT_"))}
        env.update(LOG_LEVEL="INFO", LOG_FORMAT="json", REDIS_URL=self.args.redis_url, **extra)
        return env

    def chat_env(self) -> dict[str, str]:
        return self.env(
            POSTGRES_DSN=f"{self.args.postgres_url.rstrip('/')}/{self.db}",
            CHAT_CACHE_PREFIX=self.cache_prefix,
            INTELLIGENCE_HOST="127.0.0.1",
            INTELLIGENCE_PORT=str(self.ports["chat"]),
            INTELLIGENCE_SHUTDOWN_TIMEOUT="5",
        )

    def admin_sql(self, sql: str) -> None:
        import psycopg2  # the chat API's own driver (through aiopg)

        conn = psycopg2.connect(f"{self.args.postgres_url.rstrip('/')}/{self.args.postgres_admin_db}")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()

    def setup(self) -> None:
        log(f"run {self.run_id}: database {self.db}, tmp {self.tmp}")
        self.admin_sql(f'CREATE DATABASE "{self.db}"')
        self.db_created = True
        migrate = subprocess.run(
            [sys.executable, "-m", "intelligence", "migrate"], cwd=ROOT, env=self.chat_env(),
            capture_output=True, timeout=120,
        )  # fmt: skip
        if migrate.returncode:
            raise BenchError(
                "python -m intelligence migrate failed:\n" + (migrate.stdout + migrate.stderr).decode()
            )
        log(migrate.stdout.decode().strip())

        stub = self.procs.start(
            "stub",
            [*self.pin(LOAD_CPU), sys.executable, str(BENCH / "soak_upstream.py"), str(self.ports["stub"])],
            stderr=open(self.tmp / "stub.log", "wb"),
        )
        chat = self.procs.start(
            "intelligence",
            [*self.pin(LOAD_CPU), sys.executable, "-m", "intelligence"],
            cwd=ROOT, env=self.chat_env(), stderr=open(self.tmp / "intelligence.log", "wb"),
        )  # fmt: skip
        wait_http(self.ports["stub"], "/health", stub, "stub upstream")
        wait_http(self.ports["chat"], "/health", chat, "chat API")

        limits = f"rate_limit: {HUGE_RATE}"
        (self.tmp / "gateway.yaml").write_text(
            "services:\n"
            f"  stub: {{url: 'http://127.0.0.1:{self.ports['stub']}', timeout: {{connect: 2, read: 30}}}}\n"
            f"  intelligence-engine: {{url: 'http://127.0.0.1:{self.ports['chat']}', timeout: {{connect: 2, read: 30}}}}\n"
            "routes:\n"
            f"  - {{prefix: /api/v1/clusters, service: stub, {limits}}}\n"
            f"  - {{prefix: /api/v1/stream, service: stub, {limits}}}\n"
            f"  - {{prefix: /api/v1/chat, service: intelligence-engine, {limits}}}\n"
        )
        env = self.gateway_env()
        check = subprocess.run(
            [sys.executable, "-m", "gateway", "check-config"], cwd=ROOT, env=env, capture_output=True
        )
        if check.returncode:
            raise BenchError("gateway check-config failed:\n" + (check.stdout + check.stderr).decode())
        self.gateway = self.procs.start(
            "gateway", [*self.pin(PROXY_CPU), sys.executable, "-m", "gateway"],
            cwd=ROOT, env=env, stderr=open(self.tmp / "gateway.log", "wb"),
        )  # fmt: skip
        wait_http(self.ports["gateway"], "/health/ready", self.gateway, "gateway")

    def gateway_env(self) -> dict[str, str]:
        return self.env(
            GATEWAY_HOST="127.0.0.1",
            GATEWAY_PORT=str(self.ports["gateway"]),
            GATEWAY_CONFIG=str(self.tmp / "gateway.yaml"),
            GATEWAY_WORKERS="1",
            GATEWAY_SHUTDOWN_TIMEOUT="5",
            RATE_LIMIT_DEFAULT=HUGE_RATE,
            AUTH_JWT_SECRET=self.secret,
        )

    def sample(self) -> dict[str, Any]:
        assert self.gateway is not None
        if self.gateway.poll() is not None:
            raise BenchError(f"the gateway exited with code {self.gateway.returncode}")
        return gateway_sample(self.gateway.pid, self.ports)

    # -- load -----------------------------------------------------------------------------------

    async def load(self) -> None:
        args = self.args
        loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=args.connections, limit_per_host=args.connections)
        timeout = aiohttp.ClientTimeout(total=60, sock_connect=5, sock_read=30)
        series: list[dict[str, Any]] = []
        self.result["series"] = series
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{self.ports['gateway']}", connector=connector, timeout=timeout
        ) as http:
            self.workers = [Worker(self, i, http, self.stats) for i in range(args.connections)]
            self.stats.t0 = start = loop.time()
            deadline = start + args.duration
            tasks = [asyncio.ensure_future(w.run(deadline, args.sse_every)) for w in self.workers]
            done = asyncio.ensure_future(asyncio.gather(*tasks))
            next_log = start + 10
            while not done.done():
                await asyncio.wait([done], timeout=1.0)
                now = loop.time()
                s = self.sample()
                s["t"] = round(now - start, 1)
                s["requests"] = sum(self.stats.windows["overall"].requests.values())
                s["errors"] = len(self.stats.errors)
                series.append(s)
                if now >= next_log:
                    next_log += 10
                    log(
                        f"t={s['t']:.0f}s requests {s['requests']} errors {s['errors']} "
                        f"gateway RSS {s['rss_kib'] / 1024:.1f} MiB fds {s['fds']['total']}"
                    )
            done.result()
            self.result["load_seconds"] = loop.time() - start
            self.result["end_of_load"] = self.sample()
        self.load_ended = time.monotonic()
        log(f"load done in {self.result['load_seconds']:.1f}s; waiting for the gateway to go idle")

    async def wait_idle(self) -> None:
        """Poll until fds and RSS stop moving (three equal readings), at most --idle-timeout s."""
        await asyncio.sleep(1.0)
        deadline = time.monotonic() + self.args.idle_timeout
        readings: list[dict[str, Any]] = [self.sample()]
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            readings.append(self.sample())
            last = readings[-3:]
            if (
                len(last) == 3
                and len({json.dumps(r["fds"], sort_keys=True) for r in last}) == 1
                and (max(r["rss_kib"] for r in last) - min(r["rss_kib"] for r in last) < 256)
            ):
                break
        self.result["idle"] = {**readings[-1], "stable": len(readings) >= 3, "polls": len(readings)}
        # The gateway's idle keep-alive pool (gateway/pool.py) keeps sockets at most 15 s; look
        # again once that has passed, without sending anything (informational, not an invariant).
        wait = POOL_IDLE_TIMEOUT + 1 - (time.monotonic() - self.load_ended)
        if wait > 0:
            await asyncio.sleep(wait)
        self.result["idle_after_pool_timeout"] = {
            **self.sample(),
            "seconds_idle": round(time.monotonic() - self.load_ended, 1),
        }

    async def verify(self) -> None:
        """Every acknowledged message of every worker, read back through the gateway, in order."""
        report: dict[str, Any] = {
            "sessions": 0, "messages_expected": 0, "messages_read": 0, "missing": 0, "unexpected": 0,
            "duplicates": 0, "out_of_order": 0, "field_mismatch": 0, "uncertain_writes": 0,
            "page_errors": [], "pages": 0, "problems": [],
        }  # fmt: skip
        sem = asyncio.Semaphore(16)
        connector = aiohttp.TCPConnector(limit=16)
        async with aiohttp.ClientSession(
            f"http://127.0.0.1:{self.ports['gateway']}", connector=connector,
            timeout=aiohttp.ClientTimeout(total=60),
        ) as http:  # fmt: skip

            async def one(worker: Worker) -> None:
                if worker.session_id is None:
                    if worker.acked:
                        report["problems"].append(f"worker {worker.idx}: messages but no session")
                    return
                report["sessions"] += 1
                read: list[dict[str, Any]] = []
                after: str | None = None
                async with sem:
                    while True:
                        query = "limit=100" + (f"&after={after}" if after else "")
                        path = f"/api/v1/chat/sessions/{worker.session_id}/messages?{query}"
                        try:
                            async with http.get(path, headers=worker.auth) as resp:
                                page = await resp.json() if resp.status == 200 else None
                                status = resp.status
                        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                            page, status = None, repr(exc)
                        report["pages"] += 1
                        if page is None:
                            report["page_errors"].append(f"worker {worker.idx}: {status}")
                            return
                        read.extend(page["data"])
                        if not page["has_more"]:
                            if page.get("next") is not None:
                                report["problems"].append(f"worker {worker.idx}: next set on the last page")
                            break
                        after = page["next"]
                        if not after:
                            report["problems"].append(f"worker {worker.idx}: has_more without next")
                            break
                ids = [m["id"] for m in read]
                report["messages_read"] += len(ids)
                report["duplicates"] += len(ids) - len(set(ids))
                expected = [m["id"] for m in worker.acked]
                report["messages_expected"] += len(expected)
                report["uncertain_writes"] += len(worker.uncertain)
                got = [i for i in ids if i not in worker.uncertain]
                report["missing"] += len(set(expected) - set(got))
                report["unexpected"] += len(set(got) - set(expected))
                if [i for i in got if i in set(expected)] != [i for i in expected if i in set(got)]:
                    report["out_of_order"] += 1
                sent = {m["id"]: m for m in worker.acked}
                for message in read:
                    body = sent.get(message["id"])
                    if body is not None and any(message.get(k) != v for k, v in body.items()):
                        report["field_mismatch"] += 1

            await asyncio.gather(*(one(w) for w in self.workers))
        self.result["verify"] = report

    # -- teardown and logs ----------------------------------------------------------------------

    def stop_gateway(self) -> None:
        if self.gateway is None:
            return
        started = time.monotonic()
        code = self.gateway.poll()
        if code is None:
            os.kill(self.gateway.pid, signal.SIGTERM)
            try:
                code = self.gateway.wait(15)
            except subprocess.TimeoutExpired:
                code = None
        self.result["gateway_exit"] = {"code": code, "seconds": round(time.monotonic() - started, 2)}
        self.procs.stop(self.gateway)
        self.gateway = None

    def scan_logs(self) -> None:
        wanted = {e.request_id for e in self.stats.errors if e.request_id}
        access: dict[str, dict[str, Any]] = {}
        statuses: Counter = Counter()
        levels: Counter = Counter()
        messages: Counter = Counter()
        examples: dict[str, dict[str, Any]] = {}
        drain: dict[str, str] = {}
        tracebacks: list[str] = []
        lines = 0
        with open(self.tmp / "gateway.log", "rb") as fh:
            for raw in fh:
                lines += 1
                line = raw.decode(errors="replace")
                if "Traceback" in line:
                    tracebacks.append(line[:2000])
                try:
                    entry = json.loads(line)
                except ValueError:
                    levels["(not JSON)"] += 1
                    continue
                if entry.get("msg") in ("draining", "stopped"):
                    drain[entry["msg"]] = entry.get("ts")
                if entry.get("msg") == "request":
                    statuses[entry.get("status")] += 1
                    if entry.get("request_id") in wanted:
                        access[entry["request_id"]] = entry
                else:
                    levels[entry.get("level")] += 1
                    if entry.get("level") in ("warning", "error", "critical"):
                        key = f"{entry.get('level')}: {entry.get('msg')}"
                        messages[key] += 1
                        examples.setdefault(key, entry)
        # The chat API's error bodies look like the gateway's: the access log says whether the
        # gateway got as far as an upstream target for that request.
        for event in self.stats.errors:
            if event.kind == "chat?":
                entry = access.get(event.request_id)
                event.kind = "gateway" if entry is None or entry.get("upstream") is None else "upstream"
        others = {}
        for name in ("intelligence", "stub"):
            text = (self.tmp / f"{name}.log").read_text(errors="replace")
            others[name] = {"tracebacks": text.count("Traceback"), "bytes": len(text)}
            if "Traceback" in text:
                i = text.index("Traceback")
                others[name]["first"] = text[max(0, i - 300) : i + 1500]
        self.result["logs"] = {
            "gateway": {
                "lines": lines, "access_lines": sum(statuses.values()),
                "access_statuses": {str(k): v for k, v in sorted(statuses.items(), key=str)},
                "levels": dict(levels), "warnings": dict(messages.most_common(10)),
                "warning_examples": {k: examples[k] for k, _ in messages.most_common(10)},
                "drain": drain, "tracebacks": len(tracebacks),
                "first_traceback": tracebacks[0] if tracebacks else None,
            },
            **others,
        }  # fmt: skip

    def cleanup(self) -> None:
        self.procs.stop_all()
        if self.db_created:
            try:
                self.admin_sql(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')
                self.db_created = False
            except Exception as exc:
                log(f"could not drop database {self.db}: {exc}")
        try:
            import redis  # the gateway's own client library

            client = redis.Redis.from_url(self.args.redis_url)
            deleted = 0
            for pattern in (f"{self.cache_prefix}*", f"{LIMITER_PREFIX}sub:{self.subject_prefix}*"):
                keys = list(client.scan_iter(match=pattern, count=1000))
                for i in range(0, len(keys), 500):
                    deleted += client.delete(*keys[i : i + 500])
            client.close()
            self.result["redis_keys_deleted"] = deleted
        except Exception as exc:
            log(f"could not delete the run's Redis keys: {exc}")

    # -- the whole run --------------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        time.sleep(1.0)
        self.result["start"] = self.sample()
        log(
            f"gateway pid {self.gateway.pid if self.gateway else '?'} ready; "
            f"{self.args.connections} connections for {self.args.duration:g}s"
        )
        asyncio.run(self._async_part())
        self.stop_gateway()
        self.scan_logs()

    async def _async_part(self) -> None:
        await self.load()
        await self.wait_idle()
        log("reading every chat message back through the gateway")
        await self.verify()


# -- report -------------------------------------------------------------------------------------


def evaluate(soak: Soak) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-window figures and the invariants (name, ok, value, bound)."""
    stats, r, args = soak.stats, soak.result, soak.args
    windows = {}
    for name, w in stats.windows.items():
        seconds = stats.window if name != "overall" else r.get("load_seconds") or args.duration
        lat = array("d")
        for op, values in w.latencies.items():
            if op != "sse":  # a stream's figure is its time to first event, not a request latency
                lat.extend(values)
        if name == "overall":
            errs = stats.errors
        elif name == "first":
            errs = [e for e in stats.errors if e.t < stats.window]
        else:
            errs = [e for e in stats.errors if e.t >= stats.duration - stats.window]
        by_kind = Counter(e.kind for e in errs)
        total = sum(w.requests.values())
        windows[name] = {
            "seconds": round(seconds, 1), "requests": total, "rps": total / seconds if seconds else None,
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "errors": dict(by_kind),
            "by_op": {
                op: {"requests": n, "p50_ms": percentile(w.latencies[op], 50),
                     "p99_ms": percentile(w.latencies[op], 99)}
                for op, n in sorted(w.requests.items())
            },
        }  # fmt: skip

    inv: list[dict[str, Any]] = []

    def check(name: str, ok: bool, value: Any, bound: str) -> None:
        inv.append({"name": name, "ok": bool(ok), "value": value, "bound": bound})

    kinds = Counter(e.kind for e in stats.errors)
    check("gateway-made errors", kinds["gateway"] == 0, kinds["gateway"], "0")
    check("connection errors", kinds["connection"] == 0, kinds["connection"], "0")
    check("SSE streams cut, out of order or buffered", kinds["sse"] == 0, kinds["sse"], "0")
    check("wrong bodies / mixed-up identities", kinds["mismatch"] == 0, kinds["mismatch"], "0")
    check(
        "upstream errors",
        kinds["upstream"] == 0,
        kinds["upstream"],
        "0 (the stub and chat API never fail here)",
    )

    v = r.get("verify", {})
    bad = {k: v.get(k, 0) for k in ("missing", "unexpected", "duplicates", "out_of_order", "field_mismatch")}
    bad["page_errors"] = len(v.get("page_errors", []))
    bad["problems"] = len(v.get("problems", []))
    check(
        "chat messages read back (ids, order, fields, paging)",
        v and not any(bad.values()),
        f"{v.get('messages_read', 0)}/{v.get('messages_expected', 0)} read in {v.get('sessions', 0)} sessions"
        + ("; " + ", ".join(f"{k} {n}" for k, n in bad.items() if n) if any(bad.values()) else ""),
        "every acknowledged message, in write order, nothing else",
    )

    series = r.get("series", [])
    warm = next((s for s in series if s["t"] >= stats.window), series[0] if series else None)
    end = r.get("end_of_load")
    if warm and end:
        growth = (end["rss_kib"] - warm["rss_kib"]) / 1024
        check(
            "gateway RSS growth after warm-up",
            growth <= args.rss_growth_mib,
            f"{growth:+.1f} MiB ({warm['rss_kib'] / 1024:.1f} at t={warm['t']:.0f}s -> {end['rss_kib'] / 1024:.1f} MiB)",
            f"<= {args.rss_growth_mib:g} MiB",
        )
    start, idle = r.get("start"), r.get("idle")
    if start and idle:
        sf, idf = start["fds"], idle["fds"]
        pooled = sum(n for k, n in idf.items() if k in ("to_stub", "to_chat"))
        redis_conns = idf.get("to_redis", 0) - sf.get("to_redis", 0)
        rest = idf["total"] - pooled - max(0, redis_conns)
        ok = (
            idf.get("client_conns", 0) == 0
            and rest <= sf["total"]
            and idf.get("to_stub", 0) <= POOL_MAX_IDLE
            and idf.get("to_chat", 0) <= POOL_MAX_IDLE
            and redis_conns <= args.connections
        )
        check(
            "gateway fds back to baseline when idle",
            ok,
            f"{idf['total']} open (start {sf['total']}): {idf.get('client_conns', 0)} client conns, "
            f"{pooled} pooled upstream, {max(0, redis_conns)} more to Redis -> {rest} others",
            f"0 client conns, others <= {sf['total']}, pooled <= {POOL_MAX_IDLE}/target, Redis <= {args.connections}",
        )
        check(
            "gateway went idle (fds/RSS stable)",
            idle.get("stable"),
            f"{idle.get('polls')} polls",
            "3 equal readings",
        )
    logs = r.get("logs", {}).get("gateway", {})
    check("tracebacks in the gateway log", logs.get("tracebacks", 1) == 0, logs.get("tracebacks"), "0")
    ex = r.get("gateway_exit", {})
    drain = logs.get("drain", {})
    logged = ""
    if "draining" in drain and "stopped" in drain:
        a, b = (datetime.fromisoformat(drain[k].replace("Z", "+00:00")) for k in ("draining", "stopped"))
        logged = f" ('draining' to 'stopped' in the log: {(b - a).total_seconds():.2f}s)"
    check(
        "gateway drained and exited on SIGTERM",
        ex.get("code") == 0,
        f"exit {ex.get('code')} after {ex.get('seconds')}s{logged}",
        "exit 0 within 15 s",
    )
    return windows, inv


def report(soak: Soak, windows: dict[str, Any], inv: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines: list[str] = []
    add = lines.append
    r = soak.result
    add(
        f"gateway soak {meta['time']}  {meta['duration_s']:g}s x {meta['connections']} connections  "
        f"load before: {meta['loadavg_before']}  after: {meta.get('loadavg_after', '-')}"
    )
    add(
        f"pinning: {'gateway on CPU ' + PROXY_CPU + ', load + stub + chat API on CPU ' + LOAD_CPU if meta['pinned'] else 'none'}; "
        f"mix {', '.join(f'{op} {w:.0%}' for op, w in MIX)}, one {SSE_EVENTS}x{SSE_MS}ms SSE stream per worker every {soak.args.sse_every:g}s"
    )
    add("")
    add(f"{'window':<20} {'requests':>9} {'req/s':>8} {'p50':>8} {'p99':>8}  errors")
    for name in ("first", "last", "overall"):
        w = windows[name]
        label = {
            "first": f"first {w['seconds']:.0f}s",
            "last": f"last {w['seconds']:.0f}s",
            "overall": "overall",
        }[name]
        errs = ", ".join(f"{k} {n}" for k, n in sorted(w["errors"].items())) or "0"
        rps = f"{w['rps']:.0f}" if w["rps"] is not None else "-"
        add(
            f"{label:<20} {w['requests']:>9} {rps:>8} {fmt_ms(w['p50_ms']):>8} {fmt_ms(w['p99_ms']):>8}  {errs}"
        )
    add("  (p50/p99 over every request but SSE streams; SSE row below: time to first event)")
    add("")
    add(f"{'operation':<20} {'requests':>9} {'p50':>8} {'p99':>8}  errors")
    by_op_errors = Counter((e.op, e.kind) for e in soak.stats.errors)
    for op, o in windows["overall"]["by_op"].items():
        errs = ", ".join(f"{k} {n}" for (eop, k), n in sorted(by_op_errors.items()) if eop == op) or "0"
        add(f"{op:<20} {o['requests']:>9} {fmt_ms(o['p50_ms']):>8} {fmt_ms(o['p99_ms']):>8}  {errs}")
    add("")

    def mem(label: str, s: dict[str, Any] | None) -> None:
        if not s:
            return
        f = s["fds"]
        parts = ", ".join(f"{k} {n}" for k, n in sorted(f.items()) if k != "total")
        add(f"  {label:<16} RSS {s['rss_kib'] / 1024:7.1f} MiB   fds {f['total']:>4} ({parts})")

    add("gateway process")
    mem("start", r.get("start"))
    series = r.get("series", [])
    warm = next((s for s in series if s["t"] >= soak.stats.window), None)
    mem(f"after {soak.stats.window:.0f}s", warm)
    mem("end of load", r.get("end_of_load"))
    mem("idle", r.get("idle"))
    later = r.get("idle_after_pool_timeout")
    mem(f"idle {later['seconds_idle']:.0f}s" if later else "", later)
    if r.get("start") and r.get("end_of_load") and r.get("load_seconds"):
        busy = r["end_of_load"]["cpu_s"] - r["start"]["cpu_s"]
        add(f"  CPU during load {busy:.1f}s = {busy / r['load_seconds']:.0%} of one core")
    if series:
        add(f"  peak RSS during load {max(s['rss_kib'] for s in series) / 1024:.1f} MiB, "
            f"peak fds {max(s['fds']['total'] for s in series)}")  # fmt: skip
    logs = r.get("logs", {})
    g = logs.get("gateway", {})
    if g:
        add(
            f"  log: {g['lines']} lines, {g['access_lines']} access lines, statuses {g['access_statuses']}, "
            f"{g['tracebacks']} tracebacks"
        )
        for msg, n in g.get("warnings", {}).items():
            first = g["warning_examples"][msg]
            extra = {k: v for k, v in first.items() if k not in ("level", "logger", "msg", "exc")}
            add(f"    {n:>6} x {msg}  (first: {json.dumps(extra, default=str)[:300]})")
    for name in ("intelligence", "stub"):
        if logs.get(name, {}).get("tracebacks"):
            add(f"  !! {name} log: {logs[name]['tracebacks']} tracebacks (see the JSON)")
    add("")
    samples = soak.stats.errors[:10]
    if samples:
        add(f"first errors ({len(soak.stats.errors)} in all):")
        for e in samples:
            add(f"  t={e.t:6.1f}s {e.op:<13} {e.kind:<10} {e.detail}  [{e.request_id}]")
        add("")
    add("invariants")
    for i in inv:
        add(f"  {'ok' if i['ok'] else '!! FAIL'}  {i['name']}: {i['value']}  (bound: {i['bound']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=300, help="seconds of load (default 300)")
    parser.add_argument("--connections", type=int, default=128, help="concurrent workers (default 128)")
    parser.add_argument(
        "--window", type=float, default=30, help="first/last window, s (default 30; at most duration/3)"
    )
    parser.add_argument(
        "--sse-every", type=float, default=30, help="seconds between one worker's SSE streams"
    )
    parser.add_argument(
        "--rss-growth-mib", type=float, default=32, help="allowed RSS growth after the first window"
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=20, help="longest wait for the gateway to go idle, s"
    )
    parser.add_argument(
        "--postgres-url", default="postgresql://postgres@127.0.0.1:5432", help="server, no db"
    )
    parser.add_argument("--postgres-admin-db", default="test", help="database to connect to for CREATE/DROP")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin processes to CPUs")
    parser.add_argument("--seed", type=int, default=1, help="seed of the workload's choices")
    parser.add_argument(
        "--keep-tmp", action="store_true", help="keep configs and logs (kept anyway on failure)"
    )
    args = parser.parse_args(argv)
    if args.duration < 3 or args.connections < 1:
        parser.error("--duration must be at least 3 and --connections at least 1")
    if args.pin and (len(os.sched_getaffinity(0)) < 2 or not os.access(TASKSET, os.X_OK)):
        parser.error("pinning needs 2 CPUs and taskset; use --no-pin")
    try:
        require_loopback(args.postgres_url, "--postgres-url")
        require_loopback(args.redis_url, "--redis-url")
    except BenchError as exc:
        parser.error(str(exc))

    meta: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "duration_s": args.duration,
        "connections": args.connections, "pinned": args.pin, "seed": args.seed,
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "git_commit": git_commit(), "python": platform.python_version(), "aiohttp": aiohttp.__version__,
        "mix": dict(MIX), "sse": {"events": SSE_EVENTS, "interval_ms": SSE_MS, "every_s": args.sse_every},
        "rate_limits": f"{HUGE_RATE} per route (Redis-backed), one subject per worker",
    }  # fmt: skip
    if args.pin:
        os.sched_setaffinity(0, {int(LOAD_CPU)})  # the load side; the gateway gets the other CPU
    soak = Soak(args)
    meta["run_id"] = soak.run_id

    stop_on_sigterm()
    status, failure = 0, None
    try:
        soak.run()
    except BenchError as exc:
        failure, status = str(exc), 1
    except KeyboardInterrupt:
        failure, status = "interrupted", 130
    except Exception:
        failure, status = "unexpected error:\n" + traceback.format_exc(), 1
    finally:
        soak.cleanup()
    if failure:
        log(f"FAILED: {failure}")

    windows, inv = evaluate(soak)
    meta["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["completed"] = failure is None
    print(report(soak, windows, inv, meta))
    failed = [i["name"] for i in inv if not i["ok"]]
    if failure:
        print(f"\n!! the run did not finish: {failure.splitlines()[0]}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    errors = [asdict(e) for e in soak.stats.errors[:1000]]
    result = {k: v for k, v in soak.result.items()}
    path.write_text(
        json.dumps(
            {"meta": meta, "windows": windows, "invariants": inv, "errors_first_1000": errors, **result},
            indent=2, default=str,
        )
    )  # fmt: skip
    print(f"\nwrote {path.relative_to(ROOT)}")
    if failed or failure:
        status = status or 1
        print(f"!! FAILED: {', '.join(failed) or 'the run did not finish'}")
        print(f"   logs kept in {soak.tmp} (gateway.log, intelligence.log, stub.log)")
    elif not args.keep_tmp:
        shutil.rmtree(soak.tmp, ignore_errors=True)
    else:
        print(f"kept {soak.tmp}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
