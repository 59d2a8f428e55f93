"""A service's targets: round-robin over the healthy ones, passive ejection of failing ones."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from .pool import TargetPool
from .settings import ServiceSettings

__all__ = ["Target", "Upstream"]


@dataclass(eq=False)
class Target:
    url: str  # base URL without a trailing slash; the request's raw path is appended
    ejected_until: float = 0.0
    consecutive_failures: int = 0
    pool: TargetPool = field(init=False)
    base_path: str = field(init=False)  # a target URL may carry a path prefix: http://h/prefix

    def __post_init__(self) -> None:
        self.pool = TargetPool(self.url)
        self.base_path = URL(self.url).raw_path.rstrip("/")


class Upstream:
    """The targets of one service and the client settings for calling them."""

    def __init__(self, service: ServiceSettings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.service = service
        self.name = service.name
        self.targets = tuple(Target(url) for url in service.urls)
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=service.timeout.connect, sock_read=service.timeout.read
        )
        self._clock = clock
        self._next = itertools.count()

    def pick(self, exclude: Target | None = None) -> Target | None:
        """The next healthy target in turn, or None when every target is ejected."""
        targets = self.targets
        if len(targets) == 1:
            only = targets[0]
            if only is exclude or (only.ejected_until and only.ejected_until > self._clock()):
                return None
            return only
        start = next(self._next)
        now = self._clock()
        for offset in range(len(targets)):
            target = targets[(start + offset) % len(targets)]
            if target is not exclude and target.ejected_until <= now:
                return target
        return None

    def eject(self, target: Target) -> None:
        """Take a target out of the rotation for the service's cooldown."""
        target.consecutive_failures += 1
        target.ejected_until = self._clock() + self.service.eject_seconds

    def succeeded(self, target: Target) -> None:
        if target.consecutive_failures:
            target.consecutive_failures = 0
            target.ejected_until = 0.0

    def close(self) -> None:
        for target in self.targets:
            target.pool.close()

    def retire(self) -> None:
        """No longer in the route table: close idle connections now, busy ones on release."""
        for target in self.targets:
            target.pool.retire()

    def healthy(self, target: Target) -> bool:
        return target.ejected_until <= self._clock()
