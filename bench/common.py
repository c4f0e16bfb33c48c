"""What every benchmark shares: Entra's body, the servers it starts, CPU accounting, the machine."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import orjson
import psutil
import yarl
from rich import progress as rp
from rich.console import Console

from infra.embedded import EmbeddedPostgres
from infra.migrations import migrate

ROOT = Path(__file__).resolve().parent.parent
SCIMLEDGER = ROOT / ".venv" / "bin" / "scimledger"
CODE = ("service", "domain", "infra", "projections")  # the code a benchmark measures
SCIM = "application/scim+json"
ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
PATCH_OP = "urn:ietf:params:scim:api:messages:2.0:PatchOp"
NAME_FORMAT = "Bench_User_%06d@Contoso.com"  # user i's userName (wrk's Lua formats it too)
# ENTRA.md's POST /Users body, shared with the tests.
ENTRA_USER: dict[str, Any] = json.loads((ROOT / "tests/fixtures/entra_user.json").read_text())

err = Console(stderr=True)
T = TypeVar("T")


class BenchError(Exception):
    """The server answered something a correct server would not; reported, not worked around."""


def entra_body(i: int, name: str | None = None) -> bytes:
    """Entra's POST /Users body with a unique userName, work e-mail and externalId."""
    name = name or NAME_FORMAT % i
    body = {**ENTRA_USER, "externalId": str(uuid.uuid4()), "userName": name}
    body["emails"] = [{**ENTRA_USER["emails"][0], "value": name}]
    return orjson.dumps(body)


def patch_body(operations: list[object]) -> bytes:
    """A SCIM PATCH request's body."""
    return orjson.dumps({"schemas": [PATCH_OP], "Operations": operations})


@dataclass
class Scim:
    """SCIM requests to one server: its `base` (e.g. http://127.0.0.1:8000/scim/v2), a token."""

    session: aiohttp.ClientSession
    base: str
    token: str

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request to base + `path` (already encoded); the reply's status and body."""
        headers = {"Authorization": f"Bearer {self.token}", "Accept": SCIM}
        headers |= {} if body is None else {"Content-Type": SCIM}
        url = yarl.URL(self.base + path, encoded=True)
        async with self.session.request(method, url, data=body, headers=headers) as r:
            return r.status, await r.read()

    async def send(
        self, method: str, path: str, body: bytes | None = None, expect: tuple[int, ...] = (200,)
    ) -> bytes:
        """`request`; the reply's body, or BenchError if its status is not one of `expect`."""
        status, raw = await self.request(method, path, body)
        if status not in expect:
            raise BenchError(f"{method} {self.base}{path} -> {status}: {raw[:300]!r}")
        return raw

    async def create(self, kind: str, body: bytes) -> str:
        """POST /`kind` (Users, Groups), which must answer 201; the new resource's id."""
        return str(orjson.loads(await self.send("POST", f"/{kind}", body, (201,)))["id"])


