"""The issuer's signing keys (JWKS), fetched over HTTP and cached.

- An unknown ``kid`` triggers a refetch, at most once per ``min_refetch`` seconds counted from
  the previous unknown-kid refetch (not from the cold start or a background refresh, so a key
  published and used right after a load is accepted at once); concurrent misses share that one
  fetch (single-flight). Unknown-kid floods therefore cost one request to the issuer per
  interval, and nothing else.
- Cold start (no key set loaded yet): the first lookups wait for the first fetch, which takes
  at most ``timeout`` seconds. If it fails, the failure is remembered: lookups raise
  ``JwksUnavailable`` at once (no waiting, no fetch of their own), and after ``failure_ttl``
  seconds the next lookup starts one retry behind the requests, which still do not wait for
  it. A dead issuer costs only the very first requests the timeout; one that comes back is
  used from the first retry that succeeds.
- Keys older than ``max_age`` are refreshed in the background on the next lookup; lookups keep
  using the previous set meanwhile and never wait for it. A key the issuer removed (rotated out,
  revoked) is therefore forgotten within ``max_age`` plus one fetch.
- If the issuer cannot be reached once keys were loaded, the last good set stays in use (logged):
  availability over revocation, which only an issuer that is up can announce anyway. A token
  naming a kid outside that set is then simply unknown.

A fetch reads at most ``MAX_JWKS_BYTES``; a larger answer is a failed fetch, cut off there.

Each failed fetch is counted in ``fetch_errors`` by kind (``FETCH_ERROR_KINDS``), which
``/metrics`` reads as ``gateway_jwks_fetch_errors_total``.

Only public signature keys are kept: symmetric (``oct``) keys and keys whose ``use`` is not
``sig`` are ignored, so a JWKS can never turn an HMAC secret into something a token may name.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import jwt

__all__ = [
    "FETCH_ERROR_KINDS",
    "MAX_KEYS_PER_TOKEN",
    "THUMBPRINT_PARAMS",
    "JwksCache",
    "JwksError",
    "JwksUnavailable",
    "fits",
]

log = logging.getLogger("gateway.auth")

_PUBLIC_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})
_KEY_TYPE_ALGS = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC": frozenset({"ES256", "ES384", "ES512"}),
    "OKP": frozenset({"EdDSA"}),
}
_CURVE_ALGS = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
THUMBPRINT_PARAMS = ("x5t#S256", "x5t")
# A real JWKS is a few KB, a few tens with a certificate chain on every key; Nimbus (Spring
# Security's JWKS client) stops at 50 KB. Unbounded, a JWKS URL answering a large file filled
# memory for the whole fetch timeout (200 MB in 3 s on loopback), and decoding it held the event
# loop for over a second.
MAX_JWKS_BYTES = 512 * 1024
# Why a fetch failed: the issuer refused or could not be reached, did not answer in time, closed
# the connection, answered with a status other than 200, or sent something that is not a JWKS
# with a usable key (not HTTP, not JSON, no "keys" list, over MAX_JWKS_BYTES). The first three as
# the upstream errors.
FETCH_ERROR_KINDS = ("connect", "timeout", "reset", "status", "invalid")
# A token that names no key (no kid, no thumbprint a key has) is checked against each key that fits
# its alg, the first this many in the JWKS's order: an issuer that signs without kid publishes one
# key, or two or three around a rotation (the next, the current, the previous). Each is one more
# signature check for every such token, a bad one included.
MAX_KEYS_PER_TOKEN = 4


class JwksError(Exception):
    """The JWKS document could not be fetched or read; ``kind`` is one of ``FETCH_ERROR_KINDS``."""

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


class JwksUnavailable(JwksError):
    """No key set was ever loaded and the issuer cannot be reached now: no token can be judged.

    ``retry_after``: whole seconds (at least 1) until the next fetch may have succeeded.
    """

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JwksCache:
    def __init__(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        min_refetch: float = 30.0,
        max_age: float = 300.0,
        # The longest a request waits for the issuer (only the first ones, at a cold start). A
        # JWKS is a few KB; below 5 s, too, aiohttp does not round the deadline up a second.
        timeout: float = 3.0,
        failure_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._session = session
        self._own_session = session is None
        self._min_refetch = min_refetch
        self._max_age = max_age
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        # Shorter than min_refetch: without any key every token is refused, so the retry that
        # ends that matters more than sparing an issuer one request per few seconds.
        self._failure_ttl = failure_ttl
        self._clock = clock
        self._keys: dict[str, tuple[jwt.PyJWK, ...]] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last attempt, successful or not
        self._miss_fetched_at = -math.inf  # last refetch for a kid the loaded set did not have
        self._failed_at: float | None = None  # last failed fetch, until one succeeds
        self._failure = ""
        self._inflight: asyncio.Future[None] | None = None
        self.fetches = 0
        self.fetch_errors = dict.fromkeys(FETCH_ERROR_KINDS, 0)

    def has(self, kid: str) -> bool:
        return kid in self._keys

    @property
    def keys(self) -> Mapping[str, tuple[jwt.PyJWK, ...]]:
        """Each kid's keys: more than one where the JWKS gives several keys one kid."""
        return self._keys

    async def get(
        self, kid: str | None, thumbprints: Mapping[str, str] | None = None, alg: str | None = None
    ) -> jwt.PyJWK | None:
        """The first of ``candidates`` that ``fits`` ``alg``, else the first, else None."""
        named = await self.candidates(kid, thumbprints, alg)
        if not named:
            return None
        return next((key for key in named if alg is not None and fits(key, alg)), named[0])

    async def candidates(
        self, kid: str | None, thumbprints: Mapping[str, str] | None = None, alg: str | None = None
    ) -> tuple[jwt.PyJWK, ...]:
        """The keys that may have signed a token, in the JWKS's order: those named ``kid``;
        without one, those whose ``x5t#S256`` or ``x5t`` member equals the token's
        (``thumbprints``, header parameter to value); without either (or a thumbprint no key
        has), the first ``MAX_KEYS_PER_TOKEN`` that ``fit`` ``alg``. Named keys are returned
        whether they fit ``alg`` or not: the caller tells "no such key" from "not for this alg".

        Raises ``JwksUnavailable`` while no key set has ever been loaded and the issuer fails.
        """
        now = self._clock()
        if self._fetched_at is None:
            self._cold_start(now)
            if self._inflight is not None and self._failed_at is None:
                await self._refresh_quietly()  # nothing known against the issuer yet: wait for it
            if self._fetched_at is None:
                raise self._unavailable(self._clock())
        elif not self._known(kid, thumbprints, alg):
            # Throttled on its own clock: the first unknown kid after a load (cold start or
            # background refresh) refetches at once, so a key rotated in just after a load is
            # accepted right away; further unknown kids wait out ``min_refetch``.
            if self._inflight is not None or now - self._miss_fetched_at >= self._min_refetch:
                self._miss_fetched_at = now
                await self._refresh_quietly()
        elif now - self._fetched_at >= self._max_age and self._may_fetch(now):
            self._start_refresh()  # stale: refresh behind the lookups, do not wait
        # RFC 7517 section 4.5: keys of one set may share a kid, as equivalent alternatives (an
        # RSA and an EC key, or one RSA key published for RS256 and for PS256).
        named = self._named(kid, thumbprints)
        if not named and kid is None:
            return self._unnamed(alg)
        return named

    def _known(self, kid: str | None, thumbprints: Mapping[str, str] | None, alg: str | None) -> bool:
        """Whether the set holds the token's key: the one it names, or, naming none, one for its alg."""
        if kid is not None or thumbprints:
            return bool(self._named(kid, thumbprints))
        return bool(self._unnamed(alg))

    def _unnamed(self, alg: str | None) -> tuple[jwt.PyJWK, ...]:
        """The keys a token that names none may be verified with: each that fits its ``alg``
        (type, curve, declared ``alg``; ``use`` is ``sig`` for every key kept), as Envoy's
        ``jwt_authn`` tries every key of the JWKS, and at most ``MAX_KEYS_PER_TOKEN`` of them, so
        no token makes the gateway check its signature against a whole large key set."""
        if alg is None:
            return ()
        fitting = (key for keys in self._keys.values() for key in keys if fits(key, alg))
        return tuple(itertools.islice(fitting, MAX_KEYS_PER_TOKEN))

    def _named(self, kid: str | None, thumbprints: Mapping[str, str] | None) -> tuple[jwt.PyJWK, ...]:
        if kid is not None:
            return self._keys.get(kid, ())
        # A certificate's thumbprint names a key as a kid does (RFC 7515 sections 4.1.7-4.1.8),
        # when the JWK carries the same member (RFC 7517 sections 4.8-4.9); a token may name its
        # key by nothing else. SHA-256 first: a SHA-1 thumbprint is the weaker name.
        for param in THUMBPRINT_PARAMS:
            value = (thumbprints or {}).get(param)
            if value is not None:
                named = tuple(
                    key for keys in self._keys.values() for key in keys if key._jwk_data.get(param) == value
                )
                if named:
                    return named
        return ()

    def touch(self) -> None:
        """Start a background refresh if the keys are stale; never waits. Callers that skip
        ``get`` (a verification cache) call this so that removed keys still age out."""
        if self._fetched_at is not None and self._inflight is None:
            now = self._clock()
            if now - self._fetched_at >= self._max_age and self._may_fetch(now):
                self._start_refresh()

    def _cold_start(self, now: float) -> None:
        if self._inflight is None and (self._failed_at is None or now - self._failed_at >= self._failure_ttl):
            self._start_refresh()

    def _unavailable(self, now: float) -> JwksUnavailable:
        if self._inflight is not None or self._failed_at is None:
            retry_after = 1  # a retry is under way
        else:
            retry_after = max(1, math.ceil(self._failed_at + self._failure_ttl - now))
        return JwksUnavailable(f"no signing keys yet: {self._failure}", retry_after)

    def _may_fetch(self, now: float) -> bool:
        if self._inflight is not None:
            return True
        return self._attempted_at is None or now - self._attempted_at >= self._min_refetch

    def _start_refresh(self) -> asyncio.Future[None]:
        if self._inflight is None:
            self._attempted_at = self._clock()
            self._inflight = asyncio.ensure_future(self._fetch_and_store())
            self._inflight.add_done_callback(self._fetch_done)
        return self._inflight

    async def _refresh_quietly(self) -> None:
        """Wait for the fetch under way (starting one if none is); a failure is logged, stored
        and left for the caller to read off the state, never raised."""
        try:
            # shield: a client that disconnects must not cancel the fetch others are waiting for.
            await asyncio.shield(self._start_refresh())
        except JwksError:
            pass

    def _fetch_done(self, future: asyncio.Future[None]) -> None:
        self._inflight = None
        if not future.cancelled() and future.exception() is not None:
            error = {"error": str(future.exception())}
            if self._keys:
                log.warning("JWKS fetch failed; keeping the previous keys", extra=error)
            else:
                log.warning("JWKS fetch failed; no keys yet, tokens it would verify get 503", extra=error)

    async def _fetch_and_store(self) -> None:
        self.fetches += 1
        try:
            keys = parse_jwks(await self._fetch())
            if not keys and self._keys:
                raise JwksError("the JWKS has no usable signing keys")
        except JwksError as exc:
            # Stored here rather than in _fetch_done, so that a waiting lookup sees it on waking.
            self._failed_at, self._failure = self._clock(), str(exc)
            self.fetch_errors[exc.kind] += 1
            raise
        self._keys = keys
        self._fetched_at = self._clock()
        self._failed_at = None

    async def _fetch(self) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        try:
            async with self._session.get(
                self.url, timeout=self._timeout, headers={"Accept": "application/json"}
            ) as response:
                if response.status != 200:
                    raise JwksError(f"{self.url} answered {response.status}", "status")
                body = bytearray()
                # Counted as it arrives, decompressed: a Content-Length may be absent or false.
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise JwksError(f"{self.url}: the JWKS is over {MAX_JWKS_BYTES} bytes", "invalid")
                return json.loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as exc:
            raise JwksError(f"{self.url}: {exc!r}", _error_kind(exc)) from exc

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):  # aiohttp's own timeouts are TimeoutErrors too
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):  # refused, unreachable, not resolvable
        return "connect"
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):  # closed, cut off
        return "reset"
    return "invalid"  # not HTTP, not JSON, nested too deep


