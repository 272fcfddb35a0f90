"""Ray itself: a feed actor streams, `raytrade status` sees it, and actors are found by the names in cluster.names."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from cluster import names
from cluster.runtime import ClusterUnavailable, actor_options, serve_proxy_env, status
from cluster.settings import load_settings
from core.store import BarStore
from core.synthetic import generate_bars

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def feed_settings(tmp_path):
    s = load_settings(
        use_file=False,
        store={"uri": str(tmp_path / "store")},
        feeds={"symbols": ["SPY", "QQQ"], "bar_interval_s": 0.05},
    )
    BarStore.from_settings(s.store).append(generate_bars(["SPY", "QQQ"], 40, seed=1))
    return s


def test_replay_feed_streams_every_bar_once_in_order(ray_session, feed_settings):
    from actors.feeds import FeedActor

    name = "feed:test-replay"
    a = FeedActor.options(**actor_options("feed", feed_settings, name, detached=False)).remote(
        name, "replay", ["SPY", "QQQ"], feed_settings
    )
    ray.get(a.start.remote())
    got: list[dict] = []
    deadline = time.time() + 60
    while len(got) < 80 and time.time() < deadline:
        got += ray.get(a.since.remote(got[-1]["seq"] if got else 0))
        time.sleep(0.05)
    assert [b["seq"] for b in got] == list(range(1, 81))
    want = generate_bars(["SPY", "QQQ"], 40, seed=1)
    for sym in ("SPY", "QQQ"):
        closes = [b["close"] for b in got if b["symbol"] == sym]
        assert closes == list(want[want.symbol == sym]["close"])
    h = ray.get(a.health.remote())
    assert h["emitted"] == 80 and h["exhausted"] and h["errors"] == 0
    ray.kill(a)


def test_status_lists_actors_and_waiting_ones(ray_session, feed_settings):
    from actors.feeds import FeedActor

    ok = FeedActor.options(**actor_options("feed", feed_settings, "feed:status-ok", detached=False)).remote(
        "feed:status-ok", "synthetic", ["SPY"], feed_settings
    )
    ray.get(ok.health.remote())
    # A role no node can hold: it must show as waiting, with what it asked for.
    huge = FeedActor.options(
        **actor_options("feed", feed_settings, "feed:too-big", detached=False, num_gpus=8)
    ).remote("feed:too-big", "synthetic", ["SPY"], feed_settings)
    deadline = time.time() + 30
    while time.time() < deadline:
        st = status(feed_settings)
        by_name = {a["name"]: a for a in st["actors"]}
        if by_name.get("feed:too-big", {}).get("state") == "WAITING_FOR_RESOURCES" and \
                by_name.get("feed:status-ok", {}).get("state") == "ALIVE":
            break
        time.sleep(0.5)
    assert by_name["feed:status-ok"]["state"] == "ALIVE"
    assert by_name["feed:too-big"]["state"] == "WAITING_FOR_RESOURCES"
    assert by_name["feed:too-big"]["waiting_for"].get("GPU") == 8
    assert st["nodes"] and st["nodes"][0]["alive"]
    # The CLI, in another process, sees the same cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYTRADE_")}
    env.update(RAY_ADDRESS=ray_session.address, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "raytrade", "status", "--json"], capture_output=True,
                       text=True, env=env, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-500:]
    names = {a["name"]: a["state"] for a in json.loads(r.stdout)["actors"]}
    assert names["feed:status-ok"] == "ALIVE" and names["feed:too-big"] == "WAITING_FOR_RESOURCES"
    ray.kill(ok)
    ray.kill(huge)


def test_serve_proxy_setting_gives_the_environment_serve_reads(tmp_path, monkeypatch):
    assert serve_proxy_env(load_settings(use_file=False)) == {}
    ha = load_settings(use_file=False, serve={"proxy": "haproxy"})
    fake = tmp_path / "haproxy"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    monkeypatch.delenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert serve_proxy_env(ha) == {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                                   "RAY_SERVE_HAPROXY_BINARY_PATH": str(fake),
                                   "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ClusterUnavailable, match="no haproxy binary is on PATH"):
        serve_proxy_env(ha)
    with pytest.raises(ValueError, match="proxy"):
        load_settings(use_file=False, serve={"proxy": "nginx"})


def test_the_local_ray_refuses_a_client_without_its_token(ray_session, tmp_path):
    """The embedded default's Ray has token auth on: a client with the token on disk joins, one
    without it (another user's home, no RAY_AUTH_TOKEN) is refused before it can reach any actor."""
    assert os.environ.get("RAY_AUTH_MODE", "token") == "token"
    gcs = ray.get_runtime_context().gcs_address
    probe = f"import ray; ray.init(address={gcs!r}, namespace='probe'); print('joined', len(ray.nodes()))"
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    with_token = tmp_path / "with"
    (with_token / ".ray").mkdir(parents=True)
    (with_token / ".ray" / "auth_token").write_text((Path.home() / ".ray" / "auth_token").read_text())
    ok = subprocess.run([sys.executable, "-c", probe], env={**base, "HOME": str(with_token), "RAY_AUTH_MODE": "token"},
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "joined 1" in ok.stdout, ok.stderr[-2000:]
    (tmp_path / "without").mkdir()
    refused = subprocess.run([sys.executable, "-c", probe], env={**base, "HOME": str(tmp_path / "without")},
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "joined" not in refused.stdout
    assert "auth" in refused.stderr.lower(), refused.stderr[-2000:]


def test_actor_names_are_the_contract():
    # Serve's health keys, `raytrade feeds kill feed:replay` and running clusters rely on these strings.
    assert (names.feed("replay"), names.router(), names.risk("a"), names.broker("a")) == (
        "feed:replay", "router:default", "risk:a", "broker:a")
    assert (names.REGISTRY, names.SCHEDULER, names.LEARNER, names.ENSEMBLE, names.BAR_PUMP) == (
        "model-registry", "scheduler", "learner", "ensemble", "pump:bars")


def test_lookup_finds_a_running_actor_and_none_otherwise(ray_session, feed_settings):
    from actors.feeds import FeedActor

    name = names.feed("lookup")
    assert names.lookup(name, feed_settings) is None
    with pytest.raises(LookupError, match="raytrade up"):
        names.require(name, feed_settings)
    a = FeedActor.options(**actor_options("feed", feed_settings, name, detached=False)).remote(
        name, "synthetic", ["SPY"], feed_settings)
    ray.get(a.health.remote())
    assert names.lookup(name, feed_settings) is not None
    assert names.lookup(name, feed_settings.model_copy(update={"ray": feed_settings.ray.model_copy(
        update={"namespace": "elsewhere"})})) is None  # raytrade's namespace only
    ray.kill(a)


ACTOR_NAME_PREFIXES = ("feed:", "router:", "risk:", "broker:", "pump:")
ACTOR_NAMES = {"model-registry"}


def _spelled_out_names(source: str, where: str) -> list[str]:
    """Actor names written as string literals (docstrings aside) in one module's source."""
    tree = ast.parse(source, where)
    skip = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    skip |= {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            text = str(node.values[0].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
        else:
            continue
        if text.startswith(ACTOR_NAME_PREFIXES) or text in ACTOR_NAMES:
            found.append((node.lineno, f"{where}:{node.lineno} {text!r}"))
    return [hit for _, hit in sorted(found)]


def test_actor_names_are_written_only_in_cluster_names():
    """A name written out beside the helper that makes it is how two spellings start; every
    package takes actor names from cluster.names."""
    assert _spelled_out_names('"""risk:x in a docstring is fine"""\nh = get(f"risk:{a}")\nr = "model-registry"\n',
                              "m.py") == ["m.py:2 'risk:'", "m.py:3 'model-registry'"]  # the check can fail
    spelled = []
    for pkg in ("cluster", "actors", "serve", "tune", "raytrade"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            if f != ROOT / "cluster" / "names.py":
                spelled += _spelled_out_names(f.read_text(), str(f.relative_to(ROOT)))
    assert spelled == []