async def drain(items: Iterable[T], one: Callable[[T], Awaitable[object]], workers: int) -> None:
    """`one(item)` for each item, `workers` at a time."""
    todo = iter(items)

    async def worker() -> None:
        for item in todo:
            await one(item)

    await asyncio.gather(*(worker() for _ in range(workers)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The suite's one progress display: the rows add their tasks, the suite shows each row's.
PROGRESS = rp.Progress(
    rp.TextColumn("{task.description:<36}"), rp.BarColumn(), rp.MofNCompleteColumn(),
    rp.TimeElapsedColumn(), rp.TextColumn("ETA"),
    rp.TimeRemainingColumn(), console=err,
)  # fmt: skip


# --- CPU accounting
def machine_busy() -> float:
    """CPU seconds that processes on this machine spent, all cores (interrupts not included)."""
    t = psutil.cpu_times()
    return float(t.user + t.system + getattr(t, "nice", 0.0))


def client_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def process_cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def tree_cpu(root: psutil.Process) -> float:
    """A process, its live children, and its reaped children (postmaster and backends)."""
    t = root.cpu_times()
    total = float(t.user + t.system + t.children_user + t.children_system)
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += process_cpu(child)
    return total


@dataclass
class Cpu:
    """CPU seconds spent during measured phases, and their wall seconds."""

    seconds: float = 0.0
    client: float = 0.0
    server: float = 0.0
    postgres: float | None = 0.0
    machine: float = 0.0

    @property
    def others(self) -> float:
        return max(0.0, self.machine - self.client - self.server - (self.postgres or 0.0))

    def __add__(self, o: Cpu, sign: int = 1) -> Cpu:
        pg = None if self.postgres is None or o.postgres is None else o.postgres
        postgres = None if pg is None else (self.postgres or 0.0) + sign * pg
        seconds, client = self.seconds + sign * o.seconds, self.client + sign * o.client
        server, machine = self.server + sign * o.server, self.machine + sign * o.machine
        return Cpu(seconds, client, server, postgres, machine)

    def __sub__(self, o: Cpu) -> Cpu:
        return self.__add__(o, -1)

    def cores(self, cpu: float | None) -> str:
        return "n/a" if cpu is None else f"{cpu / self.seconds:.2f}"

    def text(self) -> str:
        return (
            f"client {self.cores(self.client)} / server {self.cores(self.server)} /"
            f" postgres {self.cores(self.postgres)} / other {self.cores(self.others)}"
        )


class Meter:
    """Reads CPU of this process (plus wrk, added by hand), a server, and PostgreSQL."""

    def __init__(self, server: psutil.Process | None, postgres: psutil.Process | None) -> None:
        self.server, self.postgres = server, postgres

    def read(self) -> Cpu:
        """The counters now (seconds: the clock); subtract two readings for a phase. The server
        is `serve` with its children: its bulk process runs the projection runners."""
        server = tree_cpu(self.server) if self.server is not None else 0.0
        pg = tree_cpu(self.postgres) if self.postgres is not None else None
        return Cpu(time.perf_counter(), client_cpu(), server, pg, machine_busy())

    def since(self, before: Cpu, extra: float = 0.0) -> Cpu:
        """The phase since `before`, with `extra` CPU seconds of a client (wrk) added."""
        return self.read() - before + Cpu(client=extra)


# --- PostgreSQL
@contextlib.asynccontextmanager
async def connected(dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(dsn)
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.contextmanager
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


async def postgres_facts(dsn: str) -> tuple[psutil.Process | None, str]:
    """The postmaster, if the server runs on this machine (a remote DATABASE_URL gets no CPU
    column), and the server's version."""
    postmaster: psutil.Process | None = None
    async with connected(dsn) as conn:
        version = str(await conn.fetchval("SHOW server_version"))
        backend = await conn.fetchval("SELECT pg_backend_pid()")
        with contextlib.suppress(psutil.Error):
            parent = psutil.Process(backend).parent()
            if parent is not None and parent.name() == "postgres":
                postmaster = parent
    return postmaster, version


async def make_database(dsn: str, name: str, *, migrated: bool = False) -> str:
    """A fresh database `name` in the same server (its schema made if `migrated`); its DSN."""
    async with connected(dsn) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    target = urlunsplit(urlsplit(dsn)._replace(path=f"/{name}"))
    if migrated:
        async with connected(target) as conn:
            await migrate(conn)
    return target


async def wait_for_projections(dsn: str, limit: float) -> float:
    """Until the asynchronous projections reached the head of the store; seconds."""
    started = time.perf_counter()
    async with connected(dsn) as conn:
        while True:
            head = await conn.fetchrow(
                "SELECT transaction_id, notification_id FROM stored_events"
                " ORDER BY transaction_id DESC, notification_id DESC LIMIT 1"
            )
            states = await conn.fetch(
                "SELECT checkpoint_transaction, checkpoint_position FROM projection_state"
                " WHERE mode = 'async'"
            )
            if head is None or all((s[0], s[1]) >= (head[0], head[1]) for s in states):
                return time.perf_counter() - started
            if time.perf_counter() - started > limit:
                raise BenchError(f"the asynchronous projections did not catch up in {limit} s")
            await asyncio.sleep(0.5)


# --- processes
def die_with_parent() -> None:
    """In the child: SIGTERM if this benchmark dies without cleaning up (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


CHILD: dict[str, Any] = {  # how the benchmark starts its processes
    "stdin": subprocess.DEVNULL,
    "preexec_fn": die_with_parent if sys.platform == "linux" else None,
}


@dataclass
class Finished:
    """A child process run to its end: its output, wall seconds, and CPU (wait4's rusage: its
    own and that of the children it reaped); `peak_rss` the sum of their VmHWM, if watched."""

    out: str
    errors: str
    seconds: float
    cpu: float
    peak_rss: int


def high_water(pid: int) -> int:
    """VmHWM: the peak RSS of the process since its exec (0 if unknown). Not `wait4`'s
    ru_maxrss: a child created by fork inherits the parent's high-water mark through exec."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def finished(
    argv: list[str], *, timeout: float = 7200, watch: bool = False, session: bool = False
) -> Finished:
    """Runs `argv` to its end (blocks: run it in a thread), in a session of its own if
    `session` (Ctrl-C reaches only us), its process group killed if it outlives `timeout` or
    we are interrupted; BenchError if it fails. `watch`: its and its children's VmHWM."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as errors:
        started, marks = time.perf_counter(), dict[int, int]()
        proc = subprocess.Popen(argv, stdout=out, stderr=errors, start_new_session=session, **CHILD)
        watched = psutil.Process(proc.pid)
        try:
            while not (reaped := os.wait4(proc.pid, os.WNOHANG))[0]:
                if time.perf_counter() - started > timeout:
                    raise BenchError(f"{Path(argv[0]).name} still running after {timeout:.0f} s")
                with contextlib.suppress(psutil.Error):
                    for p in [watched, *watched.children(recursive=True)] if watch else []:
                        marks[p.pid] = max(marks.get(p.pid, 0), high_water(p.pid))
                time.sleep(0.05)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                (os.killpg if session else os.kill)(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
        seconds, (_, status, usage) = time.perf_counter() - started, reaped
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        errors.seek(0)
        text, problems = (f.read().decode(errors="replace") for f in (out, errors))
    if proc.returncode != 0:
        failed = f"{Path(argv[0]).name} {' '.join(argv[1:4])} exited with {proc.returncode}"
        raise BenchError(f"{failed}:\n{text[-2000:]}\n{problems[-2000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return Finished(text, problems, seconds, cpu, sum(marks.values()))


def cli(*args: str, timeout: float = 600) -> str:
    """`scimledger ARGS`; its stdout."""
    return finished([str(SCIMLEDGER), *args], timeout=timeout).out


def create_tenant(dsn: str) -> str:
    """`scimledger tenants create … --json` under a fresh name; the token it prints."""
    out = cli("tenants", "create", f"bench-{uuid.uuid4().hex[:8]}", "--json", "--database-url", dsn)
    return str(json.loads(out.strip().splitlines()[-1])["token"])


def py_spy(pid: int, folded: Path, seconds: float) -> subprocess.Popen[bytes]:
    """py-spy (the `bench` extra) sampling `pid` for `seconds` into raw collapsed stacks
    (flamegraph.pl's input); PY_SPY_NATIVE=1 adds C frames."""
    exe = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
    if not Path(exe).exists():
        raise BenchError("py-spy is not installed: `make bench` installs it (the bench extra)")
    folded.parent.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw"]
    argv += ["--output", str(folded), "--duration", str(int(seconds) + 1)]
    argv += ["--native"] if os.environ.get("PY_SPY_NATIVE") else ["--nonblocking"]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.asynccontextmanager
async def serving(
    argv: list[str], ready: str | None, *, headers: dict[str, str] | None = None,
    env: dict[str, str] | None = None, stop_timeout: float = 30,
) -> AsyncIterator[subprocess.Popen[bytes]]:  # fmt: skip
    """A process of the benchmark's, ready once GET `ready` answers 200 (or at once), in its
    own session (Ctrl-C reaches only us), its output in a log whose end is reported if it fails
    or a connection to it does; SIGTERM on the way out, SIGKILL if it ignores that for
    `stop_timeout` seconds."""
    with tempfile.TemporaryDirectory(prefix="scimledger-bench-") as tmp:
        log = Path(tmp) / f"{Path(argv[0]).name}.log"
        with log.open("wb") as out:
            # Popen does not wait for the child: nothing blocks the event loop here.
            proc = subprocess.Popen(  # noqa: ASYNC220
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **CHILD
            )
        try:
            deadline = time.monotonic() + 120
            async with aiohttp.ClientSession() as session:
                while ready is not None:
                    if proc.poll() is not None:
                        raise BenchError(f"{log.stem} exited with {proc.returncode}:\n{tail(log)}")
                    if time.monotonic() > deadline:
                        raise BenchError(f"{ready} not ready after 120 s:\n{tail(log)}")
                    with contextlib.suppress(aiohttp.ClientError, OSError):
                        async with session.get(ready, headers=headers) as r:
                            ready = None if r.status == 200 else ready
                    await asyncio.sleep(0.2 if ready else 0)
            yield proc
        except (aiohttp.ClientError, OSError) as e:
            raise BenchError(f"{type(e).__name__}: {e}\n{log.stem} log:\n{tail(log)}") from e
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=stop_timeout)
                except subprocess.TimeoutExpired:
                    err.print(f"[yellow]{Path(argv[0]).name} ignored SIGTERM; killing it")
                    proc.kill()
                    proc.wait()


@contextlib.asynccontextmanager
async def scimledger(
    dsn: str, cpus: str = ""
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    """`scimledger serve` on `dsn`, ready: its origin and process (the CPU sampled from its pid
    and its children is one server's); BENCH_WORKERS=N runs `serve --workers N`. With `cpus`
    (a list such as 1 or 2-3), the server and its bulk process, with that process's database
    backends, are confined to those CPUs."""
    origin = f"http://127.0.0.1:{(port := free_port())}"
    argv = [str(SCIMLEDGER), "serve", "--workers", os.environ.get("BENCH_WORKERS", "1")]
    argv += ["--port", str(port), "--database-url", dsn]
    # One token drives the whole load: the per-token rate limit and cap on requests in flight
    # (16 connections > its default 10) would measure themselves.
    env = {**os.environ, "SCIMLEDGER_RATE_LIMIT": "0", "SCIMLEDGER_MAX_CONCURRENT_PER_TOKEN": "0"}
    if cpus:
        argv, env["SCIMLEDGER_BULK_CPUS"] = ["taskset", "-c", cpus, *argv], cpus
    async with serving(argv, f"{origin}/readyz", env=env) as proc:
        yield origin, proc


# --- the machine
def revision() -> str:
    """The commit the measured code came from, and whether it had uncommitted changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--", *CODE)
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {head}" + (" + uncommitted changes" if dirty else "")


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description(pg_version: str, load_before: tuple[float, ...], rev: str) -> str:
    cpu, ram = _cpu_model(), psutil.virtual_memory().total / 2**30
    load = ["/".join(f"{x:.2f}" for x in xs) for xs in (load_before, os.getloadavg())]
    return (
        f"CPU {cpu}, {os.cpu_count()} cores; RAM {ram:.0f} GiB; kernel {platform.system()}"
        f" {platform.release()}; Python {platform.python_version()}; PostgreSQL {pg_version}"
        f" (embedded, fsync and synchronous_commit on); {rev}; load average (1/5/15 min)"
        f" {load[0]} at the start, {load[1]} at the end; the 'other' CPU of each row"
        " is what the rest of the machine used meanwhile"
    )
