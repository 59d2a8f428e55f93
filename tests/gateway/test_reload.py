"""Configuration reload without downtime: in process through ``reload_routes``, and with real
signals against ``python -m gateway`` (one process, and GATEWAY_WORKERS=2, whose supervisor also
replaces a worker that dies while serving)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.keys import route_table_key
from gateway.reload import reload_routes
from gateway.settings import load_settings
from tests.conftest import REDIS_URL
from tests.gateway.chain import AUTH_ENV
from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]


def table(routes: dict[str, str]) -> dict[str, Any]:
    """``{prefix: upstream url}``: one service per route, named after it."""
    services = {f"s{i}": {"url": url} for i, url in enumerate(routes.values())}
    return {
        "services": services,
        "routes": [
            {"prefix": prefix, "service": f"s{i}", "auth": "none", "content_types": ["*/*"]}
            for i, prefix in enumerate(routes)
        ],
    }


class Gate:
    """An upstream handler that holds requests to ``/slow`` until released."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handler(self, request: web.Request) -> web.Response:
        if request.path.endswith("/slow"):
            self.arrived.set()
            await self.release.wait()
        return web.json_response({"upstream": self.name})


@pytest.fixture
async def named_upstream(aiohttp_server: Any) -> AsyncIterator[Callable[..., Any]]:
    gates: list[Gate] = []

    async def make(name: str) -> tuple[str, Gate]:
        gate = Gate(name)
        gates.append(gate)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", gate.handler)
        server = await aiohttp_server(app)
        return f"http://127.0.0.1:{server.port}", gate

    yield make
    for gate in gates:
        gate.release.set()


async def served_by(client: Any, path: str) -> tuple[int, str | None]:
    response = await client.get(path)
    body = await response.json()
    return response.status, body.get("upstream")


async def test_valid_file_applies_to_new_requests_while_in_flight_ones_finish(
    aiohttp_client: Any, named_upstream: Any, tmp_path: Path
) -> None:
    old_url, old_gate = await named_upstream("old")
    new_url, _ = await named_upstream("new")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(table({"/a": old_url})))
    env = {"GATEWAY_CONFIG": str(path)}
    client = await aiohttp_client(TestServer(create_app(load_settings(env))))
    live = client.app[route_table_key]
    old_upstream = live.current.upstreams["s0"]

    in_flight = asyncio.ensure_future(client.get("/a/slow"))
    await asyncio.wait_for(old_gate.arrived.wait(), 5)

    path.write_text(yaml.safe_dump(table({"/b": new_url})))
    assert await reload_routes(client.app, env) is True
    assert await served_by(client, "/b/x") == (200, "new")
    assert (await client.get("/a/x")).status == 404
    assert old_upstream.targets[0].pool.retired

    old_gate.release.set()
    response = await in_flight
    assert response.status == 200
    assert (await response.json())["upstream"] == "old"
    # The old pool keeps nothing: the connection was closed when its response ended.
    assert not old_upstream.targets[0].pool._idle


async def test_an_unchanged_service_keeps_its_upstream(
    aiohttp_client: Any, named_upstream: Any, tmp_path: Path
) -> None:
    url, _ = await named_upstream("kept")
    other, _ = await named_upstream("other")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(table({"/a": url})))
    env = {"GATEWAY_CONFIG": str(path)}
    client = await aiohttp_client(TestServer(create_app(load_settings(env))))
    assert await served_by(client, "/a/x") == (200, "kept")
    before = client.app[route_table_key].current.upstreams["s0"]
    path.write_text(yaml.safe_dump(table({"/a": url, "/z": other})))
    assert await reload_routes(client.app, env)
    current = client.app[route_table_key].current
    assert current.upstreams["s0"] is before and not before.targets[0].pool.retired
    assert await served_by(client, "/a/x") == (200, "kept")
    assert await served_by(client, "/z/x") == (200, "other")


