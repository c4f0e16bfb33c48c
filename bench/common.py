"""Shared pieces of the benchmarks: a durable PostgreSQL, timing, and the machine's description."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from infra.embedded import EmbeddedPostgres

ROOT = Path(__file__).resolve().parent.parent
SCIMLEDGER = ROOT / ".venv" / "bin" / "scimledger"
CODE = ("service", "domain", "infra", "projections")  # the code a benchmark measures


@contextmanager
def durable_postgres() -> Iterator[str]:
    """DATABASE_URL if set, else a throwaway embedded server (fsync and synchronous_commit on)."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    with tempfile.TemporaryDirectory(prefix="scimledger-bench-") as tmp:
        embedded = EmbeddedPostgres(Path(tmp), delete_on_exit=True)
        dsn = embedded.start()
        try:
            yield dsn
        finally:
            embedded.stop()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}"


def percentile(samples: list[float], pct: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine_busy() -> float:
    """CPU seconds that processes on this machine spent, all cores (interrupts not included)."""
    t = psutil.cpu_times()
    return float(t.user + t.system + getattr(t, "nice", 0.0))


def revision() -> str:
    """The commit the measured code came from, and whether it had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", *CODE],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {head}" + (" + uncommitted changes" if dirty else "")
