#!/usr/bin/env python3
"""CPU time per proxied request, from /proc, for several targets in interleaved rounds.

    python bench/cpu.py                                   # gateway, core, bare loop: 3 rounds
    python bench/cpu.py gateway proxy bare --rounds 5     # against the plain aiohttp proxy
    python bench/cpu.py gateway gateway@/tmp/old --path /1m   # this checkout against another one

``bench/run.py`` says how fast, ``bench/instructions.py`` how much interpreted work; this says
what a request costs the measured process in CPU time, split into user and system time, which
is what its req/s comes from. Each round runs every target once in turn (so the machine's drift
hits them alike), under the same pinning as bench/run.py: the upstream nginx and wrk on CPU 0,
the target on CPU 1. A target is ``gateway`` (every middleware), ``core`` (bench/core.py), or
one of bench/references.py's ``proxy``, ``serve`` and ``bare``; ``NAME@DIR`` runs the code of
another checkout (``git worktree add /tmp/old REV``). Needs nginx and wrk (Debian packages).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import instructions  # noqa: E402  (the same upstream, config and programs)
from run import WRK, parse_wrk, problems  # noqa: E402  (wrk as bench/run.py reads it)

TARGETS = ("gateway", "core", "proxy", "serve", "bare")
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of the whole process (every thread) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / _TICK, int(fields[12]) / _TICK


def program(target: str, upstream_port: int, port: int) -> tuple[list[str], str]:
    """The measured process's arguments after ``python``, and its checkout."""
    name, _, checkout = target.partition("@")
    root = Path(checkout).resolve() if checkout else BENCH.parent
    reference = name if name in ("proxy", "serve", "bare") else None
    args = instructions.measured_program(name == "core", reference, upstream_port, port)
    return [a.replace(str(BENCH), str(root / "bench")) for a in args], str(root)


def wrk(port: int, path: str, seconds: int) -> int:
    out = subprocess.run(
        [WRK, "-t1", "-c32", "--latency", f"-d{seconds}s", f"http://127.0.0.1:{port}{path}"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    parsed = parse_wrk(out)
    if problems(parsed):
        raise SystemExit(f"wrk: {', '.join(problems(parsed))}\n{out}")
    return parsed["requests"]


def measure(
    target: str, tmp: Path, upstream_port: int, path: str, seconds: int
) -> tuple[float, float, float]:
    """req/s, user and system microseconds per request of one ``seconds``-long run."""
    port = instructions.free_port()
    args, root = program(target, upstream_port, port)
    env = instructions.gateway_env(tmp, upstream_port, port, [])
    env["PYTHONPATH"] = root
    proc = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, *args],
        cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        instructions.wait_up(port, proc, target, timeout=30)
        wrk(port, path, 2)  # warm up: pools, caches, the allocator
        user, system = cpu_seconds(proc.pid)
        requests = wrk(port, path, seconds)
        user2, system2 = cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return requests / seconds, (user2 - user) / requests * 1e6, (system2 - system) / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("targets", nargs="*", default=["gateway", "core", "bare"], metavar="TARGET[@DIR]")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=int, default=6, help="wrk run per target and round (default 6)")
    parser.add_argument("--path", default="/1k", help="/1k or /1m (default /1k)")
    args = parser.parse_args()
    for target in args.targets:
        name, _, checkout = target.partition("@")
        if name not in TARGETS or (checkout and not (Path(checkout) / "gateway").is_dir()):
            raise SystemExit(f"unknown target {target!r}: one of {', '.join(TARGETS)}, optionally @CHECKOUT")

    os.sched_setaffinity(0, {0})  # nginx and wrk inherit CPU 0; the targets run on CPU 1
    tmp = Path(tempfile.mkdtemp(prefix="gateway-cpu-"))
    upstream_port = instructions.free_port()
    upstream = instructions.start_upstream(tmp, upstream_port)
    results: dict[str, list[tuple[float, float, float]]] = {t: [] for t in args.targets}
    try:
        time.sleep(0.5)  # nginx binds its port before the first target starts
        for round_ in range(args.rounds):
            for target in args.targets:
                rps, user, system = measure(target, tmp, upstream_port, args.path, args.seconds)
                results[target].append((rps, user, system))
                print(f"round {round_ + 1}  {target:24} {rps:8.0f} req/s  user {user:6.1f} us  "
                      f"system {system:6.1f} us per request", flush=True)  # fmt: skip
    finally:
        instructions.stop([upstream], tmp)
    print(f"\nGET {args.path}, 32 connections, medians of {args.rounds} rounds (the ranges in brackets):")
    for target, rows in results.items():
        columns = []
        for i, unit in ((0, "req/s"), (1, "us user"), (2, "us system")):
            values = [row[i] for row in rows]
            columns.append(f"{statistics.median(values):7.1f} {unit} ({min(values):.0f}-{max(values):.0f})")
        print(f"  {target:24} " + "  ".join(columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())