async def test_two_reloads_in_quick_succession_leave_the_later_file_in_force(
    aiohttp_client: Any, named_upstream: Any, tmp_path: Path
) -> None:
    first_url, _ = await named_upstream("first")
    second_url, _ = await named_upstream("second")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(table({"/a": first_url})))
    client = await aiohttp_client(TestServer(create_app(load_settings({"GATEWAY_CONFIG": str(path)}))))
    # The first reload reads a pipe, so its read is still going on when the second one starts,
    # as when a file on a slow volume changes between two SIGHUPs.
    pipe = tmp_path / "slow.yaml"
    os.mkfifo(pipe)
    written = threading.Event()

    def write_pipe() -> None:
        if written.is_set():
            return
        written.set()
        with pipe.open("w") as writer:
            writer.write(yaml.safe_dump(table({"/a": first_url})))

    # A reload that read its file on the event loop would stop the loop in that read, and this
    # test with it, for good: a thread feeds the pipe after 10 s at the latest, so it fails instead.
    fallback = threading.Timer(10, write_pipe)
    fallback.daemon = True
    fallback.start()
    first = asyncio.ensure_future(reload_routes(client.app, {"GATEWAY_CONFIG": str(pipe)}))
    later = tmp_path / "later.yaml"
    later.write_text(yaml.safe_dump(table({"/a": second_url})))
    second = asyncio.ensure_future(reload_routes(client.app, {"GATEWAY_CONFIG": str(later)}))
    went_ahead, _ = await asyncio.wait([second], timeout=0.2)
    await asyncio.get_running_loop().run_in_executor(None, write_pipe)
    fallback.cancel()
    assert await asyncio.wait_for(first, 5) is True
    assert await asyncio.wait_for(second, 5) is True
    assert not went_ahead, "the second reload went ahead while the first was still reading its file"
    assert await served_by(client, "/a/x") == (200, "second")


