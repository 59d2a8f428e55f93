#!/usr/bin/env python3
"""Benchmark: the gateway against nginx as a reverse proxy, both in front of the same nginx upstream.

    python bench/run.py                 # 10 s per wrk run (about 6 minutes in all)
    python bench/run.py --quick         # 1 s per run, 256 MiB memory transfers: a smoke test

Stdlib only (plus aiohttp for bench/sink.py, which the gateway needs anyway). Everything it starts
runs on 127.0.0.1 under a temporary directory and is stopped again, also on Ctrl-C.
See bench/README.md for what the numbers mean.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
WRK = shutil.which("wrk") or "/usr/bin/wrk"
TASKSET = shutil.which("taskset") or "/usr/bin/taskset"

LOAD_CPU = "0"  # wrk, the upstream nginx, the upload sink and the memory-test client
PROXY_CPU = "1"  # the proxy under test: nginx proxy or the gateway

CASES = (
    # name, path, expected body size (None: don't check), wrk script
    ("GET 1KiB", "/1k", 1024, None),
    ("GET 1MiB", "/1m", 1024 * 1024, None),
    ("POST 64KiB", "/post", None, BENCH / "wrk_post.lua"),
)
TARGETS = ("direct", "nginx", "gateway")
# --references: issue 2's yardsticks for GET 1 KiB (bench/references.py), measured in the same run,
# and the gateway's floor: its proxy pieces on aiohttp's server without its layers.
# target name -> bench/references.py mode
_REFERENCE_MODES = {"aioproxy": "proxy", "aioserve": "serve", "bareloop": "bare"}
REFERENCES = tuple(_REFERENCE_MODES)
REFERENCE_CASE = "GET 1KiB"
SECTIONS = ("throughput", "latency", "memory", "workers")

# The gateway's environment is built from scratch for these; the caller's values must not leak in.
_GATEWAY_ENV_PREFIXES = (
    "GATEWAY_", "SERVICE_", "AUTH_", "REDIS_", "POSTGRES_", "ZIPKIN_", "RATE_LIMIT_", "TRACE_",
    "TRUSTED_PROXIES", "CORS_", "LOG_", "INTELLIGENCE_",
)  # fmt: skip


class BenchError(RuntimeError):
    pass


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- processes ----------------------------------------------------------------------------------


class Processes:
    """Every child runs in its own session, so stopping it stops its workers too (by group id)."""

    def __init__(self) -> None:
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("stdout", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.children.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log(f"pid {proc.pid} did not stop on signal {sig}; killing its group")
        # The leader may be gone while forked workers linger: always sweep the group.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if proc.poll() is None:
            proc.wait(5)
        self.children = [(n, p) for n, p in self.children if p is not proc]

    def stop_all(self) -> None:
        for _name, proc in reversed(list(self.children)):
            self.stop(proc)


def stop_on_sigterm() -> None:
    """SIGTERM ends a run as Ctrl-C does: through the ``finally`` that stops what it started."""
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(port: int, path: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} before it was ready")
        try:
            status, _ = http_get(port, path, timeout=1.0)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise BenchError(f"{what} not ready on port {port} after {timeout:g}s ({last})")


def http_get(port: int, path: str, method: str = "GET", body: bytes | None = None, timeout: float = 10.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of one process, in KiB, from /proc."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of one process so far, from /proc (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def child_pids(pid: int) -> list[int]:
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # the command may contain spaces and parentheses: fields start after the last ')'
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            children.append(int(entry))
    return children


# -- wrk ----------------------------------------------------------------------------------------

_TIME_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIME_RE = r"([0-9]+(?:\.[0-9]+)?)(us|ms|s|m|h)"


def parse_time_us(text: str) -> float | None:
    """``'320.50us'`` -> 320.5, ``'1.20ms'`` -> 1200.0, ``'2.00s'`` -> 2e6 (wrk's own units)."""
    match = re.fullmatch(_TIME_RE, text.strip())
    if not match:
        return None
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    """The numbers from ``wrk --latency`` text output. Missing values are None, never guessed."""
    result: dict[str, Any] = {
        "requests": None, "seconds": None, "bytes_read": None, "rps": None,
        "latency_avg_us": None, "latency_max_us": None, "percentiles_us": {},
        "socket_errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}, "non_2xx_3xx": 0,
    }  # fmt: skip
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("Latency") and "Distribution" not in line:
            parts = line.split()
            if len(parts) >= 4:
                result["latency_avg_us"] = parse_time_us(parts[1])
                result["latency_max_us"] = parse_time_us(parts[3])
            continue
        m = re.fullmatch(r"([0-9.]+)%\s+" + _TIME_RE, line)
        if m:
            pct = float(m.group(1))
            result["percentiles_us"][f"{pct:g}"] = float(m.group(2)) * _TIME_UNITS[m.group(3)]
            continue
        m = re.fullmatch(r"([0-9]+) requests in " + _TIME_RE + r", ([0-9.]+)([KMGT]?B) read", line)
        if m:
            result["requests"] = int(m.group(1))
            result["seconds"] = float(m.group(2)) * _TIME_UNITS[m.group(3)] / 1e6
            result["bytes_read"] = int(float(m.group(4)) * _SIZE_UNITS[m.group(5)])
            continue
        m = re.fullmatch(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", line)
        if m:
            result["socket_errors"] = dict(
                zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True)
            )
            continue
        m = re.fullmatch(r"Non-2xx or 3xx responses: (\d+)", line)
        if m:
            result["non_2xx_3xx"] = int(m.group(1))
            continue
        m = re.fullmatch(r"Requests/sec:\s+([0-9.]+)", line)
        if m:
            result["rps"] = float(m.group(1))
    result["p50_us"] = result["percentiles_us"].get("50")
    result["p99_us"] = result["percentiles_us"].get("99")
    return result


def problems(parsed: dict[str, Any]) -> list[str]:
    out = []
    if parsed["non_2xx_3xx"]:
        out.append(f"{parsed['non_2xx_3xx']} non-2xx/3xx")
    errors = {k: v for k, v in parsed["socket_errors"].items() if v}
    if errors:
        out.append("socket errors " + ", ".join(f"{k} {v}" for k, v in errors.items()))
    if not parsed["requests"]:
        out.append("no completed requests")
    if parsed["rps"] is None or parsed["p50_us"] is None or parsed["p99_us"] is None:
        out.append("could not parse wrk output")
    return out


def _selftest_parser() -> None:
    sample = """Running 2s test @ http://127.0.0.1:1/1k
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   340.15us  100.23us   1.05s    90.00%
    Req/Sec    45.00k     2.00k   50.00k    80.00%
  Latency Distribution
     50%  320.00us
     75%    1.50ms
     90%    2.00s
     99%    1.00m
  90000 requests in 2.00s, 100.50MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  45000.25
Transfer/sec:     50.00MB
"""
    r = parse_wrk(sample)
    assert r["percentiles_us"] == {"50": 320.0, "75": 1500.0, "90": 2e6, "99": 60e6}, r
    assert (r["requests"], r["seconds"], r["rps"], r["non_2xx_3xx"]) == (90000, 2.0, 45000.25, 5), r
    assert r["latency_avg_us"] == 340.15 and r["latency_max_us"] == 1.05e6, r
    assert r["socket_errors"] == {"connect": 0, "read": 3, "write": 0, "timeout": 1}, r
    assert r["bytes_read"] == int(100.5 * 1024**2)
    assert len(problems(r)) == 2


@dataclass
class Bench:
    args: argparse.Namespace
    procs: Processes = field(default_factory=Processes)
    tmp: Path = Path()
    ports: dict[str, int] = field(default_factory=dict)
    gateway: subprocess.Popen[bytes] | None = None
    gateway_workers: int = 1
    results: dict[str, Any] = field(default_factory=dict)
    nginx_pids: dict[str, int] = field(default_factory=dict)  # name -> master pid

    # -- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
        os.chmod(self.tmp, 0o755)  # nginx workers may run as nobody
        docroot = self.tmp / "www"
        docroot.mkdir(mode=0o755)
        (docroot / "1k").write_bytes(b"k" * 1024)
        (docroot / "1m").write_bytes(b"m" * 1024 * 1024)
        with open(docroot / "big", "wb") as fh:  # sparse: reads as zeros, costs no disk
            fh.truncate(self.args.mem_mib * 1024 * 1024)
        for path in docroot.iterdir():
            os.chmod(path, 0o644)
        self.ports = {name: free_port() for name in ("direct", "nginx", "gateway", "sink", *REFERENCES)}

        self.start_nginx("upstream", LOAD_CPU, {"PORT": self.ports["direct"], "DOCROOT": docroot})
        self.start_nginx(
            "proxy", PROXY_CPU, {"PORT": self.ports["nginx"], "UPSTREAM_PORT": self.ports["direct"]}
        )
        sink = self.procs.start(
            "sink",
            [TASKSET, "-c", LOAD_CPU, sys.executable, str(BENCH / "sink.py"), str(self.ports["sink"])],
            stderr=subprocess.DEVNULL,
        )
        wait_http(self.ports["sink"], "/", sink, "upload sink")
        if self.args.references:
            upstream = f"http://127.0.0.1:{self.ports['direct']}"
            for name, mode in _REFERENCE_MODES.items():
                # On the proxy's CPU, like nginx and the gateway: idle while the others are measured.
                proc = self.procs.start(
                    name,
                    [TASKSET, "-c", PROXY_CPU, sys.executable, str(BENCH / "references.py"), mode,
                     str(self.ports[name]), upstream],
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
                wait_http(self.ports[name], "/health", proc, f"reference {name}")
        self.write_gateway_config()

    def targets(self, case: str) -> tuple[str, ...]:
        if self.args.references and case == REFERENCE_CASE:
            return TARGETS + REFERENCES
        return TARGETS

    def start_nginx(self, name: str, cpu: str, values: dict[str, Any]) -> None:
        prefix = self.tmp / f"nginx-{name}"
        prefix.mkdir(mode=0o755)
        text = (BENCH / "nginx" / f"{name}.conf").read_text()
        for key, value in {"PREFIX": prefix, **values}.items():
            text = text.replace(f"@{key}@", str(value))
        if "@" in re.sub(r"#.*", "", text):
            raise BenchError(f"nginx/{name}.conf: unfilled placeholder")
        conf = prefix / "nginx.conf"
        conf.write_text(text)
        check = subprocess.run([NGINX, "-t", "-q", "-p", str(prefix), "-c", str(conf)], capture_output=True)
        if check.returncode:
            raise BenchError(f"nginx {name} config: {check.stderr.decode(errors='replace').strip()}")
        proc = self.procs.start(
            f"nginx-{name}",
            [TASKSET, "-c", cpu, NGINX, "-p", str(prefix), "-c", str(conf)],
            stderr=open(prefix / "stderr.log", "wb"),
        )
        wait_http(values["PORT"], "/health", proc, f"nginx {name}")
        self.nginx_pids[name] = proc.pid  # taskset execs nginx: this is its master

    def write_gateway_config(self) -> None:
        # auth none and a limit nobody reaches: the benchmark measures the proxy path, but with
        # the middleware chain present (and production logging on).
        common = "max_body: unlimited, auth: none, rate_limit: 1000000/second, content_types: ['*/*']"
        (self.tmp / "gateway.yaml").write_text(
            "services:\n"
            f"  bench: {{url: 'http://127.0.0.1:{self.ports['direct']}'}}\n"
            f"  sink: {{url: 'http://127.0.0.1:{self.ports['sink']}', timeout: {{connect: 2, read: 300}}}}\n"
            "routes:\n"
            f"  - {{prefix: /, service: bench, {common}}}\n"
            f"  - {{prefix: /upload, service: sink, {common}}}\n"
        )

    def gateway_env(self, workers: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(_GATEWAY_ENV_PREFIXES)}
        env.update(
            GATEWAY_HOST="127.0.0.1",
            GATEWAY_PORT=str(self.ports["gateway"]),
            GATEWAY_CONFIG=str(self.tmp / "gateway.yaml"),
            GATEWAY_WORKERS=str(workers),
            GATEWAY_SHUTDOWN_TIMEOUT="2",
            RATE_LIMIT_DEFAULT="1000000/second",
            LOG_LEVEL=self.args.log_level,
            LOG_FORMAT="json",
        )
        return env

    def start_gateway(self, workers: int) -> None:
        env = self.gateway_env(workers)
        check = subprocess.run(
            [sys.executable, "-m", "gateway", "check-config"], cwd=ROOT, env=env, capture_output=True
        )
        if check.returncode:
            raise BenchError("gateway check-config failed:\n" + (check.stdout + check.stderr).decode())
        # One worker: pinned to its own CPU like nginx. Several: free to use every CPU.
        pin = [TASKSET, "-c", PROXY_CPU] if workers == 1 else [TASKSET, "-c", all_cpus()]
        stderr = open(self.args.gateway_stderr, "ab")
        self.gateway = self.procs.start(
            "gateway", [*pin, sys.executable, *self.gateway_command()], cwd=ROOT, env=env, stderr=stderr
        )
        stderr.close()
        self.gateway_workers = workers
        wait_http(self.ports["gateway"], "/health/ready", self.gateway, "gateway")
        if workers > 1:
            deadline = time.monotonic() + 10
            while len(child_pids(self.gateway.pid)) < workers and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # the last worker to fork may still be binding its socket

    def gateway_command(self) -> list[str]:
        # --core: the same gateway with only its core middlewares (bench/core.py says which).
        return [str(BENCH / "core.py")] if self.args.core else ["-m", "gateway"]

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.procs.stop(self.gateway)
            self.gateway = None

    def gateway_alive(self) -> bool:
        return self.gateway is not None and self.gateway.poll() is None

    def require_gateway(self, during: str) -> None:
        if self.gateway is None or self.gateway.poll() is None:
            return
        code = self.gateway.returncode
        why = (
            "it drained and stopped: something sent it SIGTERM/SIGINT"
            if code in (0, -signal.SIGTERM, -signal.SIGINT)
            else "it crashed; rerun with --gateway-stderr FILE to see why"
        )
        raise BenchError(f"the gateway exited with code {code} during {during} ({why})")

    # -- measuring ------------------------------------------------------------------------------

    def preflight(self) -> list[str]:
        """One request per (case, target): the right status and the right body, before any load."""
        failures = []
        for name, path, size, _script in CASES:
            for target in self.targets(name):
                body = b"x" * 65536 if name.startswith("POST") else None
                try:
                    status, data = http_get(
                        self.ports[target], path, method="POST" if body else "GET", body=body
                    )
                except OSError as exc:
                    failures.append(f"{name} via {target}: {exc!r}")
                    continue
                if status != 200 or (size is not None and len(data) != size):
                    failures.append(f"{name} via {target}: status {status}, {len(data)} bytes")
        return failures

    def wrk(self, target: str, path: str, conns: int, seconds: int, script: Path | None) -> dict[str, Any]:
        argv = [TASKSET, "-c", LOAD_CPU, WRK, *f"-t1 -c{conns} -d{seconds}s --timeout 5s --latency".split()]
        if script is not None:
            argv += ["-s", str(script)]
        argv.append(f"http://127.0.0.1:{self.ports[target]}{path}")
        proc = self.procs.start("wrk", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            out, _ = proc.communicate(timeout=seconds + 30)
        finally:
            self.procs.stop(proc)
        text = out.decode(errors="replace")
        parsed = parse_wrk(text)
        if proc.returncode:
            parsed.setdefault("problems", []).append(f"wrk exited {proc.returncode}")
        parsed["problems"] = parsed.get("problems", []) + problems(parsed)
        if target == "gateway" and not self.gateway_alive():
            parsed["problems"].append("GATEWAY DIED")
        parsed["raw"] = text
        return parsed

    def proxy_pid(self, target: str) -> int | None:
        """The process doing the proxying for ``target``: nginx's worker, or the single gateway."""
        if target == "nginx":
            workers = child_pids(self.nginx_pids["proxy"])
            return workers[0] if len(workers) == 1 else None
        if target == "gateway" and self.gateway is not None and self.gateway_workers == 1:
            return self.gateway.pid  # taskset execs python
        return None

    def measure(
        self, key: str, case: str, target: str, path: str, conns: int, script: Path | None, round_: int = 0
    ) -> None:
        pid = self.proxy_pid(target)
        cpu_before = cpu_seconds(pid) if pid is not None else 0.0
        r = self.wrk(target, path, conns, self.args.duration, script)
        if pid is not None and r["requests"]:
            # What one request costs the proxy, user and system time: under load a system call
            # serves several requests and the caches stay warm, at one connection not.
            r["cpu_us_per_request"] = (cpu_seconds(pid) - cpu_before) / r["requests"] * 1e6
        row = {"case": case, "connections": conns, "target": target, "round": round_, **r}
        self.results.setdefault(key, []).append(row)
        if target == "gateway":
            self.require_gateway(f"{case} c={conns}")
        time.sleep(0.3)

    def warm_up(self) -> None:
        for target in TARGETS:
            self.wrk(target, "/1k", 128, 1, None)
            self.wrk(target, "/post", 32, 1, BENCH / "wrk_post.lua")
        for target in REFERENCES if self.args.references else ():
            self.wrk(target, "/1k", 128, 1, None)

    # With --rounds N each case runs its three targets in turn N times, so that every gateway run
    # has an nginx run next to it; the report takes medians.

    def throughput(self) -> None:
        for name, path, _size, script in CASES:
            for conns in (32, 128):
                for round_ in range(self.args.rounds):
                    for target in self.targets(name):
                        log(f"{name} c={conns} -> {target}{self.round_label(round_)}")
                        self.measure("throughput", name, target, path, conns, script, round_)

    def latency(self) -> None:
        for name, path in (("GET 1KiB", "/1k"), ("GET 1MiB", "/1m")):
            for round_ in range(self.args.rounds):
                for target in TARGETS:
                    log(f"latency {name} c=1 -> {target}{self.round_label(round_)}")
                    self.measure("latency", name, target, path, 1, None, round_)

    def round_label(self, round_: int) -> str:
        return f" (round {round_ + 1}/{self.args.rounds})" if self.args.rounds > 1 else ""

    def memory(self) -> None:
        size = self.args.mem_mib * 1024 * 1024
        out: dict[str, Any] = {"size_bytes": size}
        self.results["memory"] = out
        # The first read of the sparse file fills the page cache with its zero pages, which made
        # whichever transfer came first a third as fast (measured: the gateway's download at 340
        # MiB/s when first, 1,040 MiB/s when second): read it once here, so neither pays for it.
        chunk = bytearray(1024 * 1024)
        with open(self.tmp / "www" / "big", "rb") as fh:
            while fh.readinto(chunk):
                pass
        for mode, path, direct in (
            ("download", "/big", f"http://127.0.0.1:{self.ports['direct']}/big"),
            ("upload", "/upload/sink", f"http://127.0.0.1:{self.ports['sink']}/upload/sink"),
        ):
            log(f"memory: {self.args.mem_mib} MiB {mode} through the gateway")
            self.require_gateway(f"memory {mode}")
            out[mode] = self.transfer(mode, f"http://127.0.0.1:{self.ports['gateway']}{path}", size)
            self.require_gateway(f"memory {mode}")
            # The same transfer without the gateway: the client's and the upstream's own ceiling.
            reference = self.transfer(mode, direct, size, sample_gateway=False)
            out[mode]["direct_mib_per_s"] = reference.get("mib_per_s")
            out[mode]["problems"] += [f"direct: {p}" for p in reference["problems"]]

    def transfer(self, mode: str, url: str, size: int, sample_gateway: bool = True) -> dict[str, Any]:
        assert self.gateway is not None
        pid = self.gateway.pid  # with one worker the serving process is the gateway itself
        try:
            before = rss_kib(pid)
        except OSError as exc:
            raise BenchError(f"cannot read the gateway's RSS: {exc}") from None
        if not sample_gateway:
            pid = -1  # the sampler stops at once
        peak = before["VmRSS"]
        client = self.procs.start(
            f"{mode}-client",
            [TASKSET, "-c", LOAD_CPU, sys.executable, str(BENCH / "transfer.py"), mode, url, str(size)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        samples = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak, samples
            while not stop.is_set():
                try:
                    peak = max(peak, rss_kib(pid)["VmRSS"])
                    samples += 1
                except (OSError, KeyError):
                    return
                stop.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            stdout, stderr = client.communicate(timeout=600)
        finally:
            stop.set()
            sampler.join()
            self.procs.stop(client)
        try:
            after = rss_kib(pid)
        except OSError:
            after = {}
        result: dict[str, Any] = {
            "rss_before_kib": before["VmRSS"], "rss_peak_kib": peak, "rss_after_kib": after.get("VmRSS"),
            "rss_growth_mib": (peak - before["VmRSS"]) / 1024, "samples": samples, "problems": [],
        }  # fmt: skip
        try:
            report = json.loads(stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            report = {}
            result["problems"].append("client failed: " + stderr.decode(errors="replace").strip()[-300:])
        result.update(report)
        if report:
            if report.get("status") != 200 or report.get("bytes") != size:
                result["problems"].append(f"status {report.get('status')}, {report.get('bytes')} bytes")
            if mode == "upload":
                try:
                    received = json.loads(report.get("response") or "{}").get("bytes")
                except ValueError:
                    received = None
                if received != size:
                    result["problems"].append(f"sink received {received} bytes, expected {size}")
            result["mib_per_s"] = size / 1024**2 / report["seconds"] if report.get("seconds") else None
        if sample_gateway and not self.gateway_alive():
            result["problems"].append("GATEWAY DIED")
        return result

    # -- the whole run --------------------------------------------------------------------------

    def run(self) -> None:
        self.setup()
        self.start_gateway(1)
        failures = self.preflight()
        if failures:
            raise BenchError("preflight failed:\n  " + "\n  ".join(failures))
        only = set(self.args.only or SECTIONS)
        if only & {"throughput", "latency"}:
            log("warm-up")
            self.warm_up()
            self.require_gateway("warm-up")
        if "throughput" in only:
            self.throughput()
        if "latency" in only:
            self.latency()
        if "memory" in only:
            self.memory()
        self.stop_gateway()
        if "workers" not in only:
            return

        log(f"GATEWAY_WORKERS=2, GET 1KiB c=128 (not pinned: CPUs {all_cpus()})")
        self.start_gateway(2)
        workers = child_pids(self.gateway.pid) if self.gateway else []
        self.wrk("gateway", "/1k", 128, 1, None)  # warm-up
        # Where the two CPUs went: the workers share them with the upstream and wrk, whose share
        # bounds what two workers can do next to one pinned process that had a CPU to itself.
        upstream = [self.nginx_pids["upstream"], *child_pids(self.nginx_pids["upstream"])]
        before = {pid: cpu_seconds(pid) for pid in workers + upstream}
        children = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk is the only child reaped
        started = time.monotonic()
        r = self.wrk("gateway", "/1k", 128, self.args.duration, None)
        elapsed = time.monotonic() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        used = {pid: cpu_seconds(pid) - before[pid] for pid in before}
        cpu = {
            "workers": sum(used[pid] for pid in workers) / elapsed,
            "upstream": sum(used[pid] for pid in upstream) / elapsed,
            "wrk": (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) / elapsed,
        }
        self.results["workers2"] = {"worker_pids": workers, "cpus": all_cpus(), "cpu": cpu, **r}
        self.require_gateway("the GATEWAY_WORKERS=2 run")
        self.stop_gateway()


def all_cpus() -> str:
    return ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))


# -- report -------------------------------------------------------------------------------------


def ms(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us / 1000:.2f}ms" if abs(us) >= 1000 else f"{us:.0f}us"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def find(rows: list[dict[str, Any]], case: str, conns: int, target: str) -> dict[str, Any]:
    """One target's runs of a case folded into one row: the median of each figure over the
    rounds, every round's problems."""
    runs = [r for r in rows if (r["case"], r["connections"], r["target"]) == (case, conns, target)]
    if not runs:
        return {}
    folded: dict[str, Any] = {"problems": [p for r in runs for p in r["problems"]], "rounds": len(runs)}
    for key in ("rps", "p50_us", "p99_us"):
        values = [r[key] for r in runs if r.get(key) is not None]
        folded[key] = statistics.median(values) if values else None
    return folded


def per_round(
    rows: list[dict[str, Any]],
    case: str,
    conns: int,
    pair: tuple[str, str],
    figure: Callable[[dict[str, Any], dict[str, Any]], float | None],
) -> list[float]:
    """``figure(run of pair[0], run of pair[1])`` for each round in which both ran and it has a value."""
    out = []
    for round_ in sorted({r.get("round", 0) for r in rows}):
        runs = {
            r["target"]: r
            for r in rows
            if (r["case"], r["connections"], r.get("round", 0)) == (case, conns, round_)
        }
        a, b = runs.get(pair[0]), runs.get(pair[1])
        value = figure(a, b) if a and b else None
        if value is not None:
            out.append(value)
    return out


def _rps_ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    return a["rps"] / b["rps"] if a.get("rps") and b.get("rps") else None


def _added(key: str) -> Callable[[dict[str, Any], dict[str, Any]], float | None]:
    def added(a: dict[str, Any], b: dict[str, Any]) -> float | None:
        return a[key] - b[key] if a.get(key) is not None and b.get(key) is not None else None

    return added


def _median_cpu(rows: list[dict[str, Any]], case: str, conns: int, target: str) -> float | None:
    return median_or_none(
        [
            r["cpu_us_per_request"]
            for r in rows
            if (r["case"], r["connections"], r["target"]) == (case, conns, target)
            and "cpu_us_per_request" in r
        ]
    )


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# Issue 2's throughput targets (GET 1 KiB, 32 connections) as ratios to nginx, and the two
# yardsticks it measured on its own machine: the plain aiohttp proxy at 0.14x, aiohttp answering
# itself at 0.71x. How fast Python runs next to nginx differs from machine to machine more than the
# gateway changes, so the report also states the gateway against the yardsticks of the same rounds,
# with the targets in those units (0.25 / 0.14 = 1.79x the plain proxy, and so on).
ISSUE_TARGET = {"full": 0.20, "core": 0.25}
ISSUE_YARDSTICKS = {"aioproxy": 0.14, "aioserve": 0.71}


def _spread(rounds: list[float]) -> str:
    """The per-round figures behind a median, when there is more than one."""
    return "  rounds: " + " ".join(f"{x:.2f}" for x in rounds) if len(rounds) > 1 else ""


def add_yardstick_units(
    add: Callable[[str], None], rows: list[dict[str, Any]], case: str, conns: int, meta: dict[str, Any]
) -> None:
    target = ISSUE_TARGET["core" if str(meta.get("chain", "full")).startswith("core") else "full"]
    for reference, measured in ISSUE_YARDSTICKS.items():
        rounds = per_round(rows, case, conns, ("gateway", reference), _rps_ratio)
        if not rounds:
            continue
        spread = _spread(rounds)
        add(
            f"{'':<11} {'':>5}  {'gw/' + reference:<8} {statistics.median(rounds):>9.3f}x"
            f"{'':>20}{spread}  (issue 2's target in these units: {target / measured:.2f}x)"
        )


def report(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = []
    add = lines.append
    add(
        f"gateway benchmark {meta['time']}  duration {meta['duration_s']}s per run, "
        f"{meta.get('rounds', 1)} round(s), medians  "
        f"gateway LOG_LEVEL={meta['log_level']}  chain: {meta.get('chain', 'full')}  "
        f"load before: {meta['loadavg_before']}"
    )
    add(
        f"pinning: wrk + upstream nginx on CPU {LOAD_CPU}; proxy under test (nginx, 1 worker / gateway, "
        f"1 process) on CPU {PROXY_CPU}"
    )
    add(f"python: {meta.get('python_executable', '?')} {meta['python']}")
    if meta.get("references"):
        add(
            "references (bench/references.py, GET 1KiB only): aioproxy = a plain aiohttp ClientSession "
            "proxy, aioserve = aiohttp answering 1 KiB itself (issue 2 measured 0.14x and 0.71x); "
            "bareloop = the gateway's proxy pieces without its middlewares, access log or tracing"
        )
    add("")
    rows = results.get("throughput", [])
    if rows:
        add(f"{'case':<11} {'conns':>5}  {'target':<8} {'req/s':>10} {'p50':>9} {'p99':>9}  notes")
    for case, _path, _size, _script in CASES:
        for conns in (32, 128):
            for target in TARGETS + REFERENCES:
                r = find(rows, case, conns, target)
                if not r:
                    continue
                notes = "!! " + "; ".join(r["problems"]) if r["problems"] else ""
                rps = f"{r['rps']:.0f}" if r["rps"] is not None else "-"
                add(
                    f"{case:<11} {conns:>5}  {target:<8} {rps:>10} {ms(r['p50_us']):>9} {ms(r['p99_us']):>9}  {notes}"
                )
            n = find(rows, case, conns, "nginx")
            for target, label in (("gateway", "gw"), *((r, r) for r in REFERENCES)):
                g = find(rows, case, conns, target)
                if not (g and n):
                    continue
                rounds = per_round(rows, case, conns, (target, "nginx"), _rps_ratio)
                spread = _spread(rounds)
                throughput_ratio = f"{statistics.median(rounds):.3f}x" if rounds else "-"
                add(
                    f"{'':<11} {'':>5}  {label + '/nginx':<8} {throughput_ratio:>10} "
                    f"{ratio(g['p50_us'], n['p50_us']):>9} {ratio(g['p99_us'], n['p99_us']):>9}{spread}"
                )
            if case == "GET 1KiB" and conns == 32:  # where the issue sets its targets
                add_yardstick_units(add, rows, case, conns, meta)
            if find(rows, case, conns, "direct"):
                add("")

    lat = results.get("latency", [])
    if lat:
        add("single connection (wrk -c1 -t1)")
        d1, d2 = find(lat, "GET 1KiB", 1, "direct"), find(lat, "GET 1MiB", 1, "direct")
        add(
            f"  {'target':<8} {'1KiB p50':>9} {'added':>9} {'1KiB p99':>9}   {'1MiB p50':>9} {'1MiB p99':>9} {'added p99':>9}"
        )
        for target in TARGETS:
            a, b = find(lat, "GET 1KiB", 1, target), find(lat, "GET 1MiB", 1, target)
            # Added to direct within each round, then the median over the rounds.
            added = added99 = ""
            if target != "direct" and d1 and d2:
                added = ms(
                    median_or_none(per_round(lat, "GET 1KiB", 1, (target, "direct"), _added("p50_us")))
                )
                added99 = ms(
                    median_or_none(per_round(lat, "GET 1MiB", 1, (target, "direct"), _added("p99_us")))
                )
            notes = "; ".join(a.get("problems", []) + b.get("problems", []))
            add(
                f"  {target:<8} {ms(a.get('p50_us')):>9} {added:>9} {ms(a.get('p99_us')):>9}   "
                f"{ms(b.get('p50_us')):>9} {ms(b.get('p99_us')):>9} {added99:>9}"
                + (f"  !! {notes}" if notes else "")
            )
        costs = []
        for target in ("gateway", "nginx"):
            alone = _median_cpu(lat, "GET 1KiB", 1, target)
            loaded = _median_cpu(rows, "GET 1KiB", 32, target)
            if alone is not None:
                costs.append(
                    f"{target} {ms(alone)}" + (f" (at 32 connections {ms(loaded)})" if loaded else "")
                )
        if costs:
            add(f"  CPU of the proxy per GET 1KiB at one connection, user + system: {'; '.join(costs)}")
        add("")

    w = results.get("workers2")
    if w:
        one = find(rows, "GET 1KiB", 128, "gateway")
        notes = "  !! " + "; ".join(w["problems"]) if w["problems"] else ""
        rps = f"{w['rps']:.0f}" if w["rps"] is not None else "-"
        add(
            f"GATEWAY_WORKERS=2 (NOT pinned: CPUs {w['cpus']}, shared with wrk and the upstream; "
            f"{len(w['worker_pids'])} workers seen), GET 1KiB c=128"
        )
        add(
            f"  {rps} req/s  p50 {ms(w['p50_us'])}  p99 {ms(w['p99_us'])}  "
            f"= {ratio(w['rps'], one.get('rps'))} the single pinned process{notes}"
        )
        cpu = w.get("cpu")
        if cpu:
            per_cpu = f"{w['rps'] / cpu['workers']:.0f}" if w["rps"] and cpu["workers"] else "-"
            add(
                f"  CPUs used: workers {cpu['workers']:.2f}, upstream nginx {cpu['upstream']:.2f}, "
                f"wrk {cpu['wrk']:.2f}; {per_cpu} req/s per worker CPU (the single process: one CPU "
                f"to itself; two workers can have at most 2 - {cpu['upstream'] + cpu['wrk']:.2f} here)"
            )
            single = one.get("rps")
            if w["rps"] and single:
                # The load side's CPU grows with the requests it drives (c per request), and takes
                # it from the same two CPUs: with each worker CPU as productive as the single
                # process's, T = (2 - T c) s, so T / s = 2 / (1 + s c), whatever the gateway does.
                load = (cpu["upstream"] + cpu["wrk"]) / w["rps"]
                ceiling = 2 / (1 + single * load)
                add(
                    f"  the most two workers can do on these two CPUs, scaling perfectly: "
                    f"{ceiling:.2f}x (2 / (1 + single req/s x load CPU per request, "
                    f"{load * 1e6:.0f} us)); measured {w['rps'] / single / ceiling:.2f} of it"
                )
        add("")

    mem = results.get("memory")
    if mem:
        add(
            f"memory: {mem['size_bytes'] // 1024**2} MiB through the gateway (GATEWAY_WORKERS=1), RSS of the gateway process"
        )
        for mode in ("download", "upload"):
            m = mem.get(mode) or {}
            if not m:
                continue
            speed = f"{m['mib_per_s']:.0f} MiB/s" if m.get("mib_per_s") else "-"
            if m.get("direct_mib_per_s"):
                speed += f" (without the gateway: {m['direct_mib_per_s']:.0f} MiB/s)"
            notes = "  !! " + "; ".join(m["problems"]) if m["problems"] else ""
            add(
                f"  {mode:<8} RSS before {m['rss_before_kib'] / 1024:.1f} MiB, peak {m['rss_peak_kib'] / 1024:.1f} MiB, "
                f"growth {m['rss_growth_mib']:+.1f} MiB ({m['samples']} samples); {speed}{notes}"
            )
    return "\n".join(lines)


def git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def tool_version(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return ((proc.stdout + proc.stderr).strip().splitlines() or ["?"])[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each throughput and latency case N times, targets in turn; report medians (default 1)",
    )
    parser.add_argument("--quick", action="store_true", help="1 s runs and 256 MiB memory transfers")
    parser.add_argument(
        "--mem-mib", type=int, default=None, help="size of the memory-test transfers (default 1024)"
    )
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only this section (repeatable; default all)"
    )
    parser.add_argument("--log-level", default="INFO", help="the gateway's LOG_LEVEL (default INFO)")
    parser.add_argument(
        "--gateway-stderr", default=os.devnull, help="where the gateway's logs go (default /dev/null)"
    )
    parser.add_argument(
        "--keep-tmp", action="store_true", help="keep the temporary directory (configs, nginx logs)"
    )
    parser.add_argument(
        "--core",
        action="store_true",
        help="the gateway with its core middlewares only: tracing, errors, routing (see bench/core.py)",
    )
    parser.add_argument(
        "--references",
        action="store_true",
        help="also measure a plain aiohttp proxy, aiohttp serving 1 KiB itself and the gateway's bare loop "
        "(GET 1KiB throughput)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.duration = 1 if args.duration == 10 else args.duration
        args.mem_mib = args.mem_mib or 256
    args.mem_mib = args.mem_mib or 1024
    if args.duration < 1:
        parser.error("--duration must be at least 1 (wrk takes whole seconds)")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    _selftest_parser()
    for tool in (NGINX, WRK, TASKSET):
        if not os.access(tool, os.X_OK):
            parser.error(f"{tool} not found")
    if len(os.sched_getaffinity(0)) < 2:
        parser.error("needs at least 2 CPUs (load on CPU 0, the proxy under test on CPU 1)")

    meta = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "duration_s": args.duration,
        "rounds": args.rounds,
        "sections": args.only or list(SECTIONS),
        "mem_mib": args.mem_mib,
        "log_level": args.log_level,
        "chain": "core (bench/core.py)" if args.core else "full",
        "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "cpus": all_cpus(),
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "references": args.references,
        "nginx": tool_version([NGINX, "-v"]),
        "wrk": tool_version([WRK, "--version"]),
        "pinning": {"load": LOAD_CPU, "proxy_under_test": PROXY_CPU, "workers2": "not pinned"},
    }
    bench = Bench(args)

    stop_on_sigterm()
    status = 0
    try:
        bench.run()
    except BenchError as exc:
        log(f"FAILED: {exc}")
        status = 1
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    except Exception:
        log("FAILED with an unexpected error:\n" + traceback.format_exc())
        status = 1
    finally:
        bench.procs.stop_all()
        if bench.tmp != Path() and not args.keep_tmp:
            shutil.rmtree(bench.tmp, ignore_errors=True)
        elif args.keep_tmp:
            log(f"kept {bench.tmp}")

    if bench.results:
        meta["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        meta["completed"] = status == 0
        print(report(bench.results, meta))
        if status:
            print("\n!! PARTIAL RESULTS: the run did not finish (see the message above)")
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(json.dumps({"meta": meta, **bench.results}, indent=2))
        print(f"\nwrote {path.relative_to(ROOT)}")
        runs = bench.results.get("throughput", []) + bench.results.get("latency", [])
        runs += [bench.results[k] for k in ("workers2",) if k in bench.results]
        runs += [v for v in bench.results.get("memory", {}).values() if isinstance(v, dict)]
        flagged = [r for r in runs if r["problems"]]
        if flagged:
            print(f"!! {len(flagged)} run(s) had errors; see the notes above")
            status = status or 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
