"""The `scimledger` command, run as operators run it: a separate process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import psutil

from infra.database import Database
from infra.tenants import authenticate

SCIMLEDGER = str(Path(sys.executable).parent / "scimledger")


async def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        SCIMLEDGER,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_tenants_create_json_gives_a_working_token(
    fresh_dsn: str, database: Database
) -> None:
    code, out, err = await run(
        "tenants", "create", "contoso", "--json", "--database-url", fresh_dsn
    )
    assert code == 0, err
    line = json.loads(out)
    assert set(line) == {"tenant", "token"} and line["tenant"] == "contoso"
    principal = await authenticate(database.pool, line["token"])
    assert principal is not None and principal.tenant_name == "contoso"
    assert principal.role == "provisioning"

    code, out, err = await run("tenants", "create", "contoso", env={"DATABASE_URL": fresh_dsn})
    assert code == 1
    assert err.strip() == "scimledger: error: tenant 'contoso' already exists"

    code, out, _ = await run("tenants", "list", "--json", "--database-url", fresh_dsn)
    assert code == 0 and json.loads(out)["tenant"] == "contoso"


async def test_bad_arguments_exit_2_with_one_line() -> None:
    for args in (("tenants", "create"), ("frobnicate",), ("serve", "--port", "eighty")):
        code, _out, err = await run(*args)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert err.startswith("scimledger: error: ")


async def test_unreachable_database_exits_1_with_one_line() -> None:
    code, _, err = await run(
        "migrate", "--database-url", f"postgresql://x@127.0.0.1:{free_port()}/x"
    )
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "cannot connect to the database" in err


async def _serve(
    *args: str, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, str, int]:
    """`scimledger serve ARGS` on a free port (with `env` added to the environment), its
    banner read up to the token."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        SCIMLEDGER,
        "serve",
        "--port",
        str(port),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    banner = ""
    while "Secret Token:" not in banner and "Serving SCIM" not in banner:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=60)
        assert line, f"serve exited: {(await proc.stderr.read()).decode()}"  # type: ignore[union-attr]
        banner += line.decode()
    if "Secret Token:" in banner:
        banner += (await asyncio.wait_for(proc.stdout.readline(), timeout=10)).decode()
    return proc, banner, port


async def _stop(proc: asyncio.subprocess.Process) -> int:
    proc.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(proc.wait(), timeout=30)


def _token(banner: str) -> str:
    return banner.split("Secret Token:")[1].split()[0]


async def test_serve_prints_a_token_that_reads_service_provider_config(fresh_dsn: str) -> None:
    proc, banner, port = await _serve("--database-url", fresh_dsn)
    try:
        assert f"Tenant URL:   http://127.0.0.1:{port}/scim/v2/" in banner
        token = _token(banner)
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/scim/v2/ServiceProviderConfig"
            async with http.get(url, headers={"Authorization": f"Bearer {token}"}) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("application/scim+json")
            async with http.get(url, headers={"Authorization": "Bearer wrong"}) as r:
                assert r.status == 401
    finally:
        assert await _stop(proc) == 0
    # A second start keeps the tenant and does not print a token again.
    proc, banner, _ = await _serve("--database-url", fresh_dsn)
    assert "Secret Token" not in banner
    assert await _stop(proc) == 0


async def test_serve_on_the_embedded_database_shares_it_with_the_cli(tmp_path: Path) -> None:
    """`make run`'s path: no DATABASE_URL, a data directory, a CLI command beside the server."""
    data_dir = tmp_path / "var"
    saved = dict(os.environ)
    os.environ.pop("DATABASE_URL", None)
    try:
        proc, banner, port = await _serve("--data-dir", str(data_dir))
        try:
            code, out, err = await run(
                "tenants", "create", "fabrikam", "--json", "--data-dir", str(data_dir)
            )
            assert code == 0, err
            token = json.loads(out)["token"]
            async with aiohttp.ClientSession() as http:
                for t in (_token(banner), token):
                    async with http.get(
                        f"http://127.0.0.1:{port}/scim/v2/ServiceProviderConfig",
                        headers={"Authorization": f"Bearer {t}"},
                    ) as r:
                        assert r.status == 200
        finally:
            assert await _stop(proc) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    # The last process to leave stops the embedded server: nothing is left running.
    pgdata = str((data_dir / "pg").resolve())
    for _ in range(300):  # a busy machine may take a while to stop the server
        left = [
            p
            for p in psutil.process_iter(["name", "cmdline"])
            if p.info["name"] == "postgres" and pgdata in " ".join(p.info["cmdline"] or [])
        ]
        if not left:
            break
        await asyncio.sleep(0.1)
    assert not left