async def test_a_changed_rate_limit_applies_after_the_reload(
    aiohttp_client: Any, named_upstream: Any, tmp_path: Path
) -> None:
    url, _ = await named_upstream("limited")
    path = tmp_path / "gateway.yaml"
    config = table({"/a": url})
    config["routes"][0]["rate_limit"] = "1000/minute"
    path.write_text(yaml.safe_dump(config))
    env = {"GATEWAY_CONFIG": str(path)}
    client = await aiohttp_client(TestServer(create_app(load_settings(env))))
    response = await client.get("/a/x")
    assert response.status == 200
    assert response.headers["X-RateLimit-Limit"] == "1000"

    config["routes"][0]["rate_limit"] = "2/minute"
    path.write_text(yaml.safe_dump(config))
    assert await reload_routes(client.app, env)

    # A changed limit starts fresh buckets, lowered as well as raised: the client gets the new
    # limit's burst once (what it used under 1000/minute is not converted), then the new limit.
    statuses = [(await client.get("/a/x")).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    response = await client.get("/a/x")
    assert response.headers["X-RateLimit-Limit"] == "2"
    assert response.headers["RateLimit-Policy"] == '"route";q=2;w=60'


@pytest.fixture(params=["memory", "redis"])
async def limit_store(
    request: pytest.FixtureRequest, redis_client: Any
) -> AsyncIterator[tuple[dict[str, str], str]]:
    """Environment for the rate-limit store, and a tag for route prefixes no other test uses; the
    tag's buckets in the shared Redis are removed afterwards."""
    tag = uuid.uuid4().hex
    yield ({"REDIS_URL": REDIS_URL} if request.param == "redis" else {}), tag
    keys = [key async for key in redis_client.scan_iter(match=f"gateway:rl:*{tag}*")]
    if keys:
        await redis_client.delete(*keys)


async def test_a_raised_rate_limit_applies_at_once_and_an_unchanged_one_keeps_its_buckets(
    aiohttp_client: Any, named_upstream: Any, tmp_path: Path, limit_store: tuple[dict[str, str], str]
) -> None:
    store_env, tag = limit_store
    raised, kept = f"/raised-{tag}", f"/kept-{tag}"
    url, _ = await named_upstream("limited")
    path = tmp_path / "gateway.yaml"
    config = table({raised: url, kept: url})
    for route in config["routes"]:
        route["rate_limit"] = "2/minute"
    path.write_text(yaml.safe_dump(config))
    env = {"GATEWAY_CONFIG": str(path), **store_env}
    client = await aiohttp_client(TestServer(create_app(load_settings(env))))
    for prefix in (raised, kept):
        assert [(await client.get(prefix + "/x")).status for _ in range(3)] == [200, 200, 429]

    config["routes"][0]["rate_limit"] = "1000/second"
    config["routes"][1]["rate_limit"] = "2/60seconds"  # the same limit, spelled otherwise
    path.write_text(yaml.safe_dump(config))
    assert await reload_routes(client.app, env)

    response = await client.get(raised + "/x")
    assert response.status == 200
    assert response.headers["RateLimit-Policy"] == '"route";q=1000;w=1'
    assert response.headers["RateLimit"] == '"route";r=999;t=1'
    assert (response.headers["X-RateLimit-Limit"], response.headers["X-RateLimit-Remaining"]) == (
        "1000",
        "999",
    )
    assert response.headers["X-RateLimit-Reset"] == "1"
    assert "Retry-After" not in response.headers
    # A reload is no way out of a limit that did not change.
    response = await client.get(kept + "/x")
    assert response.status == 429
    assert response.headers["RateLimit-Policy"] == '"route";q=2;w=60'
    assert 1 <= int(response.headers["Retry-After"]) <= 30


async def test_a_raised_rate_limit_lifts_the_refusal_of_an_address_sending_bad_tokens(
    aiohttp_client: Any, named_upstream: Any, tmp_path: Path
) -> None:
    url, _ = await named_upstream("limited")
    path = tmp_path / "gateway.yaml"
    config = table({"/a": url})
    config["routes"][0].update(auth="required", rate_limit="2/minute")
    path.write_text(yaml.safe_dump(config))
    env = {"GATEWAY_CONFIG": str(path), **AUTH_ENV}
    client = await aiohttp_client(TestServer(create_app(load_settings(env))))
    bad = {"Authorization": "Bearer not-a-token"}
    # The third is one too many: the address is then refused before its tokens are verified.
    assert [(await client.get("/a/x", headers=bad)).status for _ in range(4)] == [401, 401, 429, 429]

    config["routes"][0]["rate_limit"] = "1000/second"
    path.write_text(yaml.safe_dump(config))
    assert await reload_routes(client.app, env)

    response = await client.get("/a/x", headers=bad)
    assert response.status == 401  # verified again, and charged under the new limit
    assert response.headers["RateLimit-Policy"] == '"route";q=1000;w=1'
    assert response.headers["X-RateLimit-Remaining"] == "999"


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("routes: [unclosed", "not valid YAML"),
        (yaml.safe_dump({"services": {}, "routes": [{"prefix": "/a", "service": "nope"}]}), "nope"),
        (b"\xff\xfe\x00bad", "not UTF-8 at byte 0"),
        ("routes: [{prefix: /caf\xe9}]\n".encode("latin-1"), "not UTF-8 at byte 22 (line 1)"),
    ],
)
async def test_invalid_file_is_rejected_and_the_old_table_stays(
    aiohttp_client: Any,
    named_upstream: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    content: str | bytes,
    problem: str,
) -> None:
    url, _ = await named_upstream("old")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(table({"/a": url})))
    env = {"GATEWAY_CONFIG": str(path)}
    client = await aiohttp_client(TestServer(create_app(load_settings(env))))
    before = client.app[route_table_key].current

    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level(logging.ERROR, logger="gateway.reload"):
        assert await reload_routes(client.app, env) is False
    (record,) = [r for r in caplog.records if r.name == "gateway.reload"]
    assert "reload rejected" in record.getMessage()
    assert problem in record.error  # type: ignore[attr-defined]
    assert client.app[route_table_key].current is before
    assert await served_by(client, "/a/x") == (200, "old")
    metrics = await (await client.get("/metrics")).text()
    (family,) = [f for f in text_string_to_metric_families(metrics) if f.name == "gateway_config_reloads"]
    assert {s.labels["result"]: s.value for s in family.samples if s.name.endswith("_total")} == {
        "rejected": 1.0
    }


async def test_an_unexpected_error_while_reloading_is_logged_and_the_old_table_stays(
    aiohttp_client: Any,
    named_upstream: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, _ = await named_upstream("old")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(table({"/a": url})))
    env = {"GATEWAY_CONFIG": str(path)}
    client = await aiohttp_client(TestServer(create_app(load_settings(env))))
    before = client.app[route_table_key].current

    def broken(environ: Any) -> None:
        raise RuntimeError("a bug in the settings code")

    monkeypatch.setattr("gateway.reload.load_settings", broken)
    with caplog.at_level(logging.ERROR, logger="gateway.reload"):
        assert await reload_routes(client.app, env) is False
    (record,) = [r for r in caplog.records if r.name == "gateway.reload"]
    assert "reload rejected" in record.getMessage() and record.exc_info is not None
    assert client.app[route_table_key].current is before
    assert await served_by(client, "/a/x") == (200, "old")


# -- the real process and real signals ---------------------------------------------------------


