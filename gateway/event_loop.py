"""The event loop a gateway process runs on, and the benchmarks' clients with it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (uvicorn[standard] brings it): measured, about 14% more requests/s per process. The
    benchmarks' clients run on it too (loadtest.runner)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
