"""Latency and throughput of ``POST /v1/decisions`` on Ray Serve, against two peers, in one run.

    .venv/bin/python bench/bench_serve.py [--duration 4] [--concurrency 1 8 32] [--rounds 2]
    .venv/bin/python bench/bench_serve.py --serve-throughput-optimized     # Serve's RAY_SERVE_THROUGHPUT_OPTIMIZED=1
    .venv/bin/python bench/bench_serve.py --direct-ingress                 # also each ingress replica's own port
    .venv/bin/python bench/bench_serve.py --haproxy                        # serve.proxy = "haproxy" (needs haproxy)

One local Ray; the whole system comes up as ``raytrade up`` brings it
(``raytrade.system.start_system``: feeds, router, registry with the baseline
MLP and LSTM trained on first start, accounts, Serve on 127.0.0.1) over a
temporary store. Then the same client (httpx ``AsyncClient``, N concurrent
callers, each sending its next request when the last one answered) measures,
for each N of the sweep, for a fixed time:

- ``serve``: ``POST /v1/decisions {"symbol": "SPY"}`` with a read key (not
  executed): the ingress's live window, the ensemble in the ingress
  (features and members), the risk verdict previewed from the account's
  snapshot. With ``serve.signal_per_bar`` (the default) a decision on a bar
  the ensemble has already answered for reuses its signal (bars arrive
  once a second here), so most decisions skip the ensemble;
  ``--signal-per-request`` runs it for every decision;
- ``noop``: a Serve deployment on the same cluster and proxy (its own app,
  ``route_prefix=/noop``) whose FastAPI ingress returns a constant JSON: what
  Serve itself costs;
- ``noopb``: the same no-op, but it reads the request's JSON body first
  (``route_prefix=/noopb``). Serve's proxy does not send a body with the
  request: the replica fetches it with a call back to the proxy, one more
  round trip that any endpoint taking a body pays and ``noop`` does not;
- ``plain``: a plain FastAPI app under uvicorn in a subprocess doing the same
  decision in-process: the same stored window, the same features
  (``core.features``, computed inside the ensemble) and the same members
  (``actors.ensemble.Ensemble`` as a plain class, models from the same
  registry), the same key check and response model; no risk call. It runs
  the ensemble for every request (its window never moves).

With ``--haproxy`` (``serve.proxy = "haproxy"``), HAProxy takes the HTTP
port in front of the ingress replicas' own ports, so ``serve``, ``noop`` and
``noopb`` are measured through it instead of Serve's proxy (and the ``-di``
peers as below).

With ``--direct-ingress`` (Serve's ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``,
which ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` also turns on) each ingress replica
serves HTTP on a port of its own besides the proxy's, and ``serve-di``,
``noop-di`` and ``noopb-di`` are the same three Serve peers measured there:
no proxy hop, and the body arrives with the request (in production a load
balancer such as HAProxy fronts those ports; Serve's ``RAY_SERVE_ENABLE_HA_PROXY``
runs one). The ports are read from the Serve controller's target groups.

Targets (issue 6): the decision endpoint's p50 at most 1.5x and p99 at most
2x the no-op deployment's, and at least 0.7 of its most requests per second.
Targets are measured in rounds, all four interleaved, and reported as
medians over rounds. The client shares the machine's cores with what it
measures; all four pay that alike.

Not a test: it prints figures, and exits 0 whether or not a target is met.
"""

import argparse
import asyncio
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

if "--serve-throughput-optimized" in sys.argv:
    # Serve reads it once, at import, in every process: set before Ray starts
    # (the local raylet, and so every worker, inherits this environment).
    os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
if "--direct-ingress" in sys.argv:
    os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import httpx  # noqa: E402
import psutil  # noqa: E402

SYMBOL = "SPY"
READ_KEY = "rt-bench-read-key-0000001"
TARGETS = {"p50": 1.5, "p99": 2.0, "rps": 0.7}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_settings(store: str, port: int, ledger: str | None = None, proxy: str = "serve",
                   signal_per_bar: bool = True):
    from cluster.settings import load_settings

    return load_settings(
        use_file=False,
        store={"uri": store},
        # bar 400 of the 600 stored: a full window at once, and live bars after it
        feeds={"symbols": ["SPY", "QQQ"], "bar_interval_s": 1.0, "replay_start": "2024-01-02 21:10"},
        risk={"allowed_symbols": ["SPY", "QQQ"], "confidence_threshold": 0.0},
        # the per-key limit would otherwise be what we measure
        serve={"port": port, "rate_limit_per_s": 1e6, "rate_burst": 1e6, "proxy": proxy,
               "signal_per_bar": signal_per_bar},
        api_keys=[{"name": "bench", "key": READ_KEY, "role": "read"}],
        broker={"ledger_dir": ledger or os.path.join(os.path.dirname(store), "ledger")},
        ray={"namespace": "raytrade-bench", "include_dashboard": False},
    )