class Gateway:
    """``python -m gateway`` on a free port, logging JSON to a file."""

    def __init__(self, tmp: Path, config: Path, **env: str) -> None:
        self.port = free_port()
        self.log = tmp / "gateway.log"
        environ = {
            k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "SERVICE_", "REDIS_"))
        }
        environ.update(
            GATEWAY_CONFIG=str(config), GATEWAY_PORT=str(self.port), PYTHONPATH=str(ROOT),
            LOG_FORMAT="json", AUTH_ENABLED="false", GATEWAY_SHUTDOWN_TIMEOUT="5", **env,
        )  # fmt: skip
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway"], cwd=ROOT, env=environ, stdout=log, stderr=log
            )
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logged(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.url + path) as response:
            body = await response.read()
            return response.status, body

    async def ready(self) -> None:
        deadline = time.monotonic() + 15
        while True:
            assert self.process.poll() is None, f"gateway exited:\n{self.log.read_text()}"
            try:
                if (await self.get("/health/ready"))[0] == 200:
                    return
            except aiohttp.ClientConnectionError:
                pass
            assert time.monotonic() < deadline, f"gateway not ready:\n{self.log.read_text()}"
            await asyncio.sleep(0.01)

    async def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        await wait_for(lambda: self.process.poll() is not None, 15, "the gateway to exit")
        await self.session.close()
        return self.process.returncode

    async def worker_pids(self, count: int) -> set[int]:
        """The pids of ``count`` workers, as their answers to /metrics name them."""
        pids: set[int] = set()
        deadline = time.monotonic() + 15
        while len(pids) < count:
            assert time.monotonic() < deadline, f"only saw workers {pids}"
            pids.add((await self.metrics())["pid"])
        return pids

    async def metrics(self) -> dict[str, Any]:
        """pid -> {sample name + labels: value} of the worker that answered."""
        status, body = await self.get("/metrics")
        assert status == 200
        samples = {}
        pid = None
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == "gateway_process_info":
                    pid = int(sample.labels["pid"])
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return {"pid": pid, "samples": samples}


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True


@pytest.fixture
async def gateway_process(tmp_path: Path) -> AsyncIterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(config: Path, **env: str) -> Gateway:
        gateway = Gateway(tmp_path, config, **env)
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.process.kill()
            gateway.process.wait(10)
        if not gateway.session.closed:
            await gateway.session.close()


