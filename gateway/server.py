"""Running apps: event loop, listening sockets, signals, graceful drain, worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import gc
import ipaddress
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from aiohttp import web

from .httpserver import GatewayRunner
from .keys import lifecycle_key
from .logs import JsonAccessLogger, flush_logs

__all__ = [
    "GC_THRESHOLD",
    "MALLOC_MMAP_THRESHOLD",
    "MALLOC_TRIM_THRESHOLD",
    "PROCESS_SIGNALS",
    "ListenError",
    "Listener",
    "StartupError",
    "WorkerStartError",
    "ignore_process_signals",
    "run",
    "run_workers",
    "serve",
    "stop_with_parent",
    "tune_gc",
    "tune_malloc",
]

log = logging.getLogger("gateway.server")


@dataclass(frozen=True)
class Listener:
    app: web.Application
    host: str
    port: int
    name: str
    keys: str = ""  # the settings that chose host and port, named when they cannot be bound


class StartupError(Exception):
    """A problem of the operator's making found while starting, not a bug: ``cli`` prints
    the message as one line and exits 2.

    StartupError
    ├── ListenError        a listener's address cannot be bound
    └── WorkerStartError   a worker process exited before it was serving
    """


class ListenError(StartupError):
    """A listener's address cannot be bound (in use, not local, not resolvable, privileged)."""

    def __init__(self, listener: Listener, error: OSError) -> None:
        host = f"[{listener.host}]" if ":" in listener.host else listener.host
        if isinstance(error, socket.gaierror):
            problem = f"cannot resolve the host: {(error.strerror or str(error)).lower()}"
        elif error.errno:
            problem = os.strerror(error.errno).lower()  # uvloop's own text repeats the address
        else:
            problem = str(error)
        keys = f" ({listener.keys})" if listener.keys else ""
        super().__init__(f"cannot listen on {host}:{listener.port}: {problem}{keys}")
        self.listener = listener


# The collector runs when the count of container objects made and not yet freed passes a
# threshold, 700 by default: right for a script, not for a server with requests in flight, each of
# which holds a few dozen such objects. At 128 connections the count crossed 700 all the time:
# 764 young collections, 69 middle ones and 6 full ones (41 ms each) in 6 s, 14% of the CPU. At
# 10,000 the same load saw one collection and ran 10-14% faster (two A/B runs). Completed
# requests make no reference cycles (tests/gateway/test_gc.py), nor do requests cut off by their
# client, as the upstream connection they drop is freed whole (pool.py): after 640 aborted 1 MiB
# answers a full collection found nothing, and RSS was 109 MiB against 102 MiB at the default
# threshold. Cycles from rarer paths wait longer to be collected, so the threshold is no higher.
GC_THRESHOLD = 10_000


def tune_gc() -> None:
    """Collect by ``GC_THRESHOLD``, and leave what start-up made (modules, classes, settings,
    about 65,000 objects) out of every later collection: a full one took 41 ms with them in."""
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, middle, old)


# glibc's malloc, left to its defaults, gives the top of its heap back to the kernel as soon as more
# than twice its (adaptive) mmap threshold lies free there, and takes it back on the next large
# allocation: the body chunks a proxy passes on (bytes objects of 64-256 KiB, beyond pymalloc's
# 512 bytes) kept arriving in fresh pages, each faulted in and zeroed by the kernel. Relaying
# 1 MiB answers at 32 connections took 51 page faults and a brk call every other request; with
# the heap kept, none, and 20% more requests per second (three interleaved A/B runs). Memory a
# burst of traffic used stays with the process, up to MALLOC_TRIM_THRESHOLD of it free; blocks
# above MALLOC_MMAP_THRESHOLD (rare: a whole large body read for validation) still get their own
# mapping and go back to the kernel when freed.
MALLOC_TRIM_THRESHOLD = 32 * 1024**2
MALLOC_MMAP_THRESHOLD = 4 * 1024**2
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h


