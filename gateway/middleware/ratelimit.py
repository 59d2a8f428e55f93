"""Rate limits, in two stages around authentication.

    ... routing -> ratelimit_middleware(stage="ip") -> auth -> ratelimit_middleware(stage="subject") ...

Every routed request is charged to exactly one bucket per route prefix:

- anonymous requests (no ``Authorization`` header, ``auth: none`` routes, auth disabled): the client
  address's bucket, charged by the ``ip`` stage before anything else runs;
- requests that carry a token: the ``ip`` stage lets them through uncharged; if authentication
  fails (any error before an identity is set) the failure is charged to the address's bucket
  afterwards, and once that bucket is empty the ``ip`` stage answers 429 *before* verifying further
  tokens from that address (a flood of bad tokens costs one dict lookup each), except tokens the
  verifier already knows to be good (``known_token``, a cache lookup): a user behind the same NAT
  as the flooder keeps working; if authentication succeeds, the ``subject`` stage charges the token
  subject's bucket.

So a user behind a shared NAT is limited as themself, not as the whole NAT; an address sending
bad tokens is limited like an anonymous client. IPv6 clients are bucketed by their /64: one host
usually owns a whole /64 and could otherwise rotate addresses at will.

A bucket belongs to one limit: its key names the client, the route prefix and the limit's numbers
(``ip:198.51.100.7:/api/v1/chat:100/60``). A limit changed by a restart or a reload starts fresh
buckets, so a raised limit applies at once to clients the old one had stopped (and a lowered one
gives each client the new burst once); the same numbers, however spelled, find the same buckets,
so neither is a way out of a limit that stayed. The old keys expire as they would have anyway.

Headers: each stage stores the headers in ``request[ratelimit_headers_key]``, and
``stamp_ratelimit_headers`` (registered in ``app.on_response_prepare``) sets them on every response
as it is sent, streamed or not, errors included, replacing any an upstream sent (the gateway's
limits are the ones the client runs into)::

    RateLimit-Policy: "default";q=100;w=60           (IETF draft-ietf-httpapi-ratelimit-headers-11)
    RateLimit: "default";r=99;t=1                    r: remaining, t: seconds until full again
    RateLimit-Limit: 100  RateLimit-Remaining: 99  RateLimit-Reset: 1     (draft-06, as Kong sends)
    X-RateLimit-Limit: 100  X-RateLimit-Remaining: 99  X-RateLimit-Reset: 1 (delta seconds)
    Retry-After: 1                                   on 429 only; rounded up, never early

The policy is named ``"default"`` when ``RATE_LIMIT_DEFAULT`` applies and ``"route"`` when the
route sets its own ``rate_limit``. On a 429 the ``t`` of ``RateLimit`` equals ``Retry-After``;
``X-RateLimit-Reset`` is always the time until the bucket is full again.

Three spellings because clients read three: the current draft's two fields, the separate
``RateLimit-Limit/-Remaining/-Reset`` of its earlier drafts (what Kong sends, and what most
client libraries and API checkers look for under "RateLimit-*"), and the older ``X-`` names.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, NamedTuple

from aiohttp import web
from aiohttp.typedefs import Handler

from ..clientip import IPNetwork, client_ip
from ..errors import ApiError
from ..keys import auth_key, client_ip_key, ratelimit_headers_key, route_key
from ..limiter import Decision, Limiter, MemoryLimiter
from ..settings import RateLimit, Route
from .auth import QUERY_TOKEN, presented_token

__all__ = [
    "ratelimit_headers",
    "ratelimit_middleware",
    "request_client_ip",
    "set_ratelimit_headers",
    "stamp_ratelimit_headers",
]

STAGES = ("ip", "subject")
# Bounds the "address is over its limit" memo of the ip stage; it only saves work, so losing it
# costs a token verification and a limiter call, never correctness.
_MAX_BLOCKED = 10_000


class Policy(NamedTuple):
    """A route's limit, its name, and what is the same for every request under it."""

    limit: RateLimit
    name: str  # "route" or "default"
    policy_header: str  # RateLimit-Policy
    limit_header: str  # RateLimit-Limit, X-RateLimit-Limit
    bucket_suffix: str  # ends every bucket key of this route under this limit


