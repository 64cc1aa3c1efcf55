"""Merge the images of concurrent requests in one front-end process into fewer inference calls.

BentoML's adaptive batching groups calls in the inference process, but every call still costs
that single process its own HTTP round trip, pickling and dispatch: about 4 ms of CPU per call
(measured with ``benchmarks/serve.py``), which caps one inference worker at roughly 250 calls/s
whatever the accelerator does. Sending the images of many client requests in one call pays that
cost once per group. The adaptive batcher still merges the groups of every front-end worker.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

Call = Callable[[np.ndarray], Awaitable[np.ndarray | None]]


class Coalescer:
    """``await coalescer(pixels)`` → the rows of ``call``'s answer for ``pixels`` (None if the call failed).

    A call goes out at once while fewer than ``max_in_flight`` are running, so an idle server adds
    no latency; beyond that, images wait and leave together (at most ``max_images`` per call) as soon
    as a running call returns. No timer: the group size follows the load. One call in flight per
    front-end worker measured best (``benchmarks/serve.py``, 2 cores: 127-134 images/s against
    120-127 with two): a second call only queues behind the first in the batcher, and leaving early
    splits the group it would have joined.
    """

    def __init__(self, call: Call, max_images: int, max_in_flight: int = 1) -> None:
        if max_images < 1 or max_in_flight < 1:
            raise ValueError("max_images and max_in_flight must be >= 1")
        self._call, self._max_images, self._max_in_flight = call, max_images, max_in_flight
        self._waiting: deque[tuple[np.ndarray, asyncio.Future]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()  # referenced until done, so none is garbage-collected early

    async def __call__(self, pixels: np.ndarray) -> np.ndarray | None:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((pixels, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self._waiting and self._in_flight < self._max_in_flight:
            group: list[tuple[np.ndarray, asyncio.Future]] = []
            size = 0
            while self._waiting and (not group or size + len(self._waiting[0][0]) <= self._max_images):
                pixels, future = self._waiting.popleft()
                if not future.cancelled():  # the client went away while waiting
                    group.append((pixels, future))
                    size += len(pixels)
            if not group:
                continue
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[tuple[np.ndarray, asyncio.Future]]) -> None:
        out: np.ndarray | None = None
        try:
            out = await self._call(group[0][0] if len(group) == 1 else np.concatenate([p for p, _ in group]))
        except Exception:  # the caller decides what a failed call means: here, None for every request
            out = None
        finally:
            self._in_flight -= 1
            start = 0
            for pixels, future in group:
                if not future.done():
                    future.set_result(None if out is None else out[start : start + len(pixels)])
                start += len(pixels)
            self._dispatch()
