"""Profile `scimledger serve` under wrk: POST /Users, then GET by userName (py-spy).

    .venv/bin/python -m bench.profile_server [--seconds S] [--users N] [--out DIR]

py-spy (the `bench` extra) samples the server process while wrk drives it at concurrency 16;
raw collapsed stacks (flamegraph.pl input) and the wrk figures land in DIR (var/profile).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import aiohttp
import click
import orjson

from bench import wrk
from bench.common import (
    ROOT,
    create_tenant,
    durable_postgres,
    entra_body,
    free_port,
    progress_bar,
    server_process,
    wait_ready,
)
from bench.lookups import NAME_FORMAT
from bench.posts import row_maker, seed_users


def profiled(
    pid: int, folded: Path, origin: str, script: str, seconds: float, native: bool
) -> wrk.WrkRun:
    exe = shutil.which("py-spy") or str(ROOT / ".venv" / "bin" / "py-spy")
    if not Path(exe).exists():
        raise click.ClickException("py-spy is not installed: `make bench` installs it")
    argv = [exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw"]
    argv += ["--output", str(folded), "--duration", str(int(seconds) + 1)]
    argv += ["--native"] if native else ["--nonblocking"]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        return wrk.run(origin, script, seconds, 16)
    finally:
        spy.wait(timeout=120)


@click.command(help=(__doc__ or "").splitlines()[0])
@click.option("--seconds", default=20.0, show_default=True)
@click.option("--users", default=10_000, show_default=True, help="Users seeded for the GETs.")
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "var" / "profile")
@click.option("--native", is_flag=True, help="C frames too (py-spy --native).")
@click.option("--code", type=click.Path(path_type=Path), help="Run the server from this checkout.")
@click.option("--no-profile", is_flag=True, help="wrk only, no py-spy.")
def main(
    seconds: float, users: int, out: Path, native: bool, code: Path | None, no_profile: bool
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if code is not None:  # to compare two commits
        os.environ["PYTHONPATH"] = str(code.resolve())
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    with durable_postgres() as dsn, tempfile.TemporaryDirectory() as tmp:
        token = create_tenant(dsn)
        log = Path(tmp) / "serve.log"
        with server_process(dsn, port, log) as proc:

            async def seed() -> None:
                async with aiohttp.ClientSession() as session:
                    await wait_ready(session, f"{origin}/readyz", proc, log)
                with progress_bar() as progress:
                    maker = await row_maker(dsn, token)
                    await seed_users(dsn, maker, 0, users, progress, {}, 0)

            asyncio.run(seed())
            body = orjson.loads(entra_body(0))
            body["userName"] = body["emails"][0]["value"] = wrk.NAME
            body["externalId"] = wrk.EXTERNAL_ID
            template = orjson.dumps(body)
            wrk.run(origin, wrk.post_users_script("/scim/v2/Users", token, template, "Warm"), 2, 16)
            for name, script in (
                ("post", wrk.post_users_script("/scim/v2/Users", token, template, "Prof")),
                ("get", wrk.find_users_script("/scim/v2/Users", token, users, NAME_FORMAT)),
            ):
                if no_profile:
                    got = wrk.run(origin, script, seconds, 16)
                else:
                    folded = out / f"{name}.folded"
                    got = profiled(proc.pid, folded, origin, script, seconds, native)
                print(
                    f"{name}: {got.rate:,.0f} req/s, p50 {got.p50 * 1000:.1f} ms,"
                    f" p99 {got.p99 * 1000:.1f} ms, bad {got.bad}, wrk CPU {got.cpu:.1f} s"
                )


if __name__ == "__main__":
    main()