# -- the plain FastAPI peer (runs in its own process: --plain-server) ---------------------
def plain_server(store: str, port: int) -> None:
    """The same decision without Ray: stored window -> Ensemble in-process -> Decision.

    (This module has no ``from __future__ import annotations``: FastAPI must
    see these local classes in the route's annotations, not their names.)
    """
    import uuid

    import uvicorn
    from fastapi import FastAPI, HTTPException, Request

    from actors.ensemble import Ensemble
    from core.decision import MIN_POSITION_CHANGE
    from core.store import BarStore
    from serve.auth import AuthError, KeyRing, key_from_headers
    from serve.live import WINDOW_BARS
    from serve.schemas import Decision, DecisionRequest, LastBar, MemberContribution, RiskVerdict

    settings = bench_settings(store, port)
    keys = KeyRing.from_settings(settings.api_keys, settings.serve.rate_limit_per_s, settings.serve.rate_burst)
    # registry="store": the registry's index read from the store in this process, no actor
    ensemble = Ensemble(settings, registry="store")
    df = BarStore.from_settings(settings.store).read(SYMBOL).tail(WINDOW_BARS)
    window = df.assign(ts=df["ts"].astype("int64"), seq=None).to_dict("records")
    app = FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True, "members": ensemble.model_versions()}

    @app.post("/v1/decisions", response_model=Decision)
    async def decisions(body: DecisionRequest, request: Request) -> Decision:
        try:
            keys.authenticate(key_from_headers(request.headers), "read")
        except AuthError as e:
            raise HTTPException(e.status, e.message) from None
        t0 = time.perf_counter()
        bars = list(window)
        last = bars[-1]
        req = {"symbol": body.symbol,
               "bars": {k: [b[k] for b in bars] for k in ("ts", "open", "high", "low", "close", "volume")}}
        sig = await ensemble.predict_one(req)
        target = max(-1.0, min(1.0, float(sig.get("position") or 0.0)))
        hold = sig.get("hold") or abs(target) < MIN_POSITION_CHANGE
        action = "HOLD" if hold else ("BUY" if target > 0 else "SELL")
        return Decision(
            decision_id=uuid.uuid4().hex, symbol=body.symbol, account=body.account, action=action,
            target_position=target, current_position=0.0, quantity=0.0,
            confidence=float(sig.get("confidence") or 0.0), reason=sig.get("reason"), regime=sig.get("regime"),
            members={n: MemberContribution(**{k: m.get(k) for k in ("position", "contribution", "weight", "version")
                                              if m.get(k) is not None})
                     for n, m in (sig.get("members") or {}).items()},
            failed_members=sig.get("failed") or {}, model_versions=sig.get("model_versions") or {},
            risk=RiskVerdict(approved=False, reasons=["no risk call (benchmark peer)"]),
            last_bar=LastBar(seq=None, ts=None, close=float(last["close"])),
            latency_ms=round((time.perf_counter() - t0) * 1000, 3),
        )

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- the no-op Serve peer -------------------------------------------------------------------
def noop_app(settings, read_body: bool = False):
    """A Serve FastAPI ingress answering a constant JSON; with ``read_body`` it reads the JSON body first
    (what Serve costs to deliver a POST body to a replica)."""
    from fastapi import FastAPI, Request
    from ray import serve

    from cluster.runtime import current_profile
    from serve.app import INGRESS_MAX_ONGOING, ingress_options

    api = FastAPI()

    @serve.deployment(name="NoopBodyIngress" if read_body else "NoopIngress")
    @serve.ingress(api)
    class NoopIngress:
        @api.post("/v1/decisions")
        async def decisions(self, request: Request) -> dict:
            if read_body:
                await request.json()
            return {"action": "HOLD", "target_position": 0.0, "confidence": 0.0}

    # The resources and concurrency the decision endpoint's ingress has.
    return NoopIngress.options(ray_actor_options=ingress_options(settings, current_profile(settings)),
                               max_ongoing_requests=INGRESS_MAX_ONGOING).bind()