def fits(key: jwt.PyJWK, alg: str) -> bool:
    """Whether ``key`` may verify an ``alg`` signature: its type's, its curve's, its own ``alg``."""
    data = key._jwk_data
    kty = data.get("kty")
    if alg not in _KEY_TYPE_ALGS.get(kty, ()):
        return False
    if kty == "EC" and _CURVE_ALGS.get(data.get("crv")) != alg:
        return False
    declared = data.get("alg")
    return declared is None or declared == alg


def parse_jwks(document: Any) -> dict[str, tuple[jwt.PyJWK, ...]]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWKS document (no 'keys' list)")
    keys: dict[str, tuple[jwt.PyJWK, ...]] = {}
    for index, data in enumerate(document["keys"]):
        kty = data.get("kty") if isinstance(data, dict) else None
        if not isinstance(kty, str) or kty not in _PUBLIC_KEY_TYPES:  # a list would not even hash
            continue
        if data.get("use", "sig") != "sig" or "d" in data:  # encryption keys, private keys
            continue
        try:
            key = jwt.PyJWK(data)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            log.warning("JWKS key skipped", extra={"index": index, "error": str(exc)})
            continue
        kid = data.get("kid")
        name = kid if isinstance(kid, str) else f"#{index}"
        keys[name] = (*keys.get(name, ()), key)
    return keys
