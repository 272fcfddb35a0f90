"""The feed router on real Ray actors: kill, stall, a bad bar, and a router restart.

Two replay feeds send the same ground-truth bars; faults are injected into the
primary while a consumer reads the router. The consumer must see every
(symbol, ts) once, in order, with the true prices, and the router must record
the failover with its reason. (How fast it fails over is measured by
bench/bench_feeds.py; the timing rule itself is tested in simulated time in
tests/test_feedrouter.py.)
"""

from __future__ import annotations

import random
import time
import uuid

import pytest
import ray

from cluster.runtime import actor_options
from cluster.settings import load_settings
from core.store import BarStore
from core.synthetic import generate_bars

# Each test streams bars through real feed actors for about 30 s: left out of a bare `pytest`, run
# by `make test`.
pytestmark = pytest.mark.slow

SYMS = ["SPY", "QQQ"]
N = 120


@pytest.fixture
def feed_env(ray_session, tmp_path):
    settings = load_settings(
        use_file=False,
        store={"uri": str(tmp_path / "store")},
        feeds={"symbols": SYMS, "bar_interval_s": 0.15, "stall_intervals": 4, "failback_intervals": 5,
               "store_batch": 16},
    )
    truth = generate_bars(SYMS, N, seed=21)
    BarStore.from_settings(settings.store).append(truth)
    return settings, truth


def start(settings, tag: str, write_store: bool = False):
    from actors.feeds import FeedActor
    from actors.router import FeedRouter

    names = [f"feed:{tag}-primary", f"feed:{tag}-backup"]
    feeds = [
        FeedActor.options(**actor_options("feed", settings, n, detached=False)).remote(n, "replay", SYMS, settings)
        for n in names
    ]
    router = FeedRouter.options(**actor_options("feed_router", settings, f"router:{tag}", detached=False)).remote(
        tag, names, SYMS, settings, write_store
    )
    ray.get([f.start.remote() for f in feeds])
    ray.get(router.start.remote())
    return feeds, router


def consume(router, n_total: int, timeout: float = 90.0, on_progress=None) -> list[dict]:
    got: list[dict] = []
    deadline = time.time() + timeout
    while len(got) < n_total and time.time() < deadline:
        try:
            got += ray.get(router.since.remote(got[-1]["seq"] if got else 0), timeout=10)
        except ray.exceptions.RayActorError:
            pass  # the router is restarting
        if on_progress:
            on_progress(len(got))
        time.sleep(0.02)
    return got


def assert_exact(got: list[dict], truth) -> None:
    for sym in SYMS:
        want = truth[truth.symbol == sym]
        seen = [(b["ts"], b["close"]) for b in got if b["symbol"] == sym]
        assert seen == list(zip(want["ts"].astype("int64"), want["close"])), sym
    seqs = [b["seq"] for b in got]
    assert seqs == sorted(set(seqs)), "router sequence numbers repeat or go back"


def test_kill_primary_mid_stream(feed_env):
    settings, truth = feed_env
    tag = f"kill-{uuid.uuid4().hex[:6]}"
    feeds, router = start(settings, tag)
    kill_at = random.Random(1).randint(40, 120)
    killed = {}

    def kill(n):
        if n >= kill_at and not killed:
            ray.kill(feeds[0], no_restart=True)
            killed["at"] = time.time()

    got = consume(router, 2 * N, on_progress=kill)
    assert killed, "the stream ended before the kill"
    assert_exact(got, truth)
    h = ray.get(router.health.remote())
    primary = next(s for s in h["sources"] if s["name"] == f"feed:{tag}-primary")
    # Marked dead either by Ray's death notice or by a poll that got no answer from the killed actor.
    assert not primary["alive"] and ("died" in primary["last_error"] or "no answer" in primary["last_error"]), primary
    assert h["active"] == f"feed:{tag}-backup"
    # If the primary was active when it died (it is, unless a loaded machine had
    # already failed over for a stall), the switch names the death.
    to_backup = [e for e in h["events"] if e["kind"] == "failover" and e["to"] == f"feed:{tag}-backup"]
    assert to_backup and (to_backup[-1]["reason"].startswith("dead") or to_backup[-1]["reason"].startswith("stalled"))
    assert any(b["source"] == f"feed:{tag}-backup" for b in got)
    ray.kill(router)
    ray.kill(feeds[1])


