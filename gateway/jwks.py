"""The issuer's signing keys (JWKS), fetched over HTTP and cached.

- An unknown ``kid`` triggers a refetch, at most once per ``min_refetch`` seconds counted from
  the previous unknown-kid refetch (not from the cold start or a background refresh, so a key
  published and used right after a load is accepted at once); concurrent misses share that one
  fetch (single-flight). Unknown-kid floods therefore cost one request to the issuer per
  interval, and nothing else. The cold start itself retries at most once per ``min_refetch``.
- Keys older than ``max_age`` are refreshed in the background on the next lookup; lookups keep
  using the previous set meanwhile and never wait for it. A key the issuer removed (rotated out,
  revoked) is therefore forgotten within ``max_age`` plus one fetch.
- If the issuer cannot be reached, the last good set stays in use (logged): availability over
  revocation, which only an issuer that is up can announce anyway.

Only public signature keys are kept: symmetric (``oct``) keys and keys whose ``use`` is not
``sig`` are ignored, so a JWKS can never turn an HMAC secret into something a token may name.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import jwt

__all__ = ["JwksCache", "JwksError"]

log = logging.getLogger("gateway.auth")

_PUBLIC_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})


class JwksError(Exception):
    """The JWKS document could not be fetched or read."""


class JwksCache:
    def __init__(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        min_refetch: float = 30.0,
        max_age: float = 300.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self._session = session
        self._own_session = session is None
        self._min_refetch = min_refetch
        self._max_age = max_age
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # last successful fetch
        self._attempted_at: float | None = None  # last attempt, successful or not
        self._miss_fetched_at = -math.inf  # last refetch for a kid the loaded set did not have
        self._inflight: asyncio.Future[None] | None = None
        self.fetches = 0

    def has(self, kid: str) -> bool:
        return kid in self._keys

    @property
    def keys(self) -> Mapping[str, jwt.PyJWK]:
        return self._keys

    async def get(self, kid: str | None) -> jwt.PyJWK | None:
        """The key named ``kid`` (or the only key when ``kid`` is None and there is one)."""
        now = self._clock()
        if self._fetched_at is None:
            if self._may_fetch(now):
                await self._refresh()
        elif kid is None or kid not in self._keys:
            # Throttled on its own clock: the first unknown kid after a load (cold start or
            # background refresh) refetches at once, so a key rotated in just after a load is
            # accepted right away; further unknown kids wait out ``min_refetch``.
            if self._inflight is not None or now - self._miss_fetched_at >= self._min_refetch:
                self._miss_fetched_at = now
                await self._refresh()
        elif now - self._fetched_at >= self._max_age and self._may_fetch(now):
            self._start_refresh()  # stale: refresh behind the lookups, do not wait
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    def touch(self) -> None:
        """Start a background refresh if the keys are stale; never waits. Callers that skip
        ``get`` (a verification cache) call this so that removed keys still age out."""
        if self._fetched_at is not None and self._inflight is None:
            now = self._clock()
            if now - self._fetched_at >= self._max_age and self._may_fetch(now):
                self._start_refresh()

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

    async def _refresh(self) -> None:
        # shield: a client that disconnects must not cancel the fetch others are waiting for.
        await asyncio.shield(self._start_refresh())

    def _fetch_done(self, future: asyncio.Future[None]) -> None:
        self._inflight = None
        if not future.cancelled() and future.exception() is not None:
            log.warning(
                "JWKS fetch failed; keeping the previous keys", extra={"error": str(future.exception())}
            )

    async def _fetch_and_store(self) -> None:
        self.fetches += 1
        document = await self._fetch()
        keys = parse_jwks(document)
        if not keys and self._keys:
            raise JwksError("the JWKS has no usable signing keys")
        self._keys = keys
        self._fetched_at = self._clock()

    async def _fetch(self) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(trust_env=False)
        try:
            async with self._session.get(
                self.url, timeout=self._timeout, headers={"Accept": "application/json"}
            ) as response:
                if response.status != 200:
                    raise JwksError(f"{self.url} answered {response.status}")
                return await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise JwksError(f"{self.url}: {exc!r}") from exc

    async def close(self) -> None:
        if self._inflight is not None:
            self._inflight.cancel()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None


def parse_jwks(document: Any) -> dict[str, jwt.PyJWK]:
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksError("not a JWKS document (no 'keys' list)")
    keys: dict[str, jwt.PyJWK] = {}
    for index, data in enumerate(document["keys"]):
        if not isinstance(data, dict) or data.get("kty") not in _PUBLIC_KEY_TYPES:
            continue
        if data.get("use", "sig") != "sig" or "d" in data:  # encryption keys, private keys
            continue
        try:
            key = jwt.PyJWK(data)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError) as exc:
            log.warning("JWKS key skipped", extra={"index": index, "error": str(exc)})
            continue
        kid = data.get("kid")
        keys[kid if isinstance(kid, str) else f"#{index}"] = key
    return keys
