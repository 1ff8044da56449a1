"""Noticing a client that hangs up while the relay waits on its behalf.

An ASGI server does not cancel a request whose client has gone: it only answers ``receive()`` with
``http.disconnect`` (once the body has been read, ``receive()`` blocks until then). So every wait of the
relay on the upstream races a watcher of ``receive()``: a client that leaves first stops the wait (and the
upstream call with it: the upstream stops generating) instead of the relay reading an answer nobody takes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from starlette.responses import Response
from starlette.types import Receive

T = TypeVar("T")
#: The status noted for a request whose client hung up (nginx's "client closed request"): nobody receives it.
CLIENT_GONE_STATUS = 499


class ClientGone(Exception):
    """The client hung up before the answer went out."""


async def client_gone(receive: Receive) -> None:
    """Returns when the client disconnects (call it once the request body has been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_client_leaves(
    work: Coroutine[Any, Any, T], receive: Receive,
    discard: Callable[[T], Awaitable[None]] | None = None,
) -> T:
    """``work``'s result, or ``ClientGone`` (``work`` cancelled) if the client hangs up first.

    ``discard`` gets a result that came in as the client left (an opened upstream answer to close).
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(client_gone(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client left, or this request itself is being cancelled
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if watcher.done() and not watcher.cancelled():  # the client left (a receive() that failed: as good as gone)
        watcher.exception()  # retrieved: nothing to log for it
        if discard is not None and not task.cancelled() and task.exception() is None:
            await discard(task.result())
        raise ClientGone
    return task.result()


def gone_response() -> Response:
    """What a handler returns for a client that hung up (the server drops it: the connection is closed)."""
    return Response(status_code=CLIENT_GONE_STATUS)