def make_policy(prefix: str, name: str, limit: RateLimit) -> Policy:
    # The limit's numbers end the bucket key (module docstring): a bucket's TAT only means
    # something under the limit that wrote it. Built once per policy, not per request. "%.17g"
    # writes any period exactly, and a whole one as an integer (60.0 -> "60").
    suffix = f":{prefix}:{limit.limit}/{limit.period:.17g}"
    header = f'"{name}";q={limit.limit};w={math.ceil(limit.period)}'
    return Policy(limit, name, header, str(limit.limit), suffix)


def ratelimit_headers(policy: Policy, decision: Decision) -> dict[str, str]:
    """The response headers for one decision (see the module docstring)."""
    reset = math.ceil(decision.reset_after)
    reset_header = str(reset)
    remaining = str(decision.remaining)
    name = policy.name
    headers = {
        "RateLimit-Policy": policy.policy_header,
        "RateLimit": f'"{name}";r={remaining};t={reset}',
        "RateLimit-Limit": policy.limit_header,
        "RateLimit-Remaining": remaining,
        "RateLimit-Reset": reset_header,
        "X-RateLimit-Limit": policy.limit_header,
        "X-RateLimit-Remaining": remaining,
        "X-RateLimit-Reset": reset_header,
    }
    if not decision.allowed:
        retry = str(max(1, math.ceil(decision.retry_after)))
        headers["Retry-After"] = retry
        headers["RateLimit"] = f'"{name}";r=0;t={retry}'
    return headers


def request_client_ip(request: web.Request, trusted: Sequence[IPNetwork]) -> str:
    """The client address of ``request``, resolved once and kept in ``request[client_ip_key]``."""
    ip = request.get(client_ip_key)
    if ip is None:
        ip = request[client_ip_key] = client_ip(
            request.remote, request.headers.getall("X-Forwarded-For", ()), trusted
        )
    return ip


def _ip_bucket(ip: str) -> str:
    if ":" not in ip:
        return ip
    try:
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    except ValueError:
        return ip


