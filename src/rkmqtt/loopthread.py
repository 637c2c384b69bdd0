"""An asyncio event loop on a thread of its own (that thread): the HTTP server's and the openai
engine's."""

from __future__ import annotations

import asyncio


def run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The body of a loop's thread: run `loop` until it is stopped, then close it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        loop.close()
