"""Commands beside a running system join it and run as its workflows (issue 18).

The system is the test session's own (``trading_app``: its feeds, registry,
scheduler and Serve on the session's Ray). ``raytrade train`` and ``raytrade
backtest walk-forward`` are run as real processes with ``--address``: they must
join that Ray (no second one), run as ``model_training`` and ``backtest`` jobs
that the scheduler lists, print their results as if they ran in the caller, and
the trained candidate must be promotable at once through the running registry.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _cli(tmp_path, address, *args, timeout=420):
    cfg = tmp_path / "raytrade.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAYTRADE_", "RAY_ADDRESS"))}
    env["PYTHONPATH"] = str(ROOT)
    env["RAYTRADE_STATE_DIR"] = str(tmp_path / "state")
    return subprocess.run([sys.executable, "-m", "raytrade", "--config", str(cfg), "--address", address, *args],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)


@pytest.fixture
def beside(trading_app, ray_session, tmp_path):
    s = trading_app["settings"]
    (tmp_path / "raytrade.toml").write_text(
        f'[store]\nuri = "{s.store.uri}"\n[ray]\nnamespace = "{s.ray.namespace}"\n'
        "[learner]\nwindow = 4\nepisode_length = 16\nnum_envs = 16\n"
        "[feeds]\nsymbols = [\"SPY\", \"QQQ\"]\n")
    return tmp_path, ray_session.address, s


def _jobs(settings):
    import ray

    from actors.scheduler import get_scheduler

    st = ray.get(get_scheduler(settings).status.remote(50), timeout=60)
    return {j["id"]: j for j in st["history"] + st["running"] + st["queued"]}


@pytest.mark.slow
def test_train_beside_a_running_system_is_its_workflow_and_promotable_at_once(beside):
    import ray

    from actors.registry import get_or_create_registry

    tmp_path, address, settings = beside
    before = set(_jobs(settings))
    r = _cli(tmp_path, address, "train", "--symbols", "SPY", "--steps", "256", "--alpha", "0.25", "--run", "beside")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Started a local Ray" not in r.stderr and "started a local Ray" not in r.stderr
    assert "submitted as workflow model_training" in r.stderr
    assert "risk-neutral PPO (alpha=1)" in r.stdout and "CVaR-PPO (alpha=0.25)" in r.stdout  # the table, here
    new = [j for jid, j in _jobs(settings).items() if jid not in before]
    assert [(j["workflow"], j["state"]) for j in new] == [("model_training", "succeeded")]
    # The candidate went through the one registry: the running one lists it and promotes it now.
    registry = get_or_create_registry(settings)
    candidate = max((rec for rec in ray.get(registry.list.remote("cvar-ppo"), timeout=60)), key=lambda x: x["version"])
    assert candidate["metadata"].get("run_id", "beside-cvar").startswith("beside")
    p = _cli(tmp_path, address, "models", "promote", "cvar-ppo", str(candidate["version"]), timeout=120)
    assert p.returncode == 0, p.stderr
    assert ray.get(registry.get.remote("cvar-ppo", None, "production"), timeout=60)["version"] == candidate["version"]


@pytest.mark.slow
def test_walk_forward_beside_a_running_system_is_its_backtest_workflow(beside):
    tmp_path, address, settings = beside
    before = set(_jobs(settings))
    args = ["backtest", "walk-forward", "--symbol", "SPY", "--strategy", "sma_crossover", "--train", "200",
            "--test", "100", "--params", "fast=5,10", "slow=30", "--out", str(tmp_path / "wf")]
    r = _cli(tmp_path, address, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "started a local Ray" not in r.stderr and "submitted as workflow backtest" in r.stderr
    assert "walk-forward efficiency" in r.stdout and f"report: {tmp_path / 'wf'}" in r.stdout
    assert (tmp_path / "wf").is_dir() and any((tmp_path / "wf").iterdir())
    new = [j for jid, j in _jobs(settings).items() if jid not in before]
    assert [(j["workflow"], j["state"]) for j in new] == [("backtest", "succeeded")]

    # --detach: the job id at once; `workflows wait` attaches and prints the same summary.
    d = _cli(tmp_path, address, *args, "--detach")
    assert d.returncode == 0, d.stderr
    job_id = d.stdout.strip().splitlines()[-1]
    w = _cli(tmp_path, address, "workflows", "wait", job_id)
    assert w.returncode == 0, w.stderr[-3000:]
    assert "walk-forward efficiency" in w.stdout
    logs = _cli(tmp_path, address, "workflows", "logs", job_id, timeout=120)
    assert "walk-forward efficiency" in logs.stdout
    deadline = time.time() + 30
    while _jobs(settings)[job_id]["state"] != "succeeded" and time.time() < deadline:
        time.sleep(0.5)
    assert _jobs(settings)[job_id]["state"] == "succeeded"
