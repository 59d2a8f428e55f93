"""``gateway.server.tune_malloc``: freed body buffers are reused, not handed back and faulted in again.

Each case runs in a fresh interpreter: malloc's settings are process-wide and cannot be undone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Allocates and frees what a proxy's body chunks look like (64 KiB to 1 MiB bytes objects, 4 MiB
# at a time), then prints whether tune_malloc applied and the page faults of 20 more rounds.
CHURN = """
import resource, sys
from gateway.server import tune_malloc
applied = tune_malloc() if sys.argv[1] == "tune" else None

def churn():
    for size in (64 * 1024, 256 * 1024, 1024 * 1024):
        chunks = [bytes(size) for _ in range(4 * 1024**2 // size)]
        del chunks

churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    churn()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str, **env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_with_tune_malloc_freed_buffers_come_back_without_page_faults() -> None:
    # 20 rounds of 12 MiB: untuned, glibc gives most of it back and faults it in again each round.
    untuned = _faults("plain")[1]
    applied, tuned = _faults("tune")
    assert applied == "True"
    assert untuned > 5_000, f"the untuned baseline should churn pages; saw {untuned} faults"
    assert tuned < 100, f"{tuned} page faults for 240 MiB of reused buffers"


def test_an_operators_malloc_settings_win() -> None:
    assert _faults("tune", MALLOC_TRIM_THRESHOLD_="131072")[0] == "False"
    assert _faults("tune", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")[0] == "False"
    # Tunables of other parts of glibc are not malloc's settings.
    assert _faults("tune", GLIBC_TUNABLES="glibc.rtld.optional_static_tls=0")[0] == "True"