def test_stall_then_recover_fails_over_and_back(feed_env):
    settings, truth = feed_env
    tag = f"stall-{uuid.uuid4().hex[:6]}"
    feeds, router = start(settings, tag)
    phase = {}

    def stall(n):
        if n >= 60 and "paused" not in phase:
            ray.get(feeds[0].pause.remote(True))
            phase["paused"] = n
        elif n >= 110 and "resumed" not in phase:
            ray.get(feeds[0].pause.remote(False))
            phase["resumed"] = n

    got = consume(router, 2 * N, on_progress=stall)
    assert_exact(got, truth)
    h = ray.get(router.health.remote())
    kinds = [(e["kind"], e["reason"].split(":")[0]) for e in h["events"]]
    assert ("failover", "stalled") in kinds
    # The paused replay resumes where it was, behind the others: it recovers,
    # stays healthy for the failback window, and is failed back to if the
    # stream lasts that long; either way no bar was lost or repeated.
    assert all(b["source"] in (f"feed:{tag}-primary", f"feed:{tag}-backup") for b in got)
    ray.kill(router)
    for f in feeds:
        ray.kill(f)


@pytest.mark.parametrize("fault", ["spike", "nan", "out_of_order"])
def test_bad_bar_from_primary(feed_env, fault):
    settings, truth = feed_env
    tag = f"{fault}-{uuid.uuid4().hex[:6]}"
    feeds, router = start(settings, tag)
    injected = {}

    def inject(n):
        if n >= 70 and not injected:
            ray.get(feeds[0].inject_fault.remote(fault))
            injected["at"] = n

    got = consume(router, 2 * N, on_progress=inject)
    assert_exact(got, truth)
    h = ray.get(router.health.remote())
    want = {"spike": "spike not confirmed", "nan": "non-finite price", "out_of_order": "ts not increasing"}[fault]
    assert any(e["kind"] == "failover" and want in e["reason"] for e in h["events"]), h["events"]
    ray.kill(router)
    for f in feeds:
        ray.kill(f)


def test_restarted_router_emits_nothing_twice(feed_env):
    settings, truth = feed_env
    tag = f"restart-{uuid.uuid4().hex[:6]}"
    feeds, router = start(settings, tag, write_store=True)
    crashed = {}

    def crash(n):
        if n >= 80 and not crashed:
            ray.kill(router, no_restart=False)  # Ray restarts it (max_restarts=-1)
            crashed["at"] = n

    got = consume(router, 2 * N, on_progress=crash)
    assert crashed
    assert_exact(got, truth)
    h = ray.get(router.health.remote())
    assert h["restarted"] is True
    ray.get(router.flush.remote())
    # Everything delivered is in the store, once.
    store = BarStore.from_settings(settings.store)
    assert len(store.read("SPY")) == N
    ray.kill(router)
    for f in feeds:
        ray.kill(f)


# -- dead or slow: how an unanswered poll is judged (no Ray needed) --------------------
def _judge(answer_after: float | None, registered: bool, error: Exception | None = None):
    import asyncio

    from actors.router import answer_or_gone

    lookups = []

    async def call():
        if error is not None:
            raise error
        await asyncio.sleep(3600 if answer_after is None else answer_after)
        return "bars"

    async def is_registered() -> bool:
        lookups.append(time.monotonic())
        return registered

    async def run():
        t0 = time.monotonic()
        try:
            out = await answer_or_gone(call(), is_registered, suspect_s=0.05, limit_s=0.4)
        except Exception as e:  # noqa: BLE001 - the verdict is the exception
            out = e
        return out, time.monotonic() - t0

    out, took = asyncio.run(run())
    return out, took, lookups


def test_unanswered_poll_of_an_actor_the_gcs_no_longer_knows_is_a_death_within_the_suspect_time():
    from actors.router import SourceGone

    out, took, lookups = _judge(None, registered=False)
    assert isinstance(out, SourceGone) and "no actor by that name" in str(out)
    assert 0.05 <= took < 0.25 and len(lookups) == 1


def test_slow_but_registered_source_is_not_declared_dead_early():
    out, took, lookups = _judge(0.15, registered=True)
    assert out == "bars" and len(lookups) == 1
    out, took, _ = _judge(None, registered=True)
    assert isinstance(out, TimeoutError) and took >= 0.4 - 0.01  # left to the stall limit


def test_a_failing_gcs_lookup_is_no_verdict():
    import asyncio

    from actors.router import answer_or_gone

    async def call():
        await asyncio.sleep(0.15)
        return "bars"

    async def lookup_fails() -> bool:
        raise RuntimeError("GCS unavailable")

    assert asyncio.run(answer_or_gone(call(), lookup_fails, suspect_s=0.05, limit_s=0.4)) == "bars"


def test_fast_answers_and_ray_errors_need_no_lookup():
    from ray.exceptions import ActorDiedError

    out, _, lookups = _judge(0.0, registered=False)
    assert out == "bars" and lookups == []
    out, _, lookups = _judge(None, registered=True, error=ActorDiedError())
    assert isinstance(out, ActorDiedError) and lookups == []