def ratelimit_middleware(
    *,
    limiter: Limiter,
    default: RateLimit,
    stage: Literal["ip", "subject"],
    trusted_proxies: Sequence[IPNetwork] = (),
    auth_enabled: bool = True,
    known_token: Callable[[str], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Any:
    """Limit routed requests per route prefix; ``stage`` picks the bucket (see module docstring).

    ``limiter`` is shared by both stages. ``trusted_proxies`` and ``auth_enabled`` matter to the
    ``ip`` stage only: with auth disabled every request is anonymous and charged up front.
    ``clock`` times the ``ip`` stage's memo of refused addresses; give it the limiter's in tests.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    trusted = tuple(trusted_proxies)
    policies: dict[str, Policy] = {}
    blocked: dict[str, tuple[float, float, dict[str, str]]] = {}  # key: (retry at, full at, headers)

    def policy_for(route: Route) -> Policy:
        policy = policies.get(route.prefix)
        limit = route.rate_limit or default
        # A reload brings new Route objects: a prefix whose limit changed gets a new policy.
        if policy is None or policy.limit is not limit:
            name = "route" if route.rate_limit else "default"
            policy = policies[route.prefix] = make_policy(route.prefix, name, limit)
        return policy

    # The in-memory limiter decides without I/O: called directly, not through a coroutine.
    hit_now = limiter.hit_now if isinstance(limiter, MemoryLimiter) else None

    def settle(request: web.Request, key: str, policy: Policy, decision: Decision) -> None:
        headers = request[ratelimit_headers_key] = ratelimit_headers(policy, decision)
        if not decision.allowed:
            if stage == "ip":
                if len(blocked) >= _MAX_BLOCKED:
                    blocked.clear()
                # Keyed like the bucket, so a changed limit does not find the old refusal.
                now = clock()
                blocked[key] = (now + decision.retry_after, now + decision.reset_after, headers)
            raise ApiError(429, "Too Many Requests", headers=headers)

    async def charge(request: web.Request, key: str, policy: Policy) -> None:
        """Charge ``key``; 429 when it is over. The headers go on whatever answer goes out, an
        error's too, through ``stamp_ratelimit_headers``."""
        settle(request, key, policy, await limiter.hit(key, policy.limit))

    async def charged(request: web.Request, handler: Handler, key: str, policy: Policy) -> web.StreamResponse:
        await charge(request, key, policy)
        return await handler(request)

    def pass_on(
        request: web.Request, handler: Handler, key: str, policy: Policy
    ) -> Awaitable[web.StreamResponse]:
        if hit_now is None:
            return charged(request, handler, key, policy)
        settle(request, key, policy, hit_now(key, policy.limit))
        return handler(request)

    if stage == "subject":

        @web.middleware
        def ratelimit_subject(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
            route = request.get(route_key)
            identity = request.get(auth_key)
            if route is None or identity is None:
                return handler(request)  # not routed, or anonymous: the ip stage charged it
            policy = policy_for(route)
            return pass_on(request, handler, f"sub:{identity.subject}{policy.bucket_suffix}", policy)

        return ratelimit_subject

    @web.middleware
    def ratelimit_ip(request: web.Request, handler: Handler) -> Awaitable[web.StreamResponse]:
        route = request.get(route_key)
        if route is None:
            return handler(request)
        policy = policy_for(route)
        key = f"ip:{_ip_bucket(request_client_ip(request, trusted))}{policy.bucket_suffix}"
        if not (
            auth_enabled
            and route.auth != "none"
            and ("Authorization" in request.headers or QUERY_TOKEN in request.raw_path)
        ):
            return pass_on(request, handler, key, policy)
        return with_token(request, handler, key, policy)

    async def with_token(
        request: web.Request, handler: Handler, key: str, policy: Policy
    ) -> web.StreamResponse:
        """A token to verify: charged here only if it turns out bad."""
        memo = blocked.get(key)
        if memo is not None:
            until, full_at, headers = memo
            now = clock()
            left = until - now
            if left > 0 and not (known_token is not None and known_token(presented_token(request))):
                raise ApiError(429, "Too Many Requests", headers=_refused_again(headers, left, full_at - now))
            del blocked[key]
        try:
            response = await handler(request)
        except ApiError:
            if auth_key in request or ratelimit_headers_key in request:
                raise  # authenticated (the subject stage charged it) or already charged
            await charge(request, key, policy)  # raises 429 when this was one too many
            raise
        if auth_key not in request and ratelimit_headers_key not in request:
            # Not authenticated yet answered: the auth layer let it pass anonymously. Charge it
            # late rather than not at all (the next one over the limit is stopped up front).
            try:
                await charge(request, key, policy)  # the headers go on as it is sent
            except ApiError:
                del request[ratelimit_headers_key]  # over the limit: this answer goes out as it is
        return response

    return ratelimit_ip


def _refused_again(headers: dict[str, str], left: float, full_in: float) -> dict[str, str]:
    """The remembered refusal's headers, with its times counted down to now: the reset of the
    first refusal, repeated, told a client the bucket was full later than it was."""
    retry = max(1, math.ceil(left))
    reset = str(max(retry, math.ceil(full_in)))
    policy = headers["RateLimit"].partition(";")[0]
    return {
        **headers,
        "Retry-After": str(retry),
        "RateLimit": f"{policy};r=0;t={retry}",
        "RateLimit-Reset": reset,
        "X-RateLimit-Reset": reset,
    }


async def stamp_ratelimit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare``: the rate-limit headers reach every response, streamed too."""
    set_ratelimit_headers(request, response)


def set_ratelimit_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = request.get(ratelimit_headers_key)
    if headers:
        response.headers.update(headers)