def tune_malloc() -> bool:
    """Apply the thresholds above, unless the environment sets malloc's own (``GLIBC_TUNABLES``,
    ``MALLOC_*_``): an operator's choice wins. False where the C library has no such settings."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        name.startswith("MALLOC_") and name.endswith("_") for name in os.environ
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - not glibc (macOS)
        return False
    # mallopt returns 1 on success; musl's is a stub that returns 0.
    return bool(mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)) and bool(
        mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    )


LISTEN_BACKLOG = 1024


def _site(runner: GatewayRunner, listener: Listener, *, reuse_port: bool) -> web.BaseSite:
    """Where ``listener`` is served: ``::`` is one socket that takes both IPv4 and IPv6 clients.

    asyncio and uvloop set ``IPV6_V6ONLY`` on every IPv6 socket they bind, so ``::`` took IPv6
    clients only and IPv4 ones were refused: on a dual-stack pod, kubelet's probes and half the
    Service's traffic. Go's listeners (Traefik) take both families on ``[::]``, as do Envoy's with
    ``ipv4_compat`` and nginx's with ``ipv6only=off``; an IPv4 client then shows up as
    ``::ffff:10.0.0.5``, which the request handler (``httpserver``) reads back as 10.0.0.5. Any
    other address, or a host name, is bound as given.

    On a kernel without IPv6 (booted with ``ipv6.disable=1``), ``::`` means every IPv4 address,
    as Go's listeners fall back: the image's default must not keep such a host from serving.
    """
    if _is_ipv6_any(listener.host):
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        except OSError as exc:
            if exc.errno != errno.EAFNOSUPPORT:
                raise
            log.warning(
                f"{listener.name}: :: asked for, but this kernel has no IPv6: listening on 0.0.0.0 instead",
                extra={"port": listener.port},
            )
            return web.TCPSite(
                runner, "0.0.0.0", listener.port, reuse_port=reuse_port, backlog=LISTEN_BACKLOG
            )
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind(("::", listener.port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return web.SockSite(runner, sock, backlog=LISTEN_BACKLOG)
    return web.TCPSite(runner, listener.host, listener.port, reuse_port=reuse_port, backlog=LISTEN_BACKLOG)


def _is_ipv6_any(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.version == 6 and address.is_unspecified


# What a serving process answers: stop (SIGTERM, SIGINT) and reload (SIGHUP).
PROCESS_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})


def stop_signals_now() -> tuple[signal.Signals, ...]:
    """The signals that stop the process: SIGTERM, and SIGINT unless it is ignored now."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        return (signal.SIGTERM,)
    return (signal.SIGTERM, signal.SIGINT)


def ignore_process_signals() -> None:
    """Once nothing is left to stop or reload. Ignored rather than reset: a default action would
    turn a drained process's exit code into -15, -2 (a KeyboardInterrupt) or 129, and the
    interpreter's exit resets a Python handler to it. A handler is replaced by SIG_IGN in one
    sigaction, so no default action is ever in force between the two."""
    for signum in PROCESS_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def run(main: Coroutine[Any, Any, None], *, fast_loop: bool = True) -> None:
    """Run ``main`` on uvloop when it is installed and ``fast_loop``, on asyncio's loop otherwise."""
    loop_factory = None
    if fast_loop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main)


