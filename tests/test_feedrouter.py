"""Fault injection on the feed router's logic, in simulated time, over many randomised runs.

Two sources send the same ground-truth bars (as a primary and its backup do),
each with its own random lag. At a random bar the primary dies, stalls or sends
a bad bar. Afterwards the consumer's sequence must equal the ground truth:
no bar lost, none duplicated, order kept; the failover must come within two
bar intervals of the fault, with its reason recorded; and a primary that
recovers must be failed back to.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest

from actors.feeds import bars_to_records
from core.feedrouter import RouterConfig, RouterState
from core.synthetic import generate_bars

I = 1.0  # bar interval, simulated seconds
SYMS = ["AAA", "BBB"]
N_TICKS = 70


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class SimSource:
    name: str
    lag: float
    schedule: dict[int, list[dict]] = field(default_factory=dict)  # tick -> records
    dead_from: float | None = None
    sent_ticks: set = field(default_factory=set)

    def due(self, now: float) -> list[dict]:
        out = []
        for k in sorted(self.schedule):
            if k in self.sent_ticks:
                continue
            if k * I + self.lag <= now:
                out.extend(self.schedule[k])
                self.sent_ticks.add(k)
        return out


def truth_ticks(seed: int) -> list[list[dict]]:
    df = generate_bars(SYMS, N_TICKS, seed=seed, interval="1min")
    recs = bars_to_records(df)
    ticks: list[list[dict]] = [[] for _ in range(N_TICKS)]
    for r in recs:
        ticks[r["seq"]].append(r)
    return ticks


def corrupt(bar: dict, kind: str) -> dict:
    b = dict(bar)
    if kind == "nan":
        b["close"] = math.nan
    elif kind == "zero":
        b["low"] = 0.0
    elif kind == "negative":
        b["open"] = -b["open"]
    elif kind == "high_low":
        b["high"], b["low"] = b["low"] * 0.99, b["high"] * 1.01
    elif kind == "spike":
        b["close"] = b["close"] * 1.5
        b["high"] = max(b["high"], b["close"])
    return b


EXPECTED_REASON = {
    "kill": "dead",
    "stall": "stalled",
    "nan": "non-finite price",
    "zero": "non-positive price",
    "negative": "non-positive price",
    "high_low": "high below open/close",
    "spike": "spike not confirmed",
    "duplicate": "duplicate ts",
    "out_of_order": "ts not increasing",
}


def run_sim(kind: str, seed: int, recover: bool = True):
    rng = random.Random(seed * 1000 + hash(kind) % 997)
    ticks = truth_ticks(seed)
    clock = Clock()
    cfg = RouterConfig(interval_s=I, stall_intervals=2.0, failback_intervals=5, spike_sigmas=8.0)
    router = RouterState(["primary", "backup"], SYMS, cfg, clock=clock)
    primary = SimSource("primary", lag=rng.uniform(0.0, 0.3))
    backup = SimSource("backup", lag=rng.uniform(0.0, 0.3))
    for k, bars in enumerate(ticks):
        primary.schedule[k] = [dict(b) for b in bars]
        backup.schedule[k] = [dict(b) for b in bars]
    f = rng.randint(25, 40)
    victim = rng.choice(SYMS)
    fault_time = f * I + primary.lag
    if kind == "kill":
        primary.dead_from = f * I + primary.lag * rng.random()
        fault_time = primary.dead_from
        for k in range(f, N_TICKS):
            primary.schedule.pop(k, None)
    elif kind == "stall":
        resume = f + 6 if recover else N_TICKS
        for k in range(f, resume):
            primary.schedule.pop(k, None)
    elif kind in ("nan", "zero", "negative", "high_low", "spike"):
        primary.schedule[f] = [corrupt(b, kind) if b["symbol"] == victim else b for b in ticks[f]]
    elif kind == "duplicate":
        prev = next(b for b in ticks[f - 1] if b["symbol"] == victim)
        primary.schedule[f] = [dict(prev) if b["symbol"] == victim else b for b in ticks[f]]
    elif kind == "out_of_order":
        a = [b for b in ticks[f] if b["symbol"] == victim]
        nxt = [b for b in ticks[f + 1] if b["symbol"] == victim]
        primary.schedule[f] = [b for b in ticks[f] if b["symbol"] != victim] + nxt
        primary.schedule[f + 1] = [b for b in ticks[f + 1] if b["symbol"] != victim] + a
    delivered: list[dict] = []
    dt = 0.05 * I
    steps = int((N_TICKS - 1 + 1.8) * I / dt)  # stop before the end of data looks like a stall
    for _ in range(steps):
        clock.t += dt
        for src in (primary, backup):
            if src.dead_from is not None and clock.t >= src.dead_from:
                router.mark_dead(src.name, "actor died")
                continue
            recs = src.due(clock.t)
            if recs:
                router.ingest(src.name, recs)
        delivered.extend(router.step())
    return router, delivered, ticks, fault_time, f


KINDS = list(EXPECTED_REASON)
SEEDS = range(12)


@pytest.mark.parametrize("kind", KINDS)
def test_fault_injection_many_randomised_runs(kind):
    for seed in SEEDS:
        router, delivered, ticks, fault_time, f = run_sim(kind, seed)
        ctx = f"{kind} seed {seed} fault at bar {f}"
        # Each (symbol, ts) exactly once, in order, with the true values.
        for sym in SYMS:
            got = [(b["ts"], b["close"]) for b in delivered if b["symbol"] == sym]
            want = [(b["ts"], b["close"]) for t in ticks for b in t if b["symbol"] == sym]
            assert got == want, ctx
        seqs = [b["seq"] for b in delivered]
        assert seqs == list(range(1, len(delivered) + 1)), ctx
        # The failover: first event away from the primary, in time, with its reason.
        fo = [e for e in router.events if e.kind == "failover"]
        assert fo, f"{ctx}: no failover recorded"
        first = fo[0]
        assert (first.from_source, first.to_source) == ("primary", "backup"), ctx
        assert EXPECTED_REASON[kind] in first.reason, f"{ctx}: reason {first.reason!r}"
        assert first.at - fault_time <= 2 * I + 1e-9, f"{ctx}: failover {first.at - fault_time:.2f} intervals after the fault"
        assert first.at >= fault_time - 1e-9, ctx
        # Recovery: a primary that comes back is failed back to (a killed one never is).
        fb = [e for e in router.events if e.kind == "failback"]
        if kind == "kill":
            assert fb == [] and router.active == "backup", ctx
        else:
            assert fb and fb[-1].to_source == "primary" and router.active == "primary", ctx
            assert fb[0].at - fo[-1].at >= 5 * I - 1e-9, ctx  # healthy for M intervals first


def test_no_fault_no_failover_and_same_bars():
    for seed in range(3):
        rng = random.Random(seed)
        ticks = truth_ticks(seed)
        clock = Clock()
        router = RouterState(["primary", "backup"], SYMS, RouterConfig(interval_s=I), clock=clock)
        srcs = [SimSource("primary", rng.uniform(0, 0.3)), SimSource("backup", rng.uniform(0, 0.3))]
        for s in srcs:
            s.schedule = {k: [dict(b) for b in bars] for k, bars in enumerate(ticks)}
        out = []
        for _ in range(int((N_TICKS + 1) / 0.05)):
            clock.t += 0.05
            for s in srcs:
                router.ingest(s.name, s.due(clock.t))
            out.extend(router.step())
        assert len(out) == N_TICKS * len(SYMS)
        assert all(b["source"] == "primary" for b in out)
        assert [e for e in router.events] == []


def test_real_spike_confirmed_by_backup_is_delivered_without_failover():
    ticks = truth_ticks(5)
    f = 30
    for t in ticks[f]:
        if t["symbol"] == "AAA":
            t.update(corrupt(t, "spike"))  # both sources see it: the market moved
    clock = Clock()
    router = RouterState(["primary", "backup"], SYMS, RouterConfig(interval_s=I), clock=clock)
    srcs = [SimSource("primary", 0.1), SimSource("backup", 0.2)]
    for s in srcs:
        s.schedule = {k: [dict(b) for b in bars] for k, bars in enumerate(ticks)}
    out = []
    for _ in range(int((N_TICKS + 1) / 0.05)):
        clock.t += 0.05
        for s in srcs:
            router.ingest(s.name, s.due(clock.t))
        out.extend(router.step())
    spike = [b for b in out if b["symbol"] == "AAA"][f]
    assert spike["close"] == next(b["close"] for b in ticks[f] if b["symbol"] == "AAA")
    assert [e.kind for e in router.events] == []
    assert "flagged" not in spike


def test_single_source_spike_is_flagged_not_lost():
    ticks = truth_ticks(6)
    f = 30
    for t in ticks[f]:
        if t["symbol"] == "BBB":
            t.update(corrupt(t, "spike"))
    clock = Clock()
    router = RouterState(["only"], SYMS, RouterConfig(interval_s=I), clock=clock)
    src = SimSource("only", 0.1)
    src.schedule = {k: [dict(b) for b in bars] for k, bars in enumerate(ticks)}
    out = []
    for _ in range(int((N_TICKS + 2) / 0.05)):
        clock.t += 0.05
        router.ingest("only", src.due(clock.t))
        out.extend(router.step())
    bbb = [b for b in out if b["symbol"] == "BBB"]
    assert len(bbb) == N_TICKS and bbb[f].get("flagged") is True
    assert [e.kind for e in router.events] == ["spike_flagged"]


def test_window_and_since():
    ticks = truth_ticks(2)
    clock = Clock()
    router = RouterState(["p"], SYMS, RouterConfig(interval_s=I, window=16), clock=clock)
    for k, bars in enumerate(ticks):
        clock.t = k * I + 0.1
        router.ingest("p", bars)
        router.step()
    w = router.window("AAA", 10)
    assert [b["ts"] for b in w] == [b["ts"] for t in ticks[-10:] for b in t if b["symbol"] == "AAA"]
    assert len(router.window("AAA", 100)) == 16
    after = router.since(100)
    assert [b["seq"] for b in after] == list(range(101, 2 * N_TICKS + 1))
    assert router.since(2 * N_TICKS) == []


# -- bursts: the array path delivers exactly what the bar-by-bar loop does ------------
def _burst_run(seed: int) -> tuple[list, list, dict]:
    """Two sources sending long bursts (a backfill, a replay) with gaps, real and false spikes."""
    rng = random.Random(seed)
    ticks = [list(t) for t in truth_ticks_n(seed, 900)]
    for k in rng.sample(range(250, 900), 4):  # gaps in the market: no source has these
        ticks[k] = []
    for k in [*range(400, 520, 2), *range(700, 790, 3), *range(791, 800, 2)]:  # slower stretches:
        ticks[k] = []  # the median spacing moves, so when it is refreshed matters
    for k in rng.sample(range(250, 900), 3):  # real moves both sources see
        for b in ticks[k]:
            b.update(corrupt(b, "spike"))
    primary = [[dict(b) for b in t] for t in ticks]
    backup = [[dict(b) for b in t] for t in ticks]
    for k in rng.sample(range(250, 900), 3):  # false spikes and holes in the primary only
        primary[k] = [corrupt(b, "spike") for b in primary[k]]
    for k in rng.sample(range(250, 900), 3):
        primary[k] = []
    clock = Clock()
    router = RouterState(["primary", "backup"], SYMS, RouterConfig(interval_s=I, spike_sigmas=6.0), clock=clock)
    out = []
    for start in range(0, 900, 300):  # three bursts of 300 bars a symbol
        clock.t = start + 300.0
        router.ingest("backup", [b for t in backup[start:start + 300] for b in t])
        router.ingest("primary", [b for t in primary[start:start + 300] for b in t])
        for _ in range(60):
            out.extend(router.step())
            clock.t += 0.5
    delivered = [(b["symbol"], b["ts"], b["close"], b["seq"], b["source"], b.get("flagged")) for b in out]
    events = [(e.at, e.from_source, e.to_source, e.reason, e.kind) for e in router.events]
    state = {
        "stats": {s: (list(st.values), st.total, st.total_sq) for s, st in router._returns.items()},
        "spacing": dict(router._spacing), "diffs": {s: list(d) for s, d in router._diffs.items()},
        "windows": {s: [b["seq"] for b in w] for s, w in router.windows.items()},
        "last": dict(router.last_delivered), "seq": router.seq,
    }
    return delivered, events, state


def truth_ticks_n(seed: int, n: int) -> list[list[dict]]:
    recs = bars_to_records(generate_bars(SYMS, n, seed=seed, interval="1min"))
    ticks: list[list[dict]] = [[] for _ in range(n)]
    for r in recs:
        ticks[r["seq"]].append(r)
    return ticks


@pytest.mark.parametrize("seed", range(4))
def test_bursts_through_the_array_path_equal_the_loop_to_the_bit(seed, monkeypatch):
    from core import feedrouter as fr

    calls = []
    arrays = fr.RouterState._deliver_plain_arrays

    def counted(self, *a):
        j = arrays(self, *a)
        calls.append(j - a[3])
        return j

    monkeypatch.setattr(fr.RouterState, "_deliver_plain_arrays", counted)
    monkeypatch.setattr(fr, "ARRAY_MIN_BARS", 10**9)
    loop = _burst_run(seed)
    assert calls == []
    for loop_bars, min_bars, chunk in ((8, 64, 512), (1, 2, 7)):  # as shipped; every chunk edge
        monkeypatch.setattr(fr, "LOOP_BARS", loop_bars)
        monkeypatch.setattr(fr, "ARRAY_MIN_BARS", min_bars)
        monkeypatch.setattr(fr, "ARRAY_CHUNK_BARS", chunk)
        calls.clear()
        assert _burst_run(seed) == loop
        assert sum(calls) > len(loop[0]) / 3  # a good share of the bars went through the arrays
    delivered, events, _ = loop
    assert len({(d[0], d[1]) for d in delivered}) == len(delivered)
    assert any(e[4] == "spike_rejected" or "spike" in e[3] for e in events)


def test_the_stall_clock_starts_with_a_sources_first_bar():
    """A feed still starting (no bar yet) is not a stall until start_grace_intervals; after its first bar,
    stall_intervals without one is (issue 19: spurious failovers at start-up)."""
    clock = Clock()
    router = RouterState(["primary", "backup"], SYMS, RouterConfig(interval_s=I, stall_intervals=2,
                                                                   start_grace_intervals=10), clock=clock)
    feeds = router.feeds
    clock.t = 5 * I  # past stall_intervals, within the grace: starting, not stalled
    assert feeds.why_unhealthy("primary") is None
    clock.t = 10.5 * I
    assert feeds.why_unhealthy("primary").startswith("stalled: no first bar in 10.50s (10 intervals)")
    bars = bars_to_records(generate_bars(SYMS, 1, seed=1, interval="1s"))
    router.ingest("backup", bars)  # its first bar: from now on the ordinary stall clock
    clock.t = 11.5 * I
    assert feeds.why_unhealthy("backup") is None
    clock.t = 13 * I
    assert feeds.why_unhealthy("backup").startswith("stalled: no bar for 2.50s (2 intervals)")
