"""The feeds in the application: routes, and the producer and push deliverer as background
tasks (started with the projection runners; one instance leads, the others stand by).

Under `serve` they run where the runners do, in its bulk process (service/bulk.py, at a lower
CPU priority); the front serves the polls. Every wake-up between them goes through
PostgreSQL: commits wake the producer (the event store's NOTIFY), an acknowledgement that frees
room wakes it (FEED_CHANNEL, poll.py), and a waiting long poll on the front finds the SETs the
bulk process stored at its next check (`FeedSettings.poll_check`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web

from service.feeds import poll
from service.feeds.producer import PRODUCER, Producer
from service.feeds.push import Pusher
from service.feeds.signing import SIGNERS
from service.state import DATABASE, SETTINGS


def scim_base(app: web.Application) -> str:
    settings = app[SETTINGS]
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return f"http://{settings.host}:{settings.port}/scim/v2"


async def _feeds_ctx(app: web.Application) -> AsyncIterator[None]:
    database = app[DATABASE]
    producer = Producer(
        database,
        lambda: scim_base(app),
        standby_interval=app[SETTINGS].runner_standby_interval,
    )
    pusher = Pusher(database)
    app[PRODUCER] = producer
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    tasks = [
        loop.create_task(producer.run(stop)),
        loop.create_task(pusher.run(stop, lambda: producer.active)),
    ]
    yield
    stop.set()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    SIGNERS.close()  # the signer processes end with the producer (a new one starts its own)


def setup(app: web.Application, *, background: bool) -> None:
    poll.add_routes(app)
    if background:
        app.cleanup_ctx.append(_feeds_ctx)
