"""Feed failover and router throughput, measured on a local Ray.

    .venv/bin/python bench/bench_feeds.py [--repeats 5] [--intervals 1.0 0.5]

1. Failover time: two replay feeds of the same bars under a router; the
   primary is killed (ray.kill) or stalled (paused) mid-stream, and we time
   from the fault to the first bar the consumer receives from the backup.
   For a stall the fault is the moment the primary's next bar was due.
2. Throughput: bars per second through the router's quality gate and fan-out,
   against a bare pass-through actor reading the same feed, in the same run;
   the ratio is the gate's cost. Like for like: the same bars from the same
   full feed buffer, the same poll call at the same interval, the same
   ``since`` batches to the consumer; one at a time, in alternating order.
   Beside wall-clock rates (noisy on a shared machine) it prints each actor
   process's CPU time per 1,000 bars, whose ratio is the same cost without
   the neighbours' load.

Targets (issue 3): failover within 2 bar intervals at every interval down to
1 s and under 250 ms after an actor dies; the router keeps at least half the
pass-through's throughput.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray  # noqa: E402

from cluster.runtime import actor_options, connect  # noqa: E402
from cluster.settings import load_settings  # noqa: E402
from core.store import BarStore  # noqa: E402
from core.synthetic import generate_bars  # noqa: E402

SYMS = ["SPY", "QQQ", "AAPL", "MSFT"]


@ray.remote
class PassThrough:
    """The peer: polls a feed as the router does (the same call, every poll interval) and
    serves ``since``, with no gate, no failover and no store."""

    def __init__(self, feed_name: str, namespace: str, poll_s: float):
        self.feed = ray.get_actor(feed_name, namespace=namespace)
        self.poll_s = poll_s
        self.buf: list[dict] = []
        self.cursor = 0
        self.task = None

    async def start(self):
        import asyncio

        async def run():
            while True:
                recs, _ = await self.feed.since_with_incarnation.options(max_task_retries=0).remote(self.cursor)
                if recs:
                    self.cursor = recs[-1]["seq"]
                    self.buf.extend(recs)
                await asyncio.sleep(self.poll_s)

        self.task = asyncio.get_running_loop().create_task(run())

    async def since(self, seq: int, limit: int = 10_000):
        return self.buf[seq: seq + limit]


def _settings(store: str, interval: float, pace: str = "interval"):
    return load_settings(
        use_file=False, store={"uri": store},
        feeds={"symbols": SYMS, "bar_interval_s": interval, "stall_intervals": 2.0, "replay_pace": pace,
               "store_batch": 256},
        ray={"include_dashboard": False},
    )


def failover_once(s, mode: str) -> tuple[float, float, str]:
    from actors.feeds import FeedActor
    from actors.router import FeedRouter

    tag = uuid.uuid4().hex[:6]
    names = [f"feed:b-{tag}-p", f"feed:b-{tag}-b"]
    feeds = [FeedActor.options(**actor_options("feed", s, n, detached=False)).remote(n, "replay", SYMS, s) for n in names]
    router = FeedRouter.options(**actor_options("feed_router", s, f"router:b-{tag}", detached=False)).remote(
        f"b-{tag}", names, SYMS, s, False)
    ray.get([f.start.remote() for f in feeds] + [router.start.remote()])
    got, cursor = 0, 0
    while got < 5 * len(SYMS):  # warm up: five bars per symbol
        recs = ray.get(router.since.remote(cursor))
        if recs:
            cursor, got = recs[-1]["seq"], got + len(recs)
        time.sleep(0.005)
    h = ray.get(feeds[0].health.remote())
    t_next_due = time.time() - (h["seconds_since_last_bar"] or 0) + s.feeds.bar_interval_s
    if mode == "kill":
        t_fault = time.time()
        ray.kill(feeds[0], no_restart=True)
    else:
        ray.get(feeds[0].pause.remote(True))
        t_fault = t_next_due  # a stall is a fault from the moment its next bar was due
    t_first = None
    deadline = time.time() + 20 * s.feeds.bar_interval_s + 10
    while t_first is None and time.time() < deadline:
        recs = ray.get(router.since.remote(cursor))
        for r in recs:
            if r["source"] == names[1]:
                t_first = time.time()
                break
        if recs:
            cursor = recs[-1]["seq"]
        time.sleep(0.002)
    events = ray.get(router.health.remote())["events"]
    fo = [e for e in events if e["kind"] == "failover" and e["from"] == names[0]]
    for a in [router, *feeds]:
        ray.kill(a)
    detect = (fo[0]["wall"] - t_fault) if fo else float("nan")
    # The first bar from the backup cannot come before it is due.
    deliver = (t_first - max(t_fault, t_next_due)) if t_first else float("nan")
    return detect, deliver, (fo[0]["reason"] if fo else "no failover")


def _detected_by(reason: str) -> str:
    if "no actor by that name" in reason:
        return "GCS lookup"
    if "died" in reason:
        return "Ray's death notice"
    return reason.split(":")[0]


def throughput(store: str, n_bars: int, repeats: int) -> list[tuple[float, float, float, float]]:
    """Per repeat: router and pass-through bars/s, and each one's CPU ms per 1,000 bars.

    One feed, its buffer full first, read by a fresh router and a fresh
    pass-through in turn (the order alternates between repeats); each is gone
    before the other starts, so neither polls in the background of the other's run.
    """
    from actors.feeds import FeedActor
    from actors.router import FeedRouter, poll_interval_s

    s = _settings(store, 0.01, pace="fast")
    tag = uuid.uuid4().hex[:6]
    fname = f"feed:t-{tag}"
    feed = FeedActor.options(**actor_options("feed", s, fname, detached=False)).remote(fname, "replay", SYMS, s)
    total = n_bars * len(SYMS)
    ray.get(feed.start.remote())
    while ray.get(feed.health.remote())["emitted"] < total:  # the feed's buffer is full first
        time.sleep(0.05)

    def cpu_s(actor) -> float:
        # The actor process's CPU time, all its threads (Ray's serialisation too).
        return ray.get(actor.__ray_call__.remote(lambda _self: time.process_time()))

    def drain(make) -> tuple[float, float]:
        actor = make()
        cpu0 = cpu_s(actor)
        ray.get(actor.start.remote())
        t0 = time.perf_counter()
        cursor, got = 0, 0
        while got < total:
            recs = ray.get(actor.since.remote(cursor))
            if recs:
                cursor, got = recs[-1]["seq"], got + len(recs)
            else:
                time.sleep(0.001)
        rate = total / (time.perf_counter() - t0)
        cpu_ms = 1e6 * (cpu_s(actor) - cpu0) / total
        ray.kill(actor)
        return rate, cpu_ms

    def router():
        name = f"t-{tag}-{uuid.uuid4().hex[:4]}"
        return FeedRouter.options(**actor_options("feed_router", s, f"router:{name}", detached=False)).remote(
            name, [fname], SYMS, s, False)

    def peer():
        return PassThrough.options(num_cpus=0.1).remote(fname, s.ray.namespace, poll_interval_s(s.feeds.bar_interval_s))

    out = []
    for i in range(repeats):
        if i % 2 == 0:
            (r_rate, r_cpu), (p_rate, p_cpu) = drain(router), drain(peer)
        else:
            (p_rate, p_cpu), (r_rate, r_cpu) = drain(peer), drain(router)
        out.append((r_rate, p_rate, r_cpu, p_cpu))
    ray.kill(feed)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--intervals", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--throughput-bars", type=int, default=4000, help="bars per symbol")
    ap.add_argument("--throughput-repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    tmp = tempfile.mkdtemp(prefix="raytrade-bench-")
    store_uri = os.path.join(tmp, "store")
    BarStore.from_settings(_settings(store_uri, 1.0).store).append(
        generate_bars(SYMS, max(args.throughput_bars, 400), seed=3))
    connect(_settings(store_uri, 1.0), num_cpus=4)
    print(f"raytrade feed benchmark: {os.cpu_count()} cores, ray {ray.__version__}, "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    print("fault: time from the fault (kill, or the stalled bar's due time) to the router's failover event;")
    print("gap: time from when the first missed bar was due to its delivery from the backup")
    print(f"{'fault':<6} {'interval':>8} {'fault->failover ms':>19} {'(max)':>8} {'in intervals':>12} "
          f"{'gap ms':>8} {'(max)':>8}")
    for interval in args.intervals:
        s = _settings(store_uri, interval)
        for mode in ("kill", "stall"):
            res = [failover_once(s, mode) for _ in range(args.repeats)]
            det = [r[0] * 1000 for r in res]
            gap = [r[1] * 1000 for r in res]
            by = collections.Counter(_detected_by(r[2]) for r in res)
            print(f"{mode:<6} {interval:>7.2f}s {statistics.median(det):>19.1f} {max(det):>8.1f} "
                  f"{statistics.median(det) / 1000 / interval:>12.2f} {statistics.median(gap):>8.1f} {max(gap):>8.1f}"
                  f"   {len(res)} runs; detected by " + ", ".join(f"{k} {v}" for k, v in by.most_common()),
                  flush=True)
    runs = throughput(store_uri, args.throughput_bars, args.throughput_repeats)
    r, p = (statistics.median(x[k] for x in runs) for k in (0, 1))
    r_cpu, p_cpu = (statistics.median(x[k] for x in runs) for k in (2, 3))
    pairs = [x[0] / x[1] for x in runs]
    print(f"throughput: router {r:,.0f} bars/s, bare pass-through {p:,.0f} bars/s, ratio {r / p:.2f} "
          f"(medians of {args.throughput_repeats}, alternating order; per pair: median {statistics.median(pairs):.2f}, "
          f"{min(pairs):.2f} to {max(pairs):.2f})")
    print(f"actor CPU per 1,000 bars (Ray calls and polling included): router {r_cpu:.2f} ms, "
          f"pass-through {p_cpu:.2f} ms, ratio {p_cpu / r_cpu:.2f}; load average {os.getloadavg()[0]:.1f} at the end")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
