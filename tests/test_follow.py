"""The one bar follower (actors.follow.BarFollower): the cursor moves only past bars the consumer took."""

from __future__ import annotations

import asyncio

from actors.follow import BarFollower


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *a):
        async def go():
            return self.fn(*a)

        return go()


class _Router:
    """The router's ``since(cursor, limit)`` and ``health()`` over a list of numbered bars."""

    def __init__(self, n: int):
        self.bars = [{"seq": i, "symbol": "SPY"} for i in range(1, n + 1)]
        self.asked: list[tuple[int, int]] = []
        self.since = _Call(self._since)
        self.health = _Call(lambda: {"seq": self.bars[-1]["seq"] if self.bars else 0})

    def _since(self, cursor, limit):
        self.asked.append((cursor, limit))
        return [b for b in self.bars if b["seq"] > cursor][:limit]


def _follow(router, on_bars, rounds_s=0.6, **kw):
    forgot = []
    f = BarFollower(lambda: router, lambda: forgot.append(1), on_bars, poll_s=0.005, retry_s=0.01,
                    idle_check_s=0.05, **kw)

    async def main():
        task = asyncio.create_task(f.run())
        await asyncio.sleep(rounds_s)
        task.cancel()

    asyncio.run(main())
    return f, forgot


def test_batches_are_limited_and_every_bar_is_taken_once_in_order():
    router, seen = _Router(25), []

    async def take(bars):
        seen.extend(b["seq"] for b in bars)

    f, _ = _follow(router, take, limit=10)
    assert seen == list(range(1, 26)) and f.cursor == 25
    assert all(limit == 10 for _, limit in router.asked) and router.asked[:3] == [(0, 10), (10, 10), (20, 10)]


def test_a_failed_batch_leaves_the_cursor_and_goes_again_whole():
    router, attempts, taken = _Router(6), [], []

    async def flaky(bars):
        attempts.append([b["seq"] for b in bars])
        if len(attempts) == 1:
            raise RuntimeError("broker restarting")
        taken.extend(b["seq"] for b in bars)

    f, forgot = _follow(router, flaky)
    assert attempts[0] == attempts[1] == [1, 2, 3, 4, 5, 6]  # the same batch again, whole
    assert taken == [1, 2, 3, 4, 5, 6] and f.cursor == 6 and forgot == [1]


def test_a_router_numbering_from_one_again_is_read_from_its_start():
    router, seen = _Router(5), []

    async def take(bars):
        seen.extend(b["seq"] for b in bars)

    f = BarFollower(lambda: router, lambda: None, take, cursor=40, poll_s=0.005, idle_check_s=0.05)

    async def main():
        task = asyncio.create_task(f.run())
        await asyncio.sleep(0.4)
        task.cancel()

    asyncio.run(main())
    assert seen == [1, 2, 3, 4, 5] and f.cursor == 5  # the cursor was past the router's newest bar


def test_no_router_is_waited_for_without_error():
    errors = []
    f = BarFollower(lambda: None, lambda: None, lambda bars: None, absent_s=0.01, on_error=errors.append)

    async def main():
        task = asyncio.create_task(f.run())
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(main())
    assert errors == [] and f.cursor == 0
