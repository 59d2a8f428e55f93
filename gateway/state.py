"""What the process itself is doing: starting, serving or draining."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["Lifecycle"]


@dataclass
class Lifecycle:
    started_at: float = field(default_factory=time.monotonic)
    ready: bool = False
    draining: bool = False

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_at
