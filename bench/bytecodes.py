#!/usr/bin/env python3
"""Python bytecodes per proxied request, by function: where the interpreted work of a request goes.

    python bench/bytecodes.py                          # GET 1 KiB, full chain, top 40 functions
    python bench/bytecodes.py --core --top 80          # core middlewares only (bench/core.py)
    python bench/bytecodes.py --reference bare --save /tmp/bare.json
    python bench/bytecodes.py --core --diff /tmp/bare.json   # what the core adds, function by function

``bench/instructions.py`` says how much a request costs; this says where, in Python terms. The
gateway runs behind the same nginx upstream with a tracing hook (``sys.settrace`` with opcode
events) switched on by a signal for exactly ``--requests`` requests after a warm-up; every bytecode
the event loop's thread executes is counted against its function, as are the function's calls and
resumptions ("frames"). Like instructions, the counts do not move with the machine's noise; unlike
them they leave out what C code does (aiohttp's parsers, multidict, the JSON encoder) and weigh
every bytecode alike. On the gateway's GET 1 KiB one bytecode is about 120 instructions. The hook
slows the process a hundredfold: only the counts mean anything. About 20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import CodeType, FrameType
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import instructions  # noqa: E402  (the same upstream, config and client)


def _wrap(out: str, program: list[str]) -> None:
    """In the measured process: run ``program`` as ``__main__``; SIGUSR1 starts counting, SIGUSR2
    stops and writes ``[bytecodes, frames, name]`` rows to ``out``."""
    ops: collections.Counter[CodeType] = collections.Counter()
    frames: collections.Counter[CodeType] = collections.Counter()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            ops[frame.f_code] += 1
        return local

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "call":  # a call, or a coroutine or generator resumed
            frames[frame.f_code] += 1
            frame.f_trace_opcodes = True
            return local
        return None

    def start(*_: Any) -> None:
        ops.clear()
        frames.clear()
        sys.settrace(on_call)  # this thread only: the log writer thread is not counted

    def stop(*_: Any) -> None:
        sys.settrace(None)
        rows = [
            [ops[code], frames[code], f"{_short(code.co_filename)}:{code.co_firstlineno}:{code.co_qualname}"]
            for code in set(ops) | set(frames)
        ]
        Path(out).write_text(json.dumps(rows))

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    if program[0] == "-m":
        sys.argv = [program[1], *program[2:]]
        runpy.run_module(program[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = program
        runpy.run_path(program[0], run_name="__main__")


def _short(filename: str) -> str:
    for marker in ("site-packages/", f"{ROOT}/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def _count(args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bytecodes-"))
    upstream_port, gateway_port = instructions.free_port(), instructions.free_port()
    env = instructions.gateway_env(tmp, upstream_port, gateway_port, args.env)
    program = instructions.measured_program(args.core, args.reference, upstream_port, gateway_port)
    out = tmp / "counts.json"
    procs = [instructions.start_upstream(tmp, upstream_port)]
    gateway = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--wrap", str(out), *program],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "wb"),
    )  # fmt: skip
    procs.append(gateway)
    try:
        instructions.wait_up(gateway_port, gateway, "the gateway", timeout=60)
        asyncio.run(instructions.drive(gateway_port, args.path, 320, args.connections))  # warm up
        gateway.send_signal(signal.SIGUSR1)
        time.sleep(0.5)  # the handler runs between two of the loop's bytecodes, not at once
        counted = asyncio.run(instructions.drive(gateway_port, args.path, args.requests, args.connections))
        gateway.send_signal(signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not (out.exists() and out.stat().st_size):
            if time.monotonic() > deadline:
                raise SystemExit(f"no counts from the gateway; its log: {tmp / 'gateway.log'}")
            time.sleep(0.1)
        time.sleep(0.2)  # written in one call; let it finish
        rows = json.loads(out.read_text())
        return {name: (ops / counted, calls / counted) for ops, calls, name in rows}
    finally:
        instructions.stop(procs, tmp)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--wrap":
        _wrap(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    instructions.add_run_arguments(parser, requests=320)
    parser.add_argument("--top", type=int, default=40, help="functions listed (default 40)")
    parser.add_argument("--save", metavar="FILE", help="also write the per-request counts here (JSON)")
    parser.add_argument("--diff", metavar="FILE", help="list the differences from counts saved with --save")
    args = parser.parse_args()
    if not Path(instructions.NGINX).exists():
        raise SystemExit(f"{instructions.NGINX} not found (Debian: apt-get install nginx)")

    counts = _count(args)
    if args.save:
        Path(args.save).write_text(json.dumps(counts))
    total = sum(ops for ops, _ in counts.values())
    frames = sum(calls for _, calls in counts.values())
    print(f"GET {args.path}: {total:,.0f} bytecodes and {frames:.0f} frames per request")
    rows = {name: (ops, calls, 0.0, 0.0) for name, (ops, calls) in counts.items()}
    if args.diff:
        base = {name: tuple(value) for name, value in json.loads(Path(args.diff).read_text()).items()}
        base_total = sum(ops for ops, _ in base.values())
        print(f"{args.diff}: {base_total:,.0f} bytecodes per request; difference {total - base_total:+,.0f}")
        rows = {
            name: (*counts.get(name, (0.0, 0.0)), *base.get(name, (0.0, 0.0)))
            for name in counts.keys() | base.keys()
        }
    order = sorted(rows.items(), key=lambda item: -abs(item[1][0] - item[1][2]))
    print(
        f"{'bytecodes':>10} {'frames':>7}  function (per request{', minus the saved counts' if args.diff else ''})"
    )
    for name, (ops, calls, base_ops, base_calls) in order[: args.top]:
        print(f"{ops - base_ops:10.1f} {calls - base_calls:7.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
