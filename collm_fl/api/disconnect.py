"""Stop work for a client that has gone: an HTTP handler's wait, cancelled on disconnect.

uvicorn does not cancel a handler when its client disconnects; the handler learns it only from an
``http.disconnect`` message on the ASGI receive channel (once the body has been read, a receive
blocks until then). :func:`unless_client_leaves` runs the handler's wait beside such a receive
and cancels whichever loses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the awaited work finished (the work was cancelled)."""


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """``await work``, unless the client disconnects first: then cancel it and raise ClientGone.

    For the body-less part of a request's life only (the body must have been read), and never
    beside another reader of ``request.receive`` (a StreamingResponse listens on its own).
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        raise ClientGone()
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
