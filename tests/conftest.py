"""Shared fixtures: one Ray instance for the whole session, a local S3 server.

Starting Ray costs seconds on a 2-core machine, so every test that needs Ray
shares ``ray_session``. Nothing here reaches beyond 127.0.0.1.
"""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Tests must never read a developer's own raytrade.toml or environment.
for _k in [k for k in os.environ if k.startswith("RAYTRADE_")]:
    del os.environ[_k]


def pytest_report_header(config):
    try:
        import torch

        gpu = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        gpu = False
    if not gpu:
        return "gpu tests: skipped - no CUDA GPU on this machine (run `pytest -m gpu` on a GPU machine)"
    return "gpu tests: a CUDA GPU is available"


@pytest.fixture
def make_settings(tmp_path):
    """Settings with a fresh local store under tmp_path; keyword overrides merge in."""
    from cluster.settings import _deep_merge, load_settings

    def make(**overrides):
        base = {"store": {"uri": str(tmp_path / "store")}}
        _deep_merge(base, overrides)
        return load_settings(use_file=False, **base)

    return make


@pytest.fixture(scope="session")
def ray_session(tmp_path_factory):
    """One local Ray for the whole test session (4 logical CPUs on any box)."""
    import ray

    from cluster.runtime import connect
    from cluster.settings import load_settings

    os.environ.pop("RAY_ADDRESS", None)
    settings = load_settings(use_file=False, store={"uri": str(tmp_path_factory.mktemp("ray-store"))}, ray={"num_cpus": 4})
    info = connect(settings, num_cpus=4)
    yield info
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port() -> int:
    """The one HTTP port of this session's Serve instance (Serve ignores a second start's options)."""
    return free_port()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto in server mode) on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {"endpoint": f"http://127.0.0.1:{port}", "access_key": "testing-access", "secret_key": "testing-secret-value"}
    server.stop()


KEYS = {"read": "rt-test-read-key-000001", "trade": "rt-test-trade-key-000002", "admin": "rt-test-admin-key-000003"}


@pytest.fixture(scope="session")
def trading_app(ray_session, tmp_path_factory, serve_port):
    """The whole system (feeds, router, registry, ensemble, accounts, Serve) on 127.0.0.1, once per session."""
    import ray
    from ray import serve

    from cluster.settings import load_settings
    from core.store import BarStore
    from core.synthetic import generate_bars
    from raytrade.system import start_system, stop_system

    root = tmp_path_factory.mktemp("trading")
    port = serve_port
    settings = load_settings(
        use_file=False,
        store={"uri": str(root / "store")},
        feeds={"symbols": ["SPY", "QQQ"], "bar_interval_s": 0.2, "stall_intervals": 3,
               "replay_start": "2024-01-02 21:10"},  # bar 400 of the stored 600: 400 bars of history
        risk={"allowed_symbols": ["SPY", "QQQ"], "confidence_threshold": 0.0},
        serve={"port": port, "rate_limit_per_s": 1000, "rate_burst": 2000},
        api_keys=[{"name": role, "key": key, "role": role} for role, key in KEYS.items()],
        broker={"ledger_dir": str(root / "ledger")},
        ray={"namespace": "raytrade-test"},
        # Two more accounts for the concurrent stress test (tests/test_risk_stress.py), so its
        # orders never move the default account that the endpoint's tests read.
        accounts={"default": {}, "alt": {}, "alt2": {"starting_cash": 50_000}},
    )
    # Stored history before the replayed bars, so windows are full at once.
    hist = generate_bars(["SPY", "QQQ"], 600, seed=7)
    BarStore.from_settings(settings.store).append(hist)
    system = start_system(settings, progress=lambda *_: None)
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "keys": KEYS, "settings": settings, "system": system}
    stop_system(settings)
    try:
        serve.shutdown()
    except Exception:  # noqa: BLE001
        pass
