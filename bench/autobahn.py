#!/usr/bin/env python3
"""WebSocket conformance: the Autobahn|Testsuite fuzzing client through the gateway to an echo server.

    python bench/autobahn.py                        # every case but 12.* and 13.* (under a minute)
    python bench/autobahn.py --cases '1.*' '2.*'    # these cases only (nothing excluded)
    python bench/autobahn.py --direct               # also straight to the echo server; differences
    python bench/autobahn.py --keep /tmp/ab-report  # keep the harness's reports (index.html there)

Starts, on 127.0.0.1 and free ports, bench/ws_echo.py and the gateway (`python -m gateway` from the
repository root) routing /echo to it, runs `wstest -m fuzzingclient` against the gateway, reads the
harness's index.json and prints a summary. Exit status 0 when no case FAILED and every close was
as the harness requires (behaviorClose OK or INFORMATIONAL), 1 otherwise, 2 for bad usage or a
missing wstest, 130 on Ctrl-C. Everything it starts is stopped at the end, also on failure or
Ctrl-C. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

# Processes in their own sessions, stopped by group; the gateway's environment prefixes.
from run import (  # noqa: E402
    _GATEWAY_ENV_PREFIXES,
    BenchError,
    Processes,
    free_port,
    git_commit,
    log,
    stop_on_sigterm,
    wait_http,
)

# wstest runs on Python 2.7 only; the last virtualenv that runs there makes its venv. The
# interpreter named in the install line: the one on the PATH, else pyenv's usual place for it.
PY27 = shutil.which("python2.7") or "~/.pyenv/versions/2.7.18/bin/python"
INSTALL = (
    f"{PY27} -m pip install 'virtualenv<20.22' && {PY27} -m virtualenv /tmp/ab/venv && "
    "/tmp/ab/venv/bin/pip install autobahntestsuite"
)
# 12.* and 13.* test permessage-deflate, which the gateway does not negotiate (README.md): through
# it they are all UNIMPLEMENTED, and they are more than two fifths of the run time.
DEFAULT_EXCLUDE = ("12.*", "13.*")
EXCLUDE_REASON = "permessage-deflate, which the gateway does not negotiate (README.md)"
PREFIX = "/echo"
# Results a case may have and still pass; a close behaviour other than these fails the run too
# (the harness's FAILED, UNCLEAN, WRONG CODE, FAILED BY CLIENT).
PASSING = frozenset({"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"})
PASSING_CLOSE = frozenset({"OK", "INFORMATIONAL"})
RESULT_ORDER = ("OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED", "FAILED")


def find_wstest(given: str | None) -> str | None:
    path = given or shutil.which("wstest")
    if path is None or not os.access(path, os.X_OK):
        where = f"{given} is not an executable" if given else "wstest is not on the PATH"
        print(
            f"autobahn.py: {where}; install Autobahn|Testsuite (Python 2.7) with: {INSTALL}; "
            "then pass --wstest /tmp/ab/venv/bin/wstest",
            file=sys.stderr,
        )
        return None
    return path


def case_key(case: str) -> tuple[int, ...]:
    return tuple(int(part) for part in case.split("."))


class Run:
    def __init__(self, args: argparse.Namespace, wstest: str) -> None:
        self.args = args
        self.wstest = wstest
        self.procs = Processes()
        self.workdir = Path()
        self.gateway: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}

    # -- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        if self.args.keep:
            self.workdir = Path(self.args.keep).resolve()
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self.workdir = Path(tempfile.mkdtemp(prefix="gateway-autobahn-"))
        self.ports = {"echo": free_port(), "gateway": free_port()}
        echo = self.procs.start(
            "echo",
            [sys.executable, str(BENCH / "ws_echo.py"), str(self.ports["echo"])],
            stderr=open(self.workdir / "echo.log", "wb"),
        )
        wait_http(self.ports["echo"], "/health", echo, "echo server")
        config = self.workdir / "gateway.yaml"
        # auth none and a limit nobody reaches: the harness opens one connection per case, quickly.
        config.write_text(
            "services:\n"
            f"  echo: {{url: 'http://127.0.0.1:{self.ports['echo']}', timeout: {{connect: 2, read: 60}}}}\n"
            "routes:\n"
            f"  - {{prefix: {PREFIX}, service: echo, auth: none, strip_prefix: true,"
            " rate_limit: 1000000/second}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith(_GATEWAY_ENV_PREFIXES)}
        env.update(
            GATEWAY_HOST="127.0.0.1",
            GATEWAY_PORT=str(self.ports["gateway"]),
            GATEWAY_CONFIG=str(config),
            GATEWAY_WORKERS="1",
            GATEWAY_SHUTDOWN_TIMEOUT="2",
            AUTH_ENABLED="false",
            RATE_LIMIT_DEFAULT="1000000/second",
            LOG_LEVEL="WARNING",
        )
        check = subprocess.run(
            [sys.executable, "-m", "gateway", "check-config"], cwd=ROOT, env=env, capture_output=True
        )
        if check.returncode:
            raise BenchError("gateway check-config failed:\n" + (check.stdout + check.stderr).decode())
        self.gateway = self.procs.start(
            "gateway",
            [sys.executable, "-m", "gateway"],
            cwd=ROOT,
            env=env,
            stderr=open(self.workdir / "gateway.log", "wb"),
        )
        wait_http(self.ports["gateway"], "/health/ready", self.gateway, "gateway")

    # -- the harness ----------------------------------------------------------------------------

    def agents(self) -> dict[str, str]:
        agents = {"gateway": f"ws://127.0.0.1:{self.ports['gateway']}{PREFIX}/"}
        if self.args.direct:
            agents["direct"] = f"ws://127.0.0.1:{self.ports['echo']}/"
        return agents

    def run_wstest(self, cases: list[str], exclude: list[str]) -> tuple[dict[str, Any], float]:
        outdir = self.workdir / "reports"
        spec = {
            "outdir": str(outdir),
            "servers": [{"agent": name, "url": url} for name, url in self.agents().items()],
            "cases": cases,
            "exclude-cases": exclude,
            "exclude-agent-cases": {},
        }
        spec_path = self.workdir / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=2) + "\n")
        wstest_log = self.workdir / "wstest.log"
        started = time.monotonic()
        with open(wstest_log, "wb") as out:
            proc = self.procs.start(
                "wstest",
                [self.wstest, "-m", "fuzzingclient", "-s", str(spec_path)],
                cwd=self.workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            while True:
                try:
                    proc.wait(30)
                    break
                except subprocess.TimeoutExpired:
                    done = wstest_log.read_bytes().count(b"Running test case ID")
                    log(f"{done} case runs so far ({time.monotonic() - started:.0f} s, every agent)")
                if self.gateway is not None and self.gateway.poll() is not None:
                    raise BenchError(f"the gateway exited with code {self.gateway.returncode} during the run")
        elapsed = time.monotonic() - started
        index = outdir / "index.json"
        if proc.returncode or not index.exists():
            tail = wstest_log.read_text(errors="replace").strip().splitlines()[-5:]
            raise BenchError(f"wstest exited with code {proc.returncode}:\n" + "\n".join(tail))
        return json.loads(index.read_text()), elapsed

    # -- the verdict ----------------------------------------------------------------------------

    def summarize(self, results: dict[str, dict[str, Any]], elapsed: float) -> bool:
        """Print the gateway's results (and the direct baseline's differences); True if it passed."""
        gateway = results.get("gateway", {})
        if not gateway:
            print("FAIL: the harness reported no case for the gateway")
            return False
        counts = Counter(case["behavior"] for case in gateway.values())
        closes = Counter(case["behaviorClose"] for case in gateway.values())
        agents = " and ".join(self.agents())
        print(f"\ngateway: {len(gateway)} cases (wstest ran {agents} in {elapsed:.1f} s)")
        for result in (*RESULT_ORDER, *sorted(set(counts) - set(RESULT_ORDER))):
            print(f"  {result:<16}{counts.get(result, 0):>5}")
        print("  close behaviour: " + ", ".join(f"{k} {v}" for k, v in sorted(closes.items())))

        reports = self.workdir / "reports"
        not_ok = sorted(
            (c for c, v in gateway.items() if (v["behavior"], v["behaviorClose"]) != ("OK", "OK")),
            key=case_key,
        )
        failing = []
        if not_ok:
            print(f"\nnot OK ({len(not_ok)}): case, result, close behaviour, close code received, ms")
        for case_id in not_ok:
            case = gateway[case_id]
            line = (
                f"  {case_id:<9}{case['behavior']:<15}close {case['behaviorClose']:<15}"
                f"{case.get('remoteCloseCode')!s:<6}{case.get('duration', 0):>6}"
            )
            if case["behavior"] != "UNIMPLEMENTED":
                line += f"  {self.describe(reports, case)}"
            print(line.rstrip())
        for case_id in sorted(gateway, key=case_key):
            case = gateway[case_id]
            if case["behavior"] not in PASSING or case["behaviorClose"] not in PASSING_CLOSE:
                failing.append(case_id)

        if self.args.direct:
            self.print_baseline_diff(gateway, results.get("direct", {}))

        if failing:
            print(f"\nFAIL: {len(failing)} case(s) failed or did not close as required:")
            for case_id in failing:
                case = gateway[case_id]
                detail = self.case_detail(reports, case)
                print(f"  {case_id}: {case['behavior']} / close {case['behaviorClose']}: {detail}")
            return False
        print("\nPASS: no case FAILED; every close OK or INFORMATIONAL")
        return True

    @staticmethod
    def describe(reports: Path, case: dict[str, Any]) -> str:
        try:
            text = json.loads((reports / case["reportfile"]).read_text())["description"]
        except (OSError, KeyError, ValueError):
            return ""
        text = " ".join(re.sub(r"<[^>]*>", " ", text).split())
        return text if len(text) <= 70 else text[:67] + "..."

    @staticmethod
    def case_detail(reports: Path, case: dict[str, Any]) -> str:
        try:
            report = json.loads((reports / case["reportfile"]).read_text())
        except (OSError, KeyError, ValueError):
            return "(no case report)"
        return f"{report.get('result', '')} / {report.get('resultClose', '')}"

    @staticmethod
    def print_baseline_diff(gateway: dict[str, Any], direct: dict[str, Any]) -> None:
        def outcome(case: dict[str, Any]) -> tuple[Any, ...]:
            return case["behavior"], case["behaviorClose"], case.get("remoteCloseCode")

        counts = Counter(case["behavior"] for case in direct.values())
        print(
            f"\ndirect (the echo server without the gateway): {len(direct)} cases; "
            + ", ".join(f"{r} {counts[r]}" for r in RESULT_ORDER if counts.get(r))
        )
        differ = sorted(
            (c for c in set(gateway) & set(direct) if outcome(gateway[c]) != outcome(direct[c])), key=case_key
        )
        print(f"cases whose result differs from direct: {len(differ)}")
        for case_id in differ:
            g, d = outcome(gateway[case_id]), outcome(direct[case_id])
            print(f"  {case_id:<9}direct {d[0]}/{d[1]}/{d[2]}  gateway {g[0]}/{g[1]}/{g[2]}")

    def gateway_log_summary(self) -> str:
        path = self.workdir / "gateway.log"
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            return "gateway log: unreadable"
        tracebacks = sum("Traceback" in line for line in lines)
        return f"gateway log (LOG_LEVEL=WARNING): {len(lines)} lines, {tracebacks} with a Traceback"


def wstest_version(wstest: str) -> str:
    try:
        proc = subprocess.run([wstest, "-a"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return ", ".join(line.strip() for line in proc.stdout.splitlines() if line.strip()) or "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wstest", help="the wstest executable (default: wstest on the PATH)")
    parser.add_argument(
        "--cases",
        nargs="+",
        metavar="PATTERN",
        help="case ids or patterns ('1.*', '7.7.1'); nothing is excluded then (default: * but 12.*, 13.*)",
    )
    parser.add_argument("--keep", metavar="DIR", help="write reports, logs and config to DIR and keep them")
    parser.add_argument(
        "--direct", action="store_true", help="also run the cases against the echo server, as a baseline"
    )
    args = parser.parse_args(argv)
    wstest = find_wstest(args.wstest)
    if wstest is None:
        return 2

    cases = args.cases or ["*"]
    exclude = [] if args.cases else list(DEFAULT_EXCLUDE)
    commit = (git_commit() or "?")[:7]
    print(f"Autobahn|Testsuite fuzzing client through the gateway at {commit} ({wstest_version(wstest)})")
    print(f"cases: {' '.join(cases)}", end="")
    if exclude:
        print(f", excluding {' '.join(exclude)}: {EXCLUDE_REASON}; --cases overrides", end="")
    print(flush=True)

    run = Run(args, wstest)

    stop_on_sigterm()
    status = 1
    try:
        run.setup()
        log(f"echo server on {run.ports['echo']}, gateway on {run.ports['gateway']}; running wstest")
        results, elapsed = run.run_wstest(cases, exclude)
        status = 0 if run.summarize(results, elapsed) else 1
        print(run.gateway_log_summary())
    except BenchError as exc:
        log(f"FAILED: {exc}")
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    except Exception:
        log("FAILED with an unexpected error:\n" + traceback.format_exc())
    finally:
        run.procs.stop_all()
        if run.workdir != Path():
            if args.keep or status == 1:
                # A failed run keeps its reports: the case files say what the harness saw.
                log(f"reports, logs and config in {run.workdir} (open reports/index.html)")
            else:
                shutil.rmtree(run.workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
