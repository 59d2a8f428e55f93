"""The command line, ``python -m gateway [serve|up|check-config|token]``: the one place that reads
the environment."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial

from . import __version__
from .app import create_app
from .claims import is_scope_token, subject_problem
from .devauth import mint_token
from .logs import configure_logging
from .reload import reload_routes
from .server import Listener, StartupError, run, run_workers, serve
from .settings import Settings, SettingsError, load_settings

log = logging.getLogger("gateway")


def _settings(environ: dict[str, str] | None = None) -> Settings:
    try:
        return load_settings(environ)
    except SettingsError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _fail(message: str) -> int:
    print(f"gateway: {message}", file=sys.stderr, flush=True)
    return 2


MIN_HS256_SECRET = 32  # bytes: the hash's output size, as RFC 7518 section 3.2 requires


def _warn_about(settings: Settings) -> None:
    if not settings.auth.enabled:
        log.warning("AUTH_ENABLED=false: requests are NOT authenticated")
    elif not (settings.auth.jwks_url or settings.auth.jwt_secret):
        log.warning(
            "no AUTH_JWKS_URL or AUTH_JWT_SECRET: every route with auth: required answers 401 "
            "(set one, or use `python -m gateway up` for a development secret)"
        )
    secret = settings.auth.jwt_secret
    if settings.auth.enabled and secret is not None and len(secret.encode()) < MIN_HS256_SECRET:
        log.warning(
            f"AUTH_JWT_SECRET is shorter than the {MIN_HS256_SECRET} bytes HS256 needs (RFC 7518 "
            "section 3.2): tokens signed with it can be forged by guessing it",
            extra={"length": len(secret.encode())},
        )
    everyone = [str(net) for net in settings.trusted_proxies if net.prefixlen == 0]
    if everyone:
        # Accepted, as a deliberate choice behind a load balancer that overwrites the header, but
        # a surprise anywhere else: any client then picks its own address and rate-limit bucket.
        log.warning(
            "TRUSTED_PROXIES trusts every address: any client's X-Forwarded-For is believed",
            extra={"trusted": everyone},
        )


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _settings()
    configure_logging(settings.log_level, settings.log_format)
    _warn_about(settings)

    # What a worker started now serves: the supervisor reads the file again on SIGHUP, as its
    # workers do, so one that replaces a dead worker does not bring back the start-up routes.
    in_force = settings

    def worker(ready: Callable[[], None]) -> None:
        configure_logging(in_force.log_level, in_force.log_format)
        app = create_app(in_force)
        run(
            serve(
                [Listener(app, in_force.host, in_force.port, "gateway", "GATEWAY_HOST, GATEWAY_PORT")],
                shutdown_timeout=in_force.shutdown_timeout,
                reuse_port=in_force.workers > 1,
                on_started=lambda _bound: ready(),
                on_hangup=partial(reload_routes, app),
            )
        )

    def reread() -> None:
        nonlocal in_force
        try:
            in_force = load_settings()
        except Exception:  # the workers log the refusal and keep their tables; so does this
            pass

    try:
        if settings.workers == 1:
            worker(lambda: None)
            return 0
        log.info("starting workers", extra={"workers": settings.workers})
        return run_workers(settings.workers, worker, on_hangup=reread)
    except StartupError as exc:
        return _fail(str(exc))


def cmd_up(args: argparse.Namespace) -> int:
    from .up import run_up

    return run_up(_settings())


def cmd_check_config(args: argparse.Namespace) -> int:
    environ = dict(os.environ)
    if args.file:
        environ["GATEWAY_CONFIG"] = args.file
        try:
            settings = load_settings(environ)
        except SettingsError as exc:
            # The file came as the argument: naming GATEWAY_CONFIG, which may be unset, would mislead.
            print(
                f"gateway: configuration error: {str(exc).removeprefix('GATEWAY_CONFIG: ')}", file=sys.stderr
            )
            return 2
    else:
        settings = _settings(environ)
    source = settings.config_file or "built-in default table"
    print(f"configuration OK ({source})\n")
    print("services:")
    services = []
    for service in settings.services.values():
        t = service.timeout
        detail = (
            f"(health {service.health_path}, connect {t.connect:g}s, read {t.read:g}s, "
            f"eject {service.eject_seconds:g}s)"
        )
        services.append((service.name, ", ".join(service.urls), detail))
    print("\n".join(_aligned(services)))
    print("\nroutes (longest prefix wins):")
    routes = [("prefix", "service", "max_body", "rate_limit", "auth", "scopes", "strip", "content_types")]
    for route in sorted(settings.routes, key=lambda r: r.prefix):
        max_body = "unlimited" if route.max_body is None else _human(route.max_body)
        rate = str(route.rate_limit) if route.rate_limit else f"{settings.rate_limit_default} (default)"
        scopes = ",".join(route.scopes) or "-"
        strip = "yes" if route.strip_prefix else "no"
        types = ",".join(route.content_types)
        routes.append((route.prefix, route.service, max_body, rate, route.auth, scopes, strip, types))
    print("\n".join(_aligned(routes, right={2})))
    return 0


def _aligned(rows: list[tuple[str, ...]], right: frozenset[int] | set[int] = frozenset()) -> list[str]:
    """``rows`` as lines of columns, each as wide as its widest cell: a long prefix or service
    name must not push the rest of its line out of its columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  "
        + " ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def _human(size: int) -> str:
    for unit, factor in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def cmd_token(args: argparse.Namespace) -> int:
    settings = _settings()
    if args.ttl <= 0:
        return _fail("--ttl must be a positive number of seconds")
    # The gateway's own rules: a token it would refuse (or whose scope it would ignore) is no use.
    problem = subject_problem(args.sub)
    if problem is not None:
        return _fail(f"--sub: {problem}; the gateway would refuse the token")
    scopes = [s for value in args.scope for s in value.replace(",", " ").split()]
    for scope in scopes:
        if not is_scope_token(scope):
            return _fail(f"--scope: {scope!r} is not a scope (printable ASCII without spaces, '\"' or '\\')")
    try:
        token = mint_token(settings, subject=args.sub, scopes=scopes, ttl=args.ttl)
    except SettingsError as exc:
        return _fail(f"configuration error: {exc}")
    print(token)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="The platform's API gateway.")
    parser.add_argument("--version", action="version", version=f"gateway {__version__}")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="serve the gateway (the default)")
    commands.add_parser("up", help="gateway + intelligence app + database in one process, for trying it out")
    check = commands.add_parser("check-config", help="validate the config file and print the route table")
    check.add_argument("file", nargs="?", help="YAML config file (default: $GATEWAY_CONFIG)")
    token = commands.add_parser("token", help="mint a signed development token (HS256)")
    token.add_argument("--sub", required=True, help="the token's subject (user id)")
    token.add_argument(
        "--scope", action="append", default=[], help="a granted scope; repeat or space-separate"
    )
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    args = parser.parse_args(argv)
    handlers = {
        "serve": cmd_serve,
        None: cmd_serve,
        "up": cmd_up,
        "check-config": cmd_check_config,
        "token": cmd_token,
    }
    return handlers[args.command](args)
