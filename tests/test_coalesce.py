"""The front end's request coalescer, driven by a real asyncio loop and an inference function."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.coalesce import Coalescer


class Doubler:
    """Stands in for the inference service: answers ``2 * pixels`` after a delay, recording call sizes."""

    def __init__(self, delay: float = 0.02, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.delay, self.fail = delay, fail

    async def __call__(self, pixels: np.ndarray) -> np.ndarray | None:
        self.sizes.append(len(pixels))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise ConnectionError("inference service went away")
        return pixels * 2


def _requests(n: int, sizes=(1, 3, 2)) -> list[np.ndarray]:
    return [np.full((sizes[i % len(sizes)], 2), i, np.int64) for i in range(n)]


def test_concurrent_requests_share_calls_and_get_their_own_rows():
    async def run():
        infer = Doubler()
        coalesce = Coalescer(infer, max_images=8, max_in_flight=2)
        requests = _requests(12)
        answers = await asyncio.gather(*(coalesce(r) for r in requests))
        return infer, requests, answers

    infer, requests, answers = asyncio.run(run())
    for request, answer in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(answer, request * 2)  # each request gets exactly its rows, in order
    assert sum(infer.sizes) == sum(len(r) for r in requests) == 24
    assert len(infer.sizes) < 12 and max(infer.sizes) <= 8  # merged, never over the limit
    assert infer.sizes[:2] == [1, 3]  # the first two left at once, alone: nothing was running yet


def test_an_idle_coalescer_sends_at_once():
    async def run():
        infer = Doubler(delay=0)
        coalesce = Coalescer(infer, max_images=64)
        for r in _requests(3):
            np.testing.assert_array_equal(await coalesce(r), r * 2)
        return infer

    assert asyncio.run(run()).sizes == [1, 3, 2]


def test_a_request_over_the_group_limit_goes_alone():
    async def run():
        infer = Doubler()
        coalesce = Coalescer(infer, max_images=4, max_in_flight=1)
        big, small = np.ones((10, 2), np.int64), np.zeros((1, 2), np.int64)
        a, b, c = await asyncio.gather(coalesce(small), coalesce(big), coalesce(small))
        return infer, (a, b, c)

    infer, (a, b, c) = asyncio.run(run())
    assert infer.sizes == [1, 10, 1]
    assert b.shape == (10, 2) and (b == 2).all() and (a == 0).all() and (c == 0).all()


def test_a_failed_call_answers_none_to_its_group_and_the_next_calls_go_on():
    async def run():
        infer = Doubler(fail=True)
        coalesce = Coalescer(infer, max_images=8, max_in_flight=1)
        failed = await asyncio.gather(*(coalesce(r) for r in _requests(4)))
        infer.fail = False
        after = await coalesce(np.ones((2, 2), np.int64))
        return failed, after

    failed, after = asyncio.run(run())
    assert failed == [None] * 4
    np.testing.assert_array_equal(after, np.full((2, 2), 2))


def test_limits_are_checked():
    with pytest.raises(ValueError):
        Coalescer(Doubler(), max_images=0)
