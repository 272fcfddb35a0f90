"""What the atomic risk book costs under load: 8 clients, a mixed load against a decision-only load, one run.

    .venv/bin/python bench/bench_risk.py [--duration 6] [--rounds 3] [--clients 8]

One local Ray and the whole system (``raytrade.system.start_system``, as ``raytrade up`` starts
it) over a temporary store, with two paper accounts. In each round, interleaved:

- ``decide``: every client sends ``POST /v1/decisions`` without ``execute``: the ingress's live
  window, the ensemble and a risk verdict previewed from the account's snapshot; nothing is
  booked. The peer: what the endpoint costs when no order goes through the risk book.
- ``mixed``: every client sends, at random, an executed decision or an order of a random size
  and side (``POST /v1/orders``), over two symbols and two accounts: each is judged by the
  account's risk manager on filled plus working orders and booked with the broker in one step
  per account (``actors/risk.py``).

It prints, per round and as medians over rounds: requests/s, p50 and p99 of all answers
(approved or refused with a reason), approved orders per second, and the ratio of the mixed
load's requests/s to the decision-only load's. Target (issue 16): the risk book costs at most
20 % of throughput (ratio >= 0.8). Not a test: it prints figures and exits 0 either way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TRADE_KEY = "rt-bench-trade-key-000001"
ADMIN_KEY = "rt-bench-admin-key-000001"
ACCOUNTS = ("default", "second")
SYMS = ("SPY", "QQQ")
TARGET = 0.8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_settings(store: str, port: int):
    from cluster.settings import load_settings

    return load_settings(
        use_file=False,
        store={"uri": store},
        feeds={"symbols": list(SYMS), "bar_interval_s": 0.5, "replay_start": "2024-01-02 21:10"},
        # High caps, so the mixed load keeps placing orders instead of being refused at the cap.
        risk={"allowed_symbols": list(SYMS), "confidence_threshold": 0.0, "max_position_pct": 1.0,
              "max_risk_per_trade_pct": 0.2, "max_daily_loss_pct": 1.0, "max_drawdown_pct": 1.0},
        serve={"port": port, "rate_limit_per_s": 1e6, "rate_burst": 1e6},
        api_keys=[{"name": "bench", "key": TRADE_KEY, "role": "trade"},
                  {"name": "ops", "key": ADMIN_KEY, "role": "admin"}],
        accounts={a: {} for a in ACCOUNTS},
        broker={"ledger_dir": os.path.join(os.path.dirname(store), "ledger"), "starting_cash": 10_000_000},
        ray={"namespace": "raytrade-bench-risk", "include_dashboard": False},
    )


async def load(base: str, mixed: bool, clients: int, duration_s: float, warmup_s: float, seed: int) -> dict:
    """``clients`` callers back to back for ``duration_s`` after ``warmup_s``; each request's latency."""
    headers = {"X-API-Key": TRADE_KEY}
    lat: list[float] = []
    approved = refused = 0
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=30.0) as client:
        async def caller(i: int, until: float, record: bool) -> None:
            nonlocal approved, refused
            rng = random.Random(seed * 1000 + i)
            while time.perf_counter() < until:
                acct, sym = rng.choice(ACCOUNTS), rng.choice(SYMS)
                if not mixed:
                    path, body = "/v1/decisions", {"symbol": sym, "account": acct}
                elif rng.random() < 0.5:
                    path, body = "/v1/decisions", {"symbol": sym, "account": acct, "execute": True,
                                                   "decision_id": f"b-{uuid.uuid4().hex[:20]}"}
                else:
                    path, body = "/v1/orders", {"symbol": sym, "account": acct, "side": rng.choice(["BUY", "SELL"]),
                                                "quantity": rng.randint(1, 50),
                                                "client_order_id": f"b-{uuid.uuid4().hex[:20]}"}
                t0 = time.perf_counter()
                try:
                    r = await client.post(path, json=body, headers=headers)
                    status = r.status_code
                    booked = status == 200 and (path == "/v1/orders" or r.json().get("order") is not None)
                except httpx.HTTPError as e:
                    status, booked = type(e).__name__, False
                dt = time.perf_counter() - t0
                if not record:
                    continue
                if status in (200, 422):  # an answer: a decision, an order, or a refusal with its reason
                    lat.append(dt)
                    if mixed:
                        approved, refused = approved + booked, refused + (not booked)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

        t_warm = time.perf_counter() + warmup_s
        await asyncio.gather(*(caller(i, t_warm, False) for i in range(clients)))
        t0 = time.perf_counter()
        await asyncio.gather(*(caller(i, t0 + duration_s, True) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return {"rps": len(lat) / elapsed, "p50": pct(0.5), "p99": pct(0.99), "orders_per_s": approved / elapsed,
            "approved": approved, "refused": refused, "n": len(lat), "errors": errors}


def wait_ok(base: str, timeout_s: float) -> None:
    deadline, last = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            last = httpx.post(f"{base}/v1/decisions", json={"symbol": "SPY"}, headers={"X-API-Key": TRADE_KEY},
                              timeout=30)
            if last.status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the endpoint did not answer 200 within {timeout_s:.0f}s: "
                       f"{last.status_code if last is not None else 'no answer'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=6.0, help="seconds measured per load and round")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each measurement, not counted")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each load once per round; medians over rounds")
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()

    import ray

    from cluster.runtime import connect
    from core.store import BarStore
    from core.synthetic import generate_bars
    from raytrade.system import start_system, stop_system

    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="raytrade-bench-risk-")
    port = free_port()
    settings = bench_settings(os.path.join(tmp, "store"), port)
    BarStore.from_settings(settings.store).append(generate_bars(list(SYMS), 600, seed=7))
    connect(settings, num_cpus=4)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    print(f"raytrade risk-book benchmark: {os.cpu_count()} cores, ray {ray.__version__}, {args.clients} clients, "
          f"{args.rounds} round(s) x {args.duration:g}s (+{args.warmup:g}s warm-up)", flush=True)
    try:
        start_system(settings, progress=lambda m: print(f"  {m}", flush=True))
        base = f"http://127.0.0.1:{port}"
        wait_ok(base, 240)
        print(f"  up in {time.time() - t_start:.0f}s")
        print(f"{'round':>5} {'load':<7} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'orders/s':>9} {'n':>6}  errors")
        res: dict[str, list[dict]] = {"decide": [], "mixed": []}
        for rnd in range(args.rounds):
            order = ["decide", "mixed"] if rnd % 2 == 0 else ["mixed", "decide"]
            for name in order:
                r = asyncio.run(load(base, name == "mixed", args.clients, args.duration, args.warmup, rnd))
                res[name].append(r)
                print(f"{rnd + 1:>5} {name:<7} {r['rps']:>8.1f} {r['p50']:>8.2f} {r['p99']:>8.2f} "
                      f"{r['orders_per_s']:>9.1f} {r['n']:>6}  {r['errors'] or ''}", flush=True)

        def med(name: str, k: str) -> float:
            return statistics.median(r[k] for r in res[name])

        print(f"\nmedians over {args.rounds} round(s)")
        for name in res:
            print(f"  {name:<7} {med(name, 'rps'):>8.1f} req/s  p50 {med(name, 'p50'):.2f} ms  "
                  f"p99 {med(name, 'p99'):.2f} ms  {med(name, 'orders_per_s'):.1f} approved orders/s")
        ratio = med("mixed", "rps") / med("decide", "rps")
        print(f"mixed / decision-only: req/s {ratio:.2f}, p50 {med('mixed', 'p50') / med('decide', 'p50'):.2f}x, "
              f"p99 {med('mixed', 'p99') / med('decide', 'p99'):.2f}x")
        print(f"target (the risk book costs at most 20 % of throughput, req/s ratio >= {TARGET}): "
              f"{'meets' if ratio >= TARGET else 'MISSES'}")
        print(f"total {time.time() - t_start:.0f}s")
    finally:
        stop_system(settings)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