async def test_sighup_reloads_the_running_gateway(
    gateway_process: Any, named_upstream: Any, tmp_path: Path
) -> None:
    old_url, old_gate = await named_upstream("old")
    new_url, _ = await named_upstream("new")
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(table({"/a": old_url})))
    gateway = gateway_process(config)
    await gateway.ready()

    in_flight = asyncio.ensure_future(gateway.get("/a/slow"))
    await asyncio.wait_for(old_gate.arrived.wait(), 5)
    config.write_text(yaml.safe_dump(table({"/b": new_url})))
    gateway.process.send_signal(signal.SIGHUP)
    await wait_for(lambda: gateway.logged("configuration reloaded"), what="the reload")
    assert (await gateway.get("/b/x")) == (200, b'{"upstream": "new"}')
    assert (await gateway.get("/a/x"))[0] == 404
    old_gate.release.set()
    assert await in_flight == (200, b'{"upstream": "old"}')

    config.write_text("routes: [")
    gateway.process.send_signal(signal.SIGHUP)
    await wait_for(lambda: gateway.logged("reload rejected"), what="the rejection")
    assert (await gateway.get("/b/x")) == (200, b'{"upstream": "new"}')

    config.write_bytes(b"\xff\xfe\x00bad")
    gateway.process.send_signal(signal.SIGHUP)
    await wait_for(lambda: gateway.logged("not UTF-8 at byte 0"), what="the rejection of a non-UTF-8 file")
    assert (await gateway.get("/b/x")) == (200, b'{"upstream": "new"}')
    assert await gateway.stop() == 0
    assert not gateway.logged("Traceback") and not gateway.logged("never retrieved")


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_reload_sent_while_the_gateway_reads_its_file_at_start_is_applied_once_it_serves(
    gateway_process: Any, named_upstream: Any, tmp_path: Path, workers: str
) -> None:
    """The file is a FIFO: the gateway (the supervisor, with workers) waits in its read at start
    until the test writes it, and gets SIGHUP there. It used to die of it (SIGHUP's default
    action); now it starts with what it read and then reloads the file the path names by then."""
    start_url, _ = await named_upstream("at-start")
    reload_url, _ = await named_upstream("reloaded")
    config = tmp_path / "gateway.yaml"
    os.mkfifo(config)
    gateway = gateway_process(config, GATEWAY_WORKERS=workers)
    writer: list[int] = []

    def reading() -> bool:
        assert gateway.process.poll() is None, gateway.log.read_text()
        try:  # a FIFO opens for writing only once a reader has it open
            writer.append(os.open(config, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            return False
        return True

    await wait_for(reading, 15, "the gateway to open its file")
    gateway.process.send_signal(signal.SIGHUP)
    reloaded = tmp_path / "reloaded.yaml"
    reloaded.write_text(yaml.safe_dump(table({"/reloaded": reload_url})))
    os.replace(reloaded, config)  # what the reload reads; the FIFO stays open for the start
    with os.fdopen(writer[0], "wb") as fifo:
        fifo.write(yaml.safe_dump(table({"/at-start": start_url})).encode())

    await gateway.ready()
    await wait_for(lambda: gateway.logged("configuration reloaded"), what="the reload")
    for _ in range(int(workers) * 4):  # every worker, whichever answers
        assert (await gateway.get("/reloaded/x")) == (200, b'{"upstream": "reloaded"}')
    assert await gateway.stop() == 0
    assert not gateway.logged("Traceback")


async def test_two_workers_answer_reload_and_stop_on_sigterm(
    gateway_process: Any, named_upstream: Any, tmp_path: Path
) -> None:
    old_url, _ = await named_upstream("old")
    new_url, _ = await named_upstream("new")
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(table({"/a": old_url})))
    gateway = gateway_process(config, GATEWAY_WORKERS="2")
    await gateway.ready()

    pids = await gateway.worker_pids(2)
    for pid in pids:  # both are the supervisor's children, not strays
        assert parent_of(pid) == gateway.process.pid

    config.write_text(yaml.safe_dump(table({"/b": new_url})))
    gateway.process.send_signal(signal.SIGHUP)  # to the supervisor, which passes it on
    reloaded: set[int] = set()
    deadline = time.monotonic() + 15
    while reloaded != pids:
        assert time.monotonic() < deadline, f"reloaded: {reloaded} of {pids}"
        scraped = await gateway.metrics()
        if scraped["samples"].get(("gateway_config_reloads_total", (("result", "ok"),))) == 1:
            reloaded.add(scraped["pid"])
    for _ in range(10):
        assert (await gateway.get("/b/x")) == (200, b'{"upstream": "new"}')
    assert gateway.process.poll() is None  # SIGHUP did not stop the supervisor

    assert await gateway.stop() == 0
    for pid in pids:
        assert gone(pid)


async def test_a_worker_that_dies_while_serving_is_replaced_with_the_reloaded_routes(
    gateway_process: Any, named_upstream: Any, tmp_path: Path
) -> None:
    url, _ = await named_upstream("kept")
    reloaded_url, _ = await named_upstream("reloaded")
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(table({"/a": url})))
    gateway = gateway_process(config, GATEWAY_WORKERS="2")
    await gateway.ready()
    first = await gateway.worker_pids(2)

    # A reload, then a file the reload would refuse: the replacement must serve the routes in
    # force, neither the start-up ones nor the broken file's.
    config.write_text(yaml.safe_dump(table({"/b": reloaded_url})))
    gateway.process.send_signal(signal.SIGHUP)
    await wait_for(lambda: gateway.log.read_text().count("configuration reloaded") == 2, what="both reloads")
    config.write_text("routes: [")
    gateway.process.send_signal(signal.SIGHUP)
    await wait_for(lambda: gateway.log.read_text().count("reload rejected") == 2, what="both refusals")

    for victim in first:  # both: every answer after this comes from a replacement
        os.kill(victim, signal.SIGKILL)

    replacements: set[int] = set()
    deadline = time.monotonic() + 15
    while len(replacements) < 2:
        assert time.monotonic() < deadline, f"replacements seen: {replacements}\n{gateway.log.read_text()}"
        try:
            pid = (await gateway.metrics())["pid"]
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.02)  # poll interval: no worker listens until the first replacement does
            continue
        assert pid not in first
        replacements.add(pid)
    assert all(parent_of(pid) == gateway.process.pid for pid in replacements)
    assert gateway.logged("worker exited; restarting")
    answers = {await gateway.get("/b/x") for _ in range(12)} | {
        (await gateway.get("/a/x"))[0] for _ in range(12)
    }
    assert answers == {(200, b'{"upstream": "reloaded"}'), 404}
    assert await gateway.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_a_reload_that_comes_while_the_gateway_stops_leaves_its_exit_code_0(
    gateway_process: Any, named_upstream: Any, tmp_path: Path, workers: str
) -> None:
    url, gate = await named_upstream("old")
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(table({"/a": url})))
    gateway = gateway_process(config, GATEWAY_WORKERS=workers)
    await gateway.ready()
    in_flight = asyncio.ensure_future(gateway.get("/a/slow"))
    await asyncio.wait_for(gate.arrived.wait(), 5)

    gateway.process.send_signal(signal.SIGTERM)
    gate.release.set()
    # A reloader (a sidecar watching the ConfigMap) knows nothing of the rollout: its SIGHUPs
    # keep coming until the process is gone, the last ones after its handlers are removed.
    deadline = time.monotonic() + 15
    while gateway.process.poll() is None:
        assert time.monotonic() < deadline, gateway.log.read_text()
        gateway.process.send_signal(signal.SIGHUP)
        await asyncio.sleep(0.002)  # the pace of the reloads, not a wait for anything

    assert await in_flight == (200, b'{"upstream": "old"}')
    assert gateway.process.returncode == 0  # not -1: killed by SIGHUP's default action
    await gateway.stop()