# -- the client -----------------------------------------------------------------------------
async def load(url: str, concurrency: int, duration_s: float, warmup_s: float, max_requests: int) -> dict:
    """``concurrency`` callers back to back for ``duration_s`` (after ``warmup_s``), at most ``max_requests``."""
    body = {"symbol": SYMBOL}
    headers = {"X-API-Key": READ_KEY}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    lat: list[float] = []
    errors: dict[str, int] = {}
    actions: dict[str, int] = {}
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        async def caller(until: float, record: bool) -> None:
            while time.perf_counter() < until and (not record or len(lat) < max_requests):
                t0 = time.perf_counter()
                try:
                    r = await client.post(url, json=body, headers=headers)
                    ok = r.status_code == 200
                    why = str(r.status_code)
                    action = r.json().get("action") if ok else None
                except httpx.HTTPError as e:
                    ok, why, action = False, type(e).__name__, None
                dt = time.perf_counter() - t0
                if not record:
                    continue
                if ok:
                    lat.append(dt)
                    actions[action] = actions.get(action, 0) + 1
                else:
                    errors[why] = errors.get(why, 0) + 1

        t_warm = time.perf_counter() + warmup_s
        await asyncio.gather(*(caller(t_warm, False) for _ in range(concurrency)))
        t0 = time.perf_counter()
        await asyncio.gather(*(caller(t0 + duration_s, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    lat.sort()

    def pct(q: float) -> float:
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return {"p50": pct(0.50), "p99": pct(0.99), "rps": len(lat) / elapsed, "n": len(lat), "errors": errors,
            "actions": actions}


def replica_ports(port_of_proxy: int, timeout_s: float = 60.0) -> dict[str, str]:
    """Route prefix -> ``http://ip:port`` of its ingress replica's own HTTP server (direct ingress).

    From the Serve controller's target groups (what a load balancer in front
    of the replicas reads); a prefix still served only by the proxy is left out.
    """
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    deadline = time.time() + timeout_s
    found: dict[str, str] = {}
    while time.time() < deadline:
        found = {}
        # With HAProxy on, the controller names the replicas only to its proxy manager.
        ha = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
        for group in ray.get(controller.get_target_groups.remote(from_proxy_manager=ha)):
            if str(getattr(group.protocol, "value", group.protocol)).upper() != "HTTP" or not group.targets:
                continue
            target = group.targets[0]
            if group.app_name and target.port != port_of_proxy:  # a proxy's target group has no app
                # The target names the node's address; the replica listens on Serve's HTTP host (127.0.0.1).
                found[group.route_prefix] = f"http://127.0.0.1:{target.port}"
        if len(found) >= 3:
            break
        time.sleep(0.5)
    return found


def wait_ok(url: str, timeout_s: float, post: bool = False) -> httpx.Response:
    deadline = time.time() + timeout_s
    last = None
    while time.time() < deadline:
        try:
            if post:
                last = httpx.post(url, json={"symbol": SYMBOL}, headers={"X-API-Key": READ_KEY}, timeout=30)
            else:
                last = httpx.get(url, timeout=5)
            if last.status_code == 200:
                return last
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f}s: "
                       f"{last.status_code if last is not None else 'no answer'} {last.text[:300] if last is not None else ''}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=4.0, help="seconds measured per target, concurrency and round")
    ap.add_argument("--warmup", type=float, default=0.5, help="seconds of load before each measurement, not counted")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the whole sweep; medians over rounds")
    ap.add_argument("--max-requests", type=int, default=20_000, help="cap on requests counted per measurement")
    ap.add_argument("--serve-throughput-optimized", action="store_true",
                    help="start Serve with RAY_SERVE_THROUGHPUT_OPTIMIZED=1")
    ap.add_argument("--direct-ingress", action="store_true",
                    help="start Serve with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 and also measure each ingress "
                         "replica's own port (serve-di, noop-di, noopb-di)")
    ap.add_argument("--haproxy", action="store_true",
                    help="serve.proxy = haproxy: HAProxy (the haproxy binary on PATH) takes the HTTP port in front "
                         "of the ingress replicas' own ports (Serve's direct ingress), as `raytrade up` does with "
                         "that setting; the replicas' own ports are measured too")
    ap.add_argument("--signal-per-request", action="store_true",
                    help="serve.signal_per_bar = false: the endpoint runs the ensemble for every decision")
    ap.add_argument("--plain-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plain_server:
        plain_server(args.store, args.port)
        return 0

    import ray
    from ray import serve

    from cluster.runtime import connect
    from core.store import BarStore
    from core.synthetic import generate_bars
    from raytrade.system import start_system, stop_system

    t_start = time.time()
    tmp = tempfile.mkdtemp(prefix="raytrade-bench-serve-")
    store = os.path.join(tmp, "store")
    port = free_port()
    settings = bench_settings(store, port, proxy="haproxy" if args.haproxy else "serve",
                              signal_per_bar=not args.signal_per_request)
    BarStore.from_settings(settings.store).append(generate_bars(["SPY", "QQQ"], 600, seed=7))
    connect(settings, num_cpus=4)
    print(f"raytrade Serve benchmark: {os.cpu_count()} cores, ray {ray.__version__}, "
          f"RAY_SERVE_THROUGHPUT_OPTIMIZED={os.environ.get('RAY_SERVE_THROUGHPUT_OPTIMIZED', '0')}, "
          f"RAY_SERVE_ENABLE_DIRECT_INGRESS={os.environ.get('RAY_SERVE_ENABLE_DIRECT_INGRESS', '0')}, "
          f"serve.proxy={settings.serve.proxy}, serve.signal_per_bar={settings.serve.signal_per_bar}", flush=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    plain = None
    try:
        start_system(settings, progress=lambda m: print(f"  {m}", flush=True))
        serve.run(noop_app(settings), name="noop", route_prefix="/noop", blocking=False)
        serve.run(noop_app(settings, read_body=True), name="noopb", route_prefix="/noopb", blocking=False)
        base = f"http://127.0.0.1:{port}"
        first = wait_ok(f"{base}/v1/decisions", 180, post=True).json()
        wait_ok(f"{base}/noop/v1/decisions", 60, post=True)
        wait_ok(f"{base}/noopb/v1/decisions", 60, post=True)
        plain_port = free_port()
        plain = subprocess.Popen([sys.executable, __file__, "--plain-server", "--store", store, "--port", str(plain_port)],
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
        plain_url = f"http://127.0.0.1:{plain_port}"
        members = wait_ok(f"{plain_url}/healthz", 120).json()["members"]
        wait_ok(f"{plain_url}/v1/decisions", 60, post=True)
        print(f"  up in {time.time() - t_start:.0f}s; members: serve {first['model_versions']}, plain {members}")
        print(f"  first decision: {first['action']} target {first['target_position']:+.3f} "
              f"confidence {first['confidence']:.3f}, {first['latency_ms']:.1f} ms in the ingress", flush=True)
        urls = {"serve": f"{base}/v1/decisions", "noop": f"{base}/noop/v1/decisions",
                "noopb": f"{base}/noopb/v1/decisions", "plain": f"{plain_url}/v1/decisions"}
        if args.direct_ingress or args.haproxy:
            ports = replica_ports(port)
            listener = next((c.pid for c in psutil.net_connections("tcp")
                             if c.status == "LISTEN" and c.laddr.port == port), None)
            print(f"  port {port} is served by {psutil.Process(listener).name() if listener else 'nobody?'}")
            print(f"  ingress replicas' own ports: {ports}", flush=True)
            for name, prefix in (("serve", "/"), ("noop", "/noop"), ("noopb", "/noopb")):
                if prefix not in ports:
                    raise RuntimeError(f"no direct-ingress port for {prefix}: {ports}")
                urls[f"{name}-di"] = f"{ports[prefix]}{'' if prefix == '/' else prefix}/v1/decisions"
                wait_ok(urls[f"{name}-di"], 60, post=True)
        names = list(urls)
        res: dict[tuple[str, int], list[dict]] = {}
        print(f"\n{args.rounds} round(s) x concurrency {args.concurrency} x {len(urls)} targets, "
              f"{args.duration:g}s each (+{args.warmup:g}s warm-up)")
        print(f"{'round':>5} {'conc':>4} {'target':<8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'n':>6}  errors / actions")
        for rnd in range(args.rounds):
            for c in args.concurrency:
                order = names[rnd % len(names):] + names[:rnd % len(names)]  # no target always goes first
                for name in order:
                    r = asyncio.run(load(urls[name], c, args.duration, args.warmup, args.max_requests))
                    res.setdefault((name, c), []).append(r)
                    print(f"{rnd + 1:>5} {c:>4} {name:<8} {r['p50']:>8.2f} {r['p99']:>8.2f} {r['rps']:>8.1f} "
                          f"{r['n']:>6}  {r['errors'] or ''} {r['actions']}", flush=True)

        def med(name: str, c: int, k: str) -> float:
            return statistics.median(r[k] for r in res[(name, c)])

        print(f"\nmedians over {args.rounds} round(s)")
        print(f"{'conc':>4} {'target':<8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
        for c in args.concurrency:
            for name in names:
                print(f"{c:>4} {name:<8} {med(name, c, 'p50'):>8.2f} {med(name, c, 'p99'):>8.2f} {med(name, c, 'rps'):>8.1f}")
        print("\nratios: serve / noop (target p50 <= 1.5, p99 <= 2.0, req/s >= 0.7), serve / noopb and serve / plain")
        print(f"{'conc':>4} {'p50':>7} {'p99':>7} {'req/s':>7}   {'p50':>7} {'p99':>7} {'req/s':>7}  (vs noopb)"
              f"   {'p50':>7} {'p99':>7} {'req/s':>7}  (vs plain)")
        for c in args.concurrency:
            n, b, p = ([med("serve", c, k) / med(peer, c, k) for k in ("p50", "p99", "rps")]
                       for peer in ("noop", "noopb", "plain"))
            print(f"{c:>4} {n[0]:>7.2f} {n[1]:>7.2f} {n[2]:>7.2f}   {b[0]:>7.2f} {b[1]:>7.2f} {b[2]:>7.2f}"
                  f"              {p[0]:>7.2f} {p[1]:>7.2f} {p[2]:>7.2f}")
        most = {name: max(med(name, c, "rps") for c in args.concurrency) for name in names}
        print(f"\nmost req/s: serve {most['serve']:.1f}, noop {most['noop']:.1f}, noopb {most['noopb']:.1f}, "
              f"plain {most['plain']:.1f}; serve/noop {most['serve'] / most['noop']:.2f}, "
              f"serve/noopb {most['serve'] / most['noopb']:.2f}, serve/plain {most['serve'] / most['plain']:.2f}")
        c1 = args.concurrency[0]
        verdicts = [
            ("p50", med("serve", c1, "p50") / med("noop", c1, "p50") <= TARGETS["p50"]),
            ("p99", med("serve", c1, "p99") / med("noop", c1, "p99") <= TARGETS["p99"]),
            ("req/s", most["serve"] / most["noop"] >= TARGETS["rps"]),
        ]
        print(f"targets (latency at concurrency {c1}, most req/s over the sweep): "
              + ", ".join(f"{k} {'meets' if ok else 'MISSES'}" for k, ok in verdicts))
        body = [
            ("p50", med("serve", c1, "p50") / med("noopb", c1, "p50") <= TARGETS["p50"]),
            ("p99", med("serve", c1, "p99") / med("noopb", c1, "p99") <= TARGETS["p99"]),
            ("req/s", most["serve"] / most["noopb"] >= TARGETS["rps"]),
        ]
        print("the same bounds against the no-op that reads its body (not the issue's target): "
              + ", ".join(f"{k} {'within' if ok else 'outside'}" for k, ok in body))
        if args.direct_ingress or args.haproxy:
            print("\ndirect ingress (each replica's own port): serve-di / noop-di, and serve-di / noop (through the proxy)")
            print(f"{'conc':>4} {'p50':>7} {'p99':>7} {'req/s':>7}   {'p50':>7} {'p99':>7} {'req/s':>7}  (vs noop)")
            for c in args.concurrency:
                d, n = ([med("serve-di", c, k) / med(peer, c, k) for k in ("p50", "p99", "rps")]
                        for peer in ("noop-di", "noop"))
                print(f"{c:>4} {d[0]:>7.2f} {d[1]:>7.2f} {d[2]:>7.2f}   {n[0]:>7.2f} {n[1]:>7.2f} {n[2]:>7.2f}")
            for peer in ("noop-di", "noop"):
                checks = [
                    ("p50", med("serve-di", c1, "p50") / med(peer, c1, "p50") <= TARGETS["p50"]),
                    ("p99", med("serve-di", c1, "p99") / med(peer, c1, "p99") <= TARGETS["p99"]),
                    ("req/s", most["serve-di"] / most[peer] >= TARGETS["rps"]),
                ]
                print(f"the issue's bounds, serve-di against {peer}: "
                      + ", ".join(f"{k} {'within' if ok else 'outside'}" for k, ok in checks))
        print(f"total {time.time() - t_start:.0f}s")
    finally:
        if plain is not None:
            plain.terminate()
            plain.wait(10)
        stop_system(settings)
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
