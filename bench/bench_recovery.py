"""How long the HTTP API is gone after a SIGKILL of Serve's proxy, and what callers see when the
ingress replica dies: raytrade's setting (proxy health check every 2 s) against Serve's default
(every 10 s), each in a Ray of its own, in one run.

    .venv/bin/python bench/bench_recovery.py [--trials 2]

For each setting a child process starts the whole system (``raytrade.system.start_system``)
on 127.0.0.1 and, per trial: SIGKILLs the process of Serve's HTTP proxy actor and polls
``GET /healthz`` every 50 ms until it answers 200 again (seconds without an answer); then
SIGKILLs the ingress replica's process while a caller sends decisions, and counts the
answers by status and content type until one succeeds again. It prints each trial, the
medians, and the ratio of the medians (default / raytrade's). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
READ_KEY = "rt-bench-read-key-0000001"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _actor_pid(class_fragment: str) -> int | None:
    from ray.util.state import list_actors

    import ray

    addr = ray.get_runtime_context().gcs_address
    for a in list_actors(address=addr, filters=[("state", "=", "ALIVE")], detail=True, limit=1000):
        d = a if isinstance(a, dict) else a.__dict__
        if class_fragment in (d.get("class_name") or "") and d.get("pid"):
            return int(d["pid"])
    return None


def _wait_200(url: str, timeout_s: float, headers: dict | None = None) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        try:
            if httpx.get(url, timeout=1.0, headers=headers).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return float("nan")


def child(trials: int) -> None:
    """One Ray with this process's environment: the trials, as one JSON line on stdout."""
    import ray

    from cluster.runtime import connect
    from cluster.settings import load_settings
    from core.store import BarStore
    from core.synthetic import generate_bars
    from raytrade.system import start_system, stop_system

    tmp = tempfile.mkdtemp(prefix="raytrade-bench-recovery-")
    port = free_port()
    settings = load_settings(
        use_file=False, store={"uri": os.path.join(tmp, "store")},
        feeds={"symbols": ["SPY", "QQQ"], "bar_interval_s": 1.0, "replay_start": "2024-01-02 21:10"},
        risk={"allowed_symbols": ["SPY", "QQQ"], "confidence_threshold": 0.0},
        serve={"port": port}, api_keys=[{"name": "bench", "key": READ_KEY, "role": "read"}],
        broker={"ledger_dir": os.path.join(tmp, "ledger")},
        ray={"namespace": "raytrade-bench-recovery", "include_dashboard": True},
    )
    BarStore.from_settings(settings.store).append(generate_bars(["SPY", "QQQ"], 600, seed=7))
    connect(settings, num_cpus=4)
    base = f"http://127.0.0.1:{port}"
    out = {"proxy_s": [], "replica": []}
    try:
        start_system(settings, progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
        _wait_200(f"{base}/v1/signal/SPY", 240, {"X-API-Key": READ_KEY})
        for _ in range(trials):
            pid = _actor_pid("ProxyActor")
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
            out["proxy_s"].append(_wait_200(f"{base}/healthz", 120))
            _wait_200(f"{base}/v1/signal/SPY", 120, {"X-API-Key": READ_KEY})
            pid = _actor_pid("ServeReplica")
            seen: dict[str, int] = {}
            os.kill(pid, signal.SIGKILL)
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 120:
                try:
                    r = httpx.post(f"{base}/v1/decisions", json={"symbol": "SPY"},
                                   headers={"X-API-Key": READ_KEY}, timeout=5)
                    kind = f"{r.status_code} {r.headers.get('content-type', '').split(';')[0]}"
                except httpx.HTTPError as e:
                    kind = type(e).__name__
                seen[kind] = seen.get(kind, 0) + 1
                if kind.startswith("200"):
                    break
                time.sleep(0.05)
            out["replica"].append({"seconds": round(time.perf_counter() - t0, 2), "answers": seen})
    finally:
        stop_system(settings)
        ray.shutdown()
    print(json.dumps(out), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.trials)
        return 0
    res = {}
    for name, period in (("raytrade (2 s)", "2"), ("Serve default (10 s)", "10")):
        env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S=period)
        print(f"== {name}: starting a Ray and the system", flush=True)
        p = subprocess.run([sys.executable, __file__, "--child", "--trials", str(args.trials)], env=env,
                           capture_output=True, text=True, timeout=900)
        line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("{")), None)
        if line is None:
            print(f"  failed: {p.stderr[-1500:]}")
            return 1
        res[name] = json.loads(line)
        for i, s in enumerate(res[name]["proxy_s"]):
            print(f"  trial {i + 1}: port back {s:.2f} s after the proxy's SIGKILL; after the replica's: "
                  f"{res[name]['replica'][i]}", flush=True)
    meds = {n: statistics.median(r["proxy_s"]) for n, r in res.items()}
    for n, m in meds.items():
        print(f"median seconds without the HTTP port after a proxy SIGKILL, {n}: {m:.2f}")
    a, b = list(meds.values())
    print(f"ratio Serve default / raytrade: {b / a:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
