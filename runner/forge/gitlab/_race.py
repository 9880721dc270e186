"""Run one awaitable until it ends or an event says stop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def unless_set(event: asyncio.Event, aw: Awaitable[T]) -> tuple[bool, T | None]:
    """``(True, result)`` when ``aw`` ends first; ``(False, None)`` when ``event`` is set
    first, ``aw`` then cancelled and awaited (its owner is this call). ``aw``'s error
    is raised."""
    task = asyncio.ensure_future(aw)
    stop = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
    if task.cancelled():
        return False, None
    return True, task.result()