async def serve(
    listeners: Sequence[Listener],
    *,
    shutdown_timeout: float,
    reuse_port: bool = False,
    on_listening: Callable[[Listener, int], None] | None = None,
    on_started: Callable[[Sequence[tuple[Listener, int]]], None] | None = None,
    on_hangup: Callable[[], Awaitable[object]] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain; on SIGHUP run ``on_hangup`` (a reload).

    Without ``on_hangup`` SIGHUP drains and stops too, as a terminal's hangup means (the default
    action ended the process at once, in-flight requests cut off and ``up``'s embedded PostgreSQL
    left running), unless it was ignored when the process started (``nohup``).

    ``on_listening(listener, port)`` runs as each listener is bound, before the next one is set
    up: a later app may be told where an earlier one listens (port 0 binds an ephemeral port).
    ``on_started`` runs once all are bound, with every listener and its port.

    Draining: readiness turns 503, listening sockets close, in-flight requests get up to
    ``shutdown_timeout`` seconds to finish, then connections are closed and resources released.
    An address that cannot be bound raises ListenError, after what was started is cleaned up.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Plain handlers, not loop.add_signal_handler: its removal (ours at the end, or the loop's
    # when it closes) restores the default actions, and a signal that came between that and the
    # exit ended a drained process with -15, 129 (SIGHUP) or a KeyboardInterrupt traceback instead
    # of 0 (and `up` with its embedded PostgreSQL left running): a second Ctrl-C, a reloader's
    # SIGHUP. A plain handler is replaced by SIG_IGN in one sigaction, so no default action is ever
    # in force. They run on the main thread, where the loop runs, and call_soon_threadsafe wakes
    # it, so an idle gateway acts at once.
    # SIGINT ignored at start stays ignored, as Python itself leaves it: a shell starts a
    # background job so, and the terminal's Ctrl-C, sent to the whole process group, is not for it.
    for signum in stop_signals_now():
        signal.signal(signum, lambda _signum, _frame: loop.call_soon_threadsafe(stop.set))
    hangups: set[asyncio.Task[object]] = set()
    taking_hangups = on_hangup is not None or signal.getsignal(signal.SIGHUP) != signal.SIG_IGN
    if taking_hangups:

        def hangup() -> None:
            if not taking_hangups:  # scheduled by a signal that came just before the drain ended
                return
            if on_hangup is None:
                stop.set()
                return
            task = loop.create_task(on_hangup())  # type: ignore[arg-type]
            hangups.add(task)
            task.add_done_callback(hangups.discard)

        signal.signal(signal.SIGHUP, lambda _signum, _frame: loop.call_soon_threadsafe(hangup))
        # A worker is forked with SIGHUP blocked (run_workers), and `python -m gateway` blocks
        # it as it starts: one sent meanwhile is delivered now, to the handler, rather than lost.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    runners: list[GatewayRunner] = []
    bound: list[tuple[Listener, int]] = []
    try:
        for listener in listeners:
            runner = GatewayRunner(
                listener.app,
                handle_signals=False,
                access_log_class=JsonAccessLogger,
                access_log=logging.getLogger(f"{listener.name}.access"),
                handler_cancellation=True,
                shutdown_timeout=shutdown_timeout,
            )
            await runner.setup()
            runners.append(runner)
            try:
                site = _site(runner, listener, reuse_port=reuse_port)
                await site.start()
            except OSError as exc:
                raise ListenError(listener, exc) from exc
            server = site._server
            port = server.sockets[0].getsockname()[1] if server and server.sockets else listener.port
            bound.append((listener, port))
            log.info("listening", extra={"app": listener.name, "host": listener.host, "port": port})
            if on_listening is not None:
                on_listening(listener, port)
        tune_gc()
        tune_malloc()
        if on_started is not None:
            on_started(bound)
        await stop.wait()
        log.info("draining", extra={"timeout_s": shutdown_timeout})
    finally:
        for listener in listeners:
            if lifecycle_key in listener.app:
                listener.app[lifecycle_key].draining = True
        for runner in reversed(runners):
            await runner.cleanup()
        # Drained; and before the loop closes, where the handlers' call_soon_threadsafe would raise.
        ignore_process_signals()
        taking_hangups = False
    log.info("stopped")


_PR_SET_PDEATHSIG = 1  # from linux/prctl.h


def stop_with_parent(parent: int) -> bool:
    """Have the kernel send this process SIGTERM when ``parent`` (the supervisor that forked it)
    dies, however it dies. False where there is no such thing (not Linux).

    A supervisor killed with SIGKILL (or by the OOM killer, or a bug) cannot pass anything on: its
    workers went on serving as orphans, holding the port with SO_REUSEPORT, so a supervisor started
    again on it shared the traffic with workers serving the old configuration, which nothing would
    ever stop. The SIGTERM drains them like any other.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return False
    if prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:  # pragma: no cover
        return False
    if os.getppid() != parent:  # it died before the request took effect: nothing would come
        os.kill(os.getpid(), signal.SIGTERM)
    return True


class WorkerStartError(StartupError):
    """A worker exited before it was serving; the message is its own reason when it gave one."""


@dataclass(eq=False)
class _Worker:
    process: multiprocessing.process.BaseProcess
    reports: Connection  # from the worker: None once it serves, else why it could not start
    serving: bool = False
    failure: str | None = None

    def read_reports(self) -> None:
        while not self.reports.closed and self.reports.poll():
            try:
                report = self.reports.recv()
            except EOFError:
                self.reports.close()
                return
            if report is None:
                self.serving = True
            else:
                self.failure = report


def run_workers(
    count: int, target: Callable[[Callable[[], None]], None], *, on_hangup: Callable[[], None] | None = None
) -> int:
    """Fork ``count`` processes that each bind the port with SO_REUSEPORT; supervise them.

    ``target(ready)`` runs in each worker and calls ``ready()`` once it serves. A worker that dies
    after that is replaced (at most once a second). One that exits before (its address cannot be
    bound, its app cannot be built) would fail the same way again: the other workers are stopped
    and WorkerStartError says why, once. SIGTERM and SIGINT are passed on to every worker, and the
    supervisor returns when all of them have drained. SIGHUP (reload) is passed on too, and
    nothing stops; ``on_hangup`` runs in the supervisor first, so that a worker it starts later
    serves what the reload put in force. Workers drain and stop when the supervisor dies, even
    by SIGKILL (``stop_with_parent``).
    """
    context = multiprocessing.get_context("fork")
    workers: list[_Worker] = []
    stopping = False
    supervisor = os.getpid()
    stop_signals = stop_signals_now()  # the workers' too: a SIGINT ignored here is ignored there

    def in_worker(reports: Connection) -> None:
        # The supervisor's handlers are no use in a worker: stop plainly until serve() installs
        # the worker's own. SIGHUP stays blocked, as it was at the fork, until then (serve): a
        # reload sent while the worker starts is kept pending, not ignored; the worker would
        # otherwise keep the table it was forked with, older than the supervisor's.
        for signum in (*stop_signals, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGINT})  # see start_worker
        stop_with_parent(supervisor)
        serving = False

        def ready() -> None:
            nonlocal serving
            serving = True
            reports.send(None)

        try:
            target(ready)
        except StartupError as exc:
            if serving:
                raise
            # The supervisor prints it: one line however many workers hit the same problem.
            reports.send(str(exc))
            raise SystemExit(2) from None
        finally:
            ignore_process_signals()  # drained (or failed)
            flush_logs()  # a forked process ends in os._exit, without atexit's flush

    def start_worker(index: int | None = None) -> None:
        """Fork a worker into ``workers`` (appended, or in place of the one at ``index``)."""
        # SIGHUP is held back from the fork until the worker is in the list: a reload that comes
        # meanwhile then reaches it too (the worker inherits the block and takes the signal once
        # its loop can). Forwarded before it was listed, it missed the worker, which kept the
        # table it was forked with. So are SIGTERM and SIGINT: a stop that missed a worker left
        # the supervisor waiting for it forever, and one the worker took before in_worker reset
        # the handlers ran the supervisor's in it (a traceback).
        signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
        try:
            reports, writer = context.Pipe(duplex=False)
            process = context.Process(target=in_worker, args=(writer,), name="gateway-worker", daemon=False)
            process.start()
            writer.close()  # the worker's copy is the only one: its exit closes the pipe
            if index is None:
                workers.append(_Worker(process, reports))
            else:
                workers[index] = _Worker(process, reports)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, PROCESS_SIGNALS)
        if stopping:  # a stop that came before the fork (or a handler run late) did not reach it
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)

    def signal_workers(signum: int) -> None:
        for worker in workers:
            if worker.process.pid and worker.process.is_alive():
                # This runs in a signal handler, which may interrupt the loop below just as it
                # reaped this worker: is_alive() cannot tell then, and the pid is gone. Raised
                # from the handler, ProcessLookupError ended the supervisor with a traceback.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signum)

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        elif on_hangup is not None:
            on_hangup()
        signal_workers(signum)

    for signum in (*stop_signals, signal.SIGHUP):
        signal.signal(signum, forward)
    for _ in range(count):
        start_worker()
    failure: str | None = None
    last_restart = 0.0
    while True:
        running = [w.process.sentinel for w in workers if w.process.exitcode is None]
        multiprocessing.connection.wait(
            running + [w.reports for w in workers if not w.reports.closed], timeout=0.5
        )
        for index, worker in enumerate(workers):
            exited = worker.process.exitcode is not None
            worker.read_reports()  # after the exit check: all a dead worker wrote is read
            if not exited or stopping:
                continue
            if not worker.serving:
                failure = worker.failure or (
                    f"a worker exited with code {worker.process.exitcode} before it was serving"
                )
                stopping = True
                signal_workers(signal.SIGTERM)
                continue
            if time.monotonic() - last_restart < 1.0:
                continue
            log.warning(
                "worker exited; restarting",
                extra={"pid": worker.process.pid, "exitcode": worker.process.exitcode},
            )
            last_restart = time.monotonic()
            start_worker(index)
        if stopping and all(w.process.exitcode is not None for w in workers):
            break
    ignore_process_signals()  # every worker has exited
    for worker in workers:
        worker.reports.close()
    if failure is not None:
        raise WorkerStartError(failure)
    failed = [
        w.process.exitcode for w in workers if w.process.exitcode not in (0, -signal.SIGTERM, -signal.SIGINT)
    ]
    return 1 if failed else 0
