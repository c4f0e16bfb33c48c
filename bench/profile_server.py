"""Profile `scimledger serve` under wrk: POST /Users, then GET by userName (py-spy).

    .venv/bin/python -m bench.profile_server [--seconds S] [--users N] [--out DIR]

py-spy (the `bench` extra) samples the server process while wrk drives it at concurrency 16;
collapsed stacks (flamegraph.pl input) and the wrk figures land in DIR (default var/profile).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import aiohttp
import orjson
from rich.progress import Progress

from bench import wrk
from bench.suite import NAME_FORMAT, RowMaker, seed_users
from bench.users import ROOT, Served, entra_body, err, free_port, served, wait_ready
from infra.database import create_pool
from infra.tenants import authenticate

NATIVE = False


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: `make bench` installs it (the bench extra)")
    return found


def profiled(pid: int, folded: Path, origin: str, script: str, seconds: float) -> wrk.WrkRun:
    spy = subprocess.Popen(
        [
            _py_spy(),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(folded),
            "--duration",
            str(int(seconds) + 1),
            *(["--native"] if NATIVE else ["--nonblocking"]),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        return wrk.run(origin, script, seconds, 16)
    finally:
        spy.wait(timeout=120)


async def _seed(dsn: str, token: str, users: int, origin: str, s: Served) -> None:
    async with aiohttp.ClientSession() as session:
        await wait_ready(session, origin, s.proc, s.log)
    pool = await create_pool(dsn, min_size=1, max_size=1)
    try:
        principal = await authenticate(pool, token)
    finally:
        await pool.close()
    assert principal is not None
    maker = RowMaker(principal.tenant_id, principal.token_name)
    with Progress(console=err) as progress:
        await seed_users(dsn, maker, 0, users, progress, {}, 0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "profile")
    parser.add_argument("--native", action="store_true", help="C frames too (py-spy --native)")
    parser.add_argument(
        "--code",
        type=Path,
        help="run the server from this checkout instead (PYTHONPATH), to compare two commits",
    )
    parser.add_argument("--no-profile", action="store_true", help="wrk only, no py-spy")
    ns = parser.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    global NATIVE
    NATIVE = bool(ns.native)
    if ns.code is not None:
        os.environ["PYTHONPATH"] = str(ns.code.resolve())
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    with served(port, "bench-profile-") as s:
        import uvloop

        uvloop.run(_seed(s.dsn, s.token, ns.users, origin, s))
        body = orjson.loads(entra_body(0))
        body["userName"] = body["emails"][0]["value"] = wrk.NAME
        body["externalId"] = wrk.EXTERNAL_ID
        post = wrk.post_users_script("/scim/v2/Users", s.token, orjson.dumps(body), "Prof")
        warm = wrk.post_users_script("/scim/v2/Users", s.token, orjson.dumps(body), "Warm")
        get = wrk.find_users_script("/scim/v2/Users", s.token, ns.users, NAME_FORMAT)
        wrk.run(origin, warm, 2, 16)
        for name, script in (("post", post), ("get", get)):
            if ns.no_profile:
                result = wrk.run(origin, script, ns.seconds, 16)
            else:
                result = profiled(s.proc.pid, ns.out / f"{name}.folded", origin, script, ns.seconds)
            print(
                f"{name}: {result.rate:,.0f} req/s, p50 {result.p50 * 1000:.1f} ms,"
                f" p99 {result.p99 * 1000:.1f} ms, bad {result.bad}, wrk CPU {result.cpu:.1f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
