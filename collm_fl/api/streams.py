"""Reading the end of an HTTP stream, for the gateway (upstream) and the load generator alike."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

DRAIN_S = 1.0  # how long a finished stream's remaining bytes are waited for


async def drain(rest: AsyncIterator[object], timeout_s: float = DRAIN_S) -> None:
    """Read what is left of a finished stream (after ``[DONE]``: the chunked body's terminator)
    so that httpx puts its connection back in the pool; closed as it was before when that takes
    longer than ``timeout_s`` or fails. Without it every stream costs a new TCP connection."""
    with contextlib.suppress(Exception):  # (a TimeoutError, a transport error: close it)
        async with asyncio.timeout(timeout_s):
            async for _ in rest:
                pass