# A supervisor with one worker whose start takes as long as the test says: it serves an empty app
# and marks each reload it takes with a file.
_SLOW_START_WORKER = """
import os, sys, time
from pathlib import Path
from aiohttp import web
from gateway.server import Listener, run, run_workers, serve

out, port = Path(sys.argv[1]), int(sys.argv[2])

def target(ready):
    (out / "forked").write_text(str(os.getpid()))
    while not (out / "go").exists():  # the worker's start (building the app) still going on
        time.sleep(0.01)

    async def reloaded():
        (out / "reloaded").touch()

    listener = Listener(web.Application(), "127.0.0.1", port, "gateway")
    run(serve([listener], shutdown_timeout=1, reuse_port=True, on_started=lambda _: ready(),
              on_hangup=reloaded))

sys.exit(run_workers(1, target))
"""


async def test_a_reload_sent_while_a_worker_starts_reaches_it_once_it_serves(tmp_path: Path) -> None:
    script = tmp_path / "supervisor.py"
    script.write_text(_SLOW_START_WORKER)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), str(tmp_path), str(free_port()), cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        await wait_for(lambda: (tmp_path / "forked").exists(), what="the worker to be forked")
        process.send_signal(signal.SIGHUP)  # the supervisor passes it on to the starting worker
        (tmp_path / "go").touch()
        await wait_for(lambda: (tmp_path / "reloaded").exists(), what="the worker to take the reload")
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# serve() again and again in one process, each stopped by its own SIGTERM as soon as it listens,
# while a child sends it SIGHUP every 100 us: every stop passes the moment the reload handler is
# put away, where a SIGHUP that met the default action ended the process (129). Prints how many
# times it stopped and how many reloads it took.
_RELOADS_WHILE_STOPPING = """
import asyncio, os, signal, sys, time
from aiohttp import web
from gateway.server import Listener, run, serve

loop_name, seconds = sys.argv[1], float(sys.argv[2])
signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the first serve() takes it
parent = os.getpid()
if os.fork() == 0:  # the reloader, until its parent is gone
    while os.getppid() == parent:
        os.kill(parent, signal.SIGHUP)
        pace = time.perf_counter() + 100e-6  # the pace of the reloads, not a wait for anything
        while time.perf_counter() < pace:
            pass
    os._exit(0)

reloads = 0

async def reload():
    global reloads
    reloads += 1

stops = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    main = serve([Listener(web.Application(), "127.0.0.1", 0, "gateway")], shutdown_timeout=1,
                 on_started=lambda _: os.kill(os.getpid(), signal.SIGTERM), on_hangup=reload)
    run(main) if loop_name == "uvloop" else asyncio.run(main)
    stops += 1
print(stops, reloads)
"""


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_a_reload_never_meets_the_default_action_of_sighup_while_the_gateway_stops(
    tmp_path: Path, loop: str
) -> None:
    script = tmp_path / "stops.py"
    script.write_text(_RELOADS_WHILE_STOPPING)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), loop, "1.5", cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(15):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, f"exit {process.returncode} (-1: SIGHUP's default action)\n{err.decode()}"
    stops, reloads = map(int, out.split())
    assert stops > 100 and reloads > 0, (stops, reloads)
