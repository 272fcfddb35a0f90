"""The learner: the served member against the env's observation, held-out decisions and the
backtest against hand-built policies, checkpoints through the store (stop, resume, identical
numbers), the actor's progress while it trains, a kill and restart that resumes from the
checkpoint, the CLI, and the GPU memory cap (skipped without a GPU, with the reason)."""

from __future__ import annotations

import hashlib
import json
import time
import uuid

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import ray
import torch

from actors.learner import LearnerBusy, get_or_create_learner, select_device
from cluster.settings import load_settings
from core.engine import backtest
from core.features import FEATURE_NAMES, feature_spec_hash
from core.rl.cvar_ppo import ActorCritic, CVaRPPOSettings
from core.rl.data import MultiSymbolEnv, load_data
from core.rl.env import TradingEnv
from core.rl.evaluate import EVAL_CASH, evaluate
from core.rl.export import MemberPolicy, export_member_onnx
from core.rl.run import RunRequest, run_path, run_training
from core.store import BarStore
from core.synthetic import SyntheticMarket

torch.set_num_threads(1)
# Tiny runs hold few episodes per rollout; core warns that their tail estimate is noisy.
pytestmark = pytest.mark.filterwarnings("ignore:.*tail holds:UserWarning")

SYMS = ["SPY", "QQQ"]
W, L, N = 4, 16, 16  # window, episode length, env copies: one rollout = 256 steps
BATCH = N * L
F = len(FEATURE_NAMES)


def tiny_settings(tmp_path, **learner):
    return load_settings(use_file=False, store={"uri": str(tmp_path / "store")},
                         learner={"window": W, "episode_length": L, "num_envs": N, "checkpoint_every": 1, **learner})


def tiny_ppo(iterations: int, **kw) -> CVaRPPOSettings:
    kw.setdefault("risk_mode", "cvar")
    kw.setdefault("alpha", 0.25)
    return CVaRPPOSettings(total_timesteps=iterations * BATCH, num_steps=L, **kw)


@pytest.fixture
def store_with_bars(tmp_path):
    settings = tiny_settings(tmp_path)
    store = BarStore.from_settings(settings.store)
    market = SyntheticMarket(SYMS, seed=5)
    store.append(market.generate(600))
    return settings, store, market


# --------------------------------------------------------------------------- the served member
def test_member_observation_is_the_envs_first_observation_of_an_episode():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(200, F)).astype(np.float32)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, 200)))
    env = TradingEnv(feats, close=close, window=W, episode_length=L, num_envs=8, seed=3)
    first = env.reset()
    starts = env.state_dict()["start"].numpy()
    windows = torch.as_tensor(feats[starts[:, None] + np.arange(-W + 1, 1)[None, :]])
    assert torch.equal(MemberPolicy.observation(windows), first)


def test_member_onnx_has_the_ensembles_contract_and_matches_torch():
    policy = ActorCritic(W * F + 3, 3, (16, 16), torch.tensor([-1.0, 0.0, 1.0]), seed=4)
    windows = np.random.default_rng(1).normal(size=(50, W, F)).astype(np.float32)
    data, diff = export_member_onnx(policy, W, F, windows, {"feature_spec_hash": feature_spec_hash()})
    assert diff < 1e-5
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    (inp,), outs = session.get_inputs(), session.get_outputs()
    assert inp.shape == ["batch", W, F] and inp.type == "tensor(float)"
    assert outs[0].name == "position"
    meta = {p.key: p.value for p in onnx.load_model_from_string(data).metadata_props}
    assert meta["feature_spec_hash"] == feature_spec_hash() and meta["window"] == str(W)
    got = session.run(["position"], {"features": windows})[0]
    with torch.no_grad():
        logits = policy.actor(MemberPolicy.observation(torch.as_tensor(windows)))
    assert np.array_equal(got, policy.action_values[logits.argmax(-1)].numpy())


# --------------------------------------------------------------------------- env over symbols
def test_multi_symbol_env_is_its_symbols_envs_side_by_side_and_restores_exactly():
    rng = np.random.default_rng(2)

    def make(i, n):
        feats = np.random.default_rng(10 + i).normal(size=(120, 2)).astype(np.float32)
        close = 100 * np.exp(np.cumsum(np.random.default_rng(20 + i).normal(0, 0.01, 120)))
        return TradingEnv(feats, close=close, window=3, episode_length=8, num_envs=n, seed=i, commission=0.001)

    multi = MultiSymbolEnv([make(0, 3), make(1, 2)])
    alone = [make(0, 3), make(1, 2)]
    assert multi.num_envs == 5
    assert torch.equal(multi.reset(), torch.cat([e.reset() for e in alone]))
    for _ in range(12):  # past an episode end
        a = torch.as_tensor(rng.integers(0, 3, 5))
        got = multi.step(a)
        want = [e.step(x) for e, x in zip(alone, torch.split(a, [3, 2]))]
        for g, w in zip(got, zip(*want)):
            assert torch.equal(g, torch.cat(w))
    saved = multi.state_dict()
    a = torch.as_tensor(rng.integers(0, 3, 5))
    first = multi.step(a)
    multi.load_state_dict(saved)
    again = multi.step(a)
    assert all(torch.equal(x, y) for x, y in zip(first, again))


# --------------------------------------------------------------------------- held-out evaluation
def sign_policy(j: int) -> ActorCritic:
    """By hand: long when feature j of the window's last row is positive, short otherwise."""
    policy = ActorCritic(W * F + 3, 3, (1, 1), torch.tensor([-1.0, 0.0, 1.0]), seed=0)
    lin1, lin2, out = policy.actor[0], policy.actor[2], policy.actor[4]
    with torch.no_grad():
        for layer in (lin1, lin2, out):
            layer.weight.zero_()
            layer.bias.zero_()
        lin1.weight[0, (W - 1) * F + j] = 1e4
        lin2.weight[0, 0] = 1.0
        out.weight[:, 0] = torch.tensor([-10.0, 0.0, 10.0])
    return policy


def test_heldout_decisions_use_rows_up_to_t_and_are_backtested_by_the_engine(store_with_bars):
    settings, store, _ = store_with_bars
    ls = settings.learner
    data = load_data(store, SYMS, ls)
    j = FEATURE_NAMES.index("log_return_1")
    member, _ = export_member_onnx(sign_policy(j), W, F, np.concatenate([d.heldout_windows(W) for d in data]))
    ev = evaluate(member, data, ls, alpha=0.1)
    for d in data:
        assert d.cut == int(600 * (1 - ls.holdout_fraction))
        assert d.heldout_bars["ts"].iloc[0] == d.bars["ts"].iloc[d.cut]
        # The decision at held-out bar t reads feature row t: its own bar's return, not the next one's.
        want = np.where(d.features[d.cut:, j] > 0, 1.0, -1.0)
        got = np.array(ev["symbols"][d.symbol]["targets"])
        assert np.array_equal(got, want) and (want > 0).any() and (want < 0).any()
        ref = backtest(d.heldout_bars, want, cash=EVAL_CASH, commission=ls.commission, slippage=ls.slippage,
                       fill="open", whole_units=False, periods_per_year=ls.periods_per_year, alpha=0.1)
        m = ev["symbols"][d.symbol]
        assert m["sharpe"] == ref.metrics["sharpe"] and m["cvar"] == ref.metrics["cvar"]
        assert m["max_drawdown"] == ref.metrics["max_drawdown"] and m["mean"] == pytest.approx(ref.returns.mean())
        assert m["bars"] == 600 - d.cut
    per = ev["symbols"].values()
    assert ev["aggregate"]["cvar"] == min(m["cvar"] for m in per)
    assert ev["aggregate"]["max_drawdown"] == max(m["max_drawdown"] for m in per)
    assert ev["aggregate"]["sharpe"] == pytest.approx(np.mean([m["sharpe"] for m in per]))


def test_a_member_that_stays_flat_earns_nothing_and_its_sharpe_is_zero_not_nan(store_with_bars):
    settings, store, _ = store_with_bars
    data = load_data(store, SYMS, settings.learner)
    flat = sign_policy(0)
    with torch.no_grad():
        flat.actor[4].weight.zero_()
        flat.actor[4].bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    member, _ = export_member_onnx(flat, W, F, data[0].heldout_windows(W))
    ev = evaluate(member, data, settings.learner, alpha=0.1)
    assert ev["aggregate"] == {"mean": 0.0, "sharpe": 0.0, "cvar": 0.0, "max_drawdown": 0.0, "total_return": 0.0,
                               "exposure": 0.0}
    assert all(m["n_trades"] == 0 for m in ev["symbols"].values())


def test_training_envs_never_hold_a_heldout_bar(store_with_bars):
    settings, store, _ = store_with_bars
    data = load_data(store, SYMS, settings.learner)
    env = MultiSymbolEnv.from_data(data, settings.learner, seed=1, device="cpu")
    for d, e in zip(data, env.envs):
        finite = np.isfinite(d.features[: d.cut]).all(axis=1)
        assert e.features.shape[0] == d.cut - int(np.argmax(finite))  # warm-up dropped, held-out never there
    assert [e.num_envs for e in env.envs] == [8, 8]


# --------------------------------------------------------------------------- a run, in process
def test_a_run_checkpoints_exports_evaluates_and_registers_then_answers_from_the_store(store_with_bars):
    from core.models.cache import DeviceConfig, OnnxModel
    from core.models.registry import ModelRegistry

    settings, store, _ = store_with_bars
    registry = ModelRegistry(settings)
    records = []
    res = run_training(settings, store, RunRequest("r1", tuple(SYMS), tiny_ppo(3)), on_progress=records.append,
                       registry=registry)
    steps = [r["global_step"] for r in records if r["phase"] == "training"]
    assert steps == [BATCH, 2 * BATCH, 3 * BATCH]
    assert [r["phase"] for r in records][-4:] == ["exporting", "evaluating", "registering", "done"]
    assert {"mean_return", "cvar", "approx_kl", "lambda_", "alpha"} <= set(records[1])
    assert res["global_step"] == 3 * BATCH and res["resumed_from_step"] == 0 and res["steps_this_process"] == 3 * BATCH
    for name in ("run.json", "ckpt.pt", "policy.onnx", "result.json"):
        assert store.exists(run_path("r1", name)), name
    assert torch.load(store.path(run_path("r1", "ckpt.pt")), weights_only=True)["global_step"] == 3 * BATCH

    # The registry holds one candidate, of task policy, with the held-out metrics and the training metadata.
    (cand,) = registry.list("cvar-ppo")
    assert cand["stage"] == "candidate" and cand["task"] == "policy" and cand["version"] == res["candidate"]["version"]
    agg = res["evaluation"]["aggregate"]
    assert cand["metrics"] == {"sharpe": agg["sharpe"], "max_drawdown": agg["max_drawdown"], "cvar": agg["cvar"]}
    meta = cand["metadata"]
    assert meta["run_id"] == "r1" and meta["feature_spec_hash"] == feature_spec_hash() and meta["alpha"] == 0.25
    assert meta["global_step"] == 3 * BATCH
    assert meta["heldout_data"]["SPY"]["first"] == res["evaluation"]["symbols"]["SPY"]["first"]
    member = registry.load("cvar-ppo", cand["version"])
    assert hashlib.sha256(member).hexdigest() == res["artefacts"]["member_sha256"]
    # The metrics are those of the registered bytes: re-evaluating them gives the same numbers...
    data = load_data(store, SYMS, settings.learner)
    again = evaluate(member, data, settings.learner, alpha=0.25)
    assert again["aggregate"] == agg
    # ...and the ensemble's model cache accepts them and decides the same positions.
    served = OnnxModel("cvar-ppo", cand["version"], member, DeviceConfig(), n_features=F)
    assert served.window == W
    assert np.array_equal(served.run(data[0].heldout_windows(W)), again["symbols"]["SPY"]["targets"])

    # A finished run is answered from the store, without training or registering again.
    records.clear()
    assert run_training(settings, store, RunRequest("r1", tuple(SYMS), tiny_ppo(3)), on_progress=records.append,
                        registry=registry) == res
    assert [r["phase"] for r in records] == ["done"] and len(registry.list("cvar-ppo")) == 1
    with pytest.raises(ValueError, match="evaluation alpha"):  # not a stale answer to another question
        run_training(settings, store, RunRequest("r1", tuple(SYMS), tiny_ppo(3), eval_alpha=0.05), registry=registry)


def test_registering_a_run_twice_keeps_one_candidate(tmp_path):
    from core.models.registry import ModelRegistry
    from core.rl.run import register_candidate

    settings = tiny_settings(tmp_path)
    registry = ModelRegistry(settings)
    policy = ActorCritic(W * F + 3, 3, (8,), torch.tensor([-1.0, 0.0, 1.0]), seed=1)
    member, _ = export_member_onnx(policy, W, F, np.zeros((1, W, F), np.float32))
    first = register_candidate(registry, "cvar-ppo", "run-a", member, {"window": W}, {"sharpe": 1.5, "cvar": -0.01})
    again = register_candidate(registry, "cvar-ppo", "run-a", member, {"window": W}, {"sharpe": 1.5, "cvar": -0.01})
    other = register_candidate(registry, "cvar-ppo", "run-b", member, {"window": W}, {"sharpe": 0.5})
    assert again["version"] == first["version"] == 1 and other["version"] == 2
    assert first["metrics"] == {"sharpe": 1.5, "cvar": -0.01} and len(registry.performance("cvar-ppo", 1)) == 1


def test_stopped_run_resumes_from_its_store_checkpoint_with_the_numbers_of_an_unbroken_run(store_with_bars):
    from core.models.registry import ModelRegistry

    settings, store, market = store_with_bars
    registry = ModelRegistry(settings)
    ppo = tiny_ppo(5, seed=3)
    unbroken = run_training(settings, store, RunRequest("whole", tuple(SYMS), ppo), registry=registry)

    import threading

    stop = threading.Event()

    def stop_at_two(record):
        if record.get("phase") == "training" and record["iteration"] == 2:
            stop.set()

    first = run_training(settings, store, RunRequest("broken", tuple(SYMS), ppo), on_progress=stop_at_two, stop=stop,
                         registry=registry)
    assert first["state"] == "stopped" and first["global_step"] == 2 * BATCH
    assert not store.exists(run_path("broken", "result.json"))
    with pytest.raises(ValueError, match="was started with other symbols or settings"):
        run_training(settings, store, RunRequest("broken", tuple(SYMS), tiny_ppo(5, seed=4)))
    store.append(market.generate(40))  # new bars arrive; the resumed run must keep to its own
    second = run_training(settings, store, RunRequest("broken", tuple(SYMS), ppo), registry=registry)
    assert second["resumed_from_step"] == 2 * BATCH
    assert second["steps_this_process"] == 3 * BATCH
    keys = ("global_step", "mean_return", "cvar", "approx_kl", "pg_loss", "v_loss")
    assert [[h[k] for k in keys] for h in second["history"]] == [[h[k] for k in keys] for h in unbroken["history"]]
    assert second["evaluation"] == unbroken["evaluation"]

    with pytest.raises(ValueError, match="finished with other symbols, settings"):
        run_training(settings, store, RunRequest("broken", tuple(SYMS), tiny_ppo(5, seed=4)))


@pytest.mark.parametrize("symbols, ppo, needle", [
    (["SPY", "NOPE"], tiny_ppo(2), "no bars of NOPE"),
    (["SPY"], CVaRPPOSettings(total_timesteps=4 * BATCH, num_steps=L // 2), "must be a multiple of"),
    (["SPY"], CVaRPPOSettings(total_timesteps=BATCH - 1, num_steps=L), "do not cover one rollout"),
    (["SPY", "SPY"], tiny_ppo(2), "symbols repeat"),
    (["SPY"], tiny_ppo(2, risk_mode="mean_cvar", beta=float("nan"), lambda_lr=1.0), "must be finite"),
])
def test_bad_requests_are_refused_with_what_to_fix(store_with_bars, symbols, ppo, needle):
    settings, store, _ = store_with_bars
    with pytest.raises(ValueError, match=needle):
        run_training(settings, store, RunRequest("bad", tuple(symbols), ppo))


def test_too_little_history_and_bad_run_ids_are_refused(tmp_path):
    settings = tiny_settings(tmp_path)
    store = BarStore.from_settings(settings.store)
    store.append(SyntheticMarket(["SPY"], seed=1).generate(90))
    with pytest.raises(ValueError, match="too few"):
        load_data(store, ["SPY"], settings.learner)
    with pytest.raises(ValueError, match="run id"):
        run_path("../escape", "ckpt.pt")


# --------------------------------------------------------------------------- the actor
@pytest.fixture
def named_registry(ray_session):
    """No registry actor from another test (bound to another store) before or after this one."""
    from actors.registry import REGISTRY_ACTOR

    def kill():
        try:
            ray.kill(ray.get_actor(REGISTRY_ACTOR, namespace="raytrade"), no_restart=True)
        except ValueError:
            return
        deadline = time.time() + 30
        while time.time() < deadline:  # the name is released shortly after the kill
            try:
                ray.get_actor(REGISTRY_ACTOR, namespace="raytrade")
                time.sleep(0.1)
            except ValueError:
                return

    kill()
    yield
    kill()


def _actor(settings):
    return get_or_create_learner(settings, name=f"learner-test-{uuid.uuid4().hex[:8]}", detached=False)


@pytest.mark.slow  # tens of seconds on 2 cores: left out of a bare `pytest`, run by `make test`
def test_actor_answers_progress_while_training_and_refuses_a_second_run(ray_session, named_registry, store_with_bars):
    settings, _, _ = store_with_bars
    learner = _actor(settings)
    try:
        ppo = tiny_ppo(30)
        ref = learner.train.remote("live", SYMS, ppo)
        seen, refused = [], False
        while not ray.wait([ref], timeout=0)[0]:
            p = ray.get(learner.progress.remote(), timeout=30)
            if p.get("phase") == "training":
                seen.append(p)
                if not refused:
                    with pytest.raises(LearnerBusy, match="training run live"):
                        ray.get(learner.train.remote("other", SYMS, ppo), timeout=30)
                    refused = True
            time.sleep(0.05)
        result = ray.get(ref)
        mid = [p["global_step"] for p in seen]
        assert refused and len(mid) >= 2 and mid == sorted(mid) and mid[0] < ppo.total_timesteps
        assert all({"mean_return", "cvar", "approx_kl", "lambda_"} <= set(p) for p in seen)
        final = ray.get(learner.progress.remote())
        assert final["state"] == "done" and final["global_step"] == ppo.total_timesteps
        assert final["device"] == "cpu" and final["memory_fraction"] is None  # no GPU in the table's cpu profile
        assert result["candidate"]["metrics"]["cvar"] == result["evaluation"]["aggregate"]["cvar"]
    finally:
        ray.kill(learner, no_restart=True)


@pytest.mark.slow  # tens of seconds on 2 cores: left out of a bare `pytest`, run by `make test`
def test_killed_actor_is_restarted_and_training_resumes_from_the_checkpoint_not_zero(ray_session, named_registry, store_with_bars):
    settings, store, _ = store_with_bars
    learner = _actor(settings)
    try:
        ppo = tiny_ppo(40)
        ref = learner.train.remote("survivor", SYMS, ppo)
        deadline = time.time() + 120
        while True:
            p = ray.get(learner.progress.remote(), timeout=30)
            if p.get("checkpoint_step", 0) >= 2 * BATCH or time.time() > deadline:
                break
            time.sleep(0.05)
        ckpt_seen, pid_before = p["checkpoint_step"], p["pid"]
        assert 0 < ckpt_seen < ppo.total_timesteps
        ray.kill(learner, no_restart=False)  # Ray restarts it (max_restarts=-1)

        result = ray.get(learner.train.remote("survivor", SYMS, ppo), timeout=300)
        after = ray.get(learner.progress.remote())
        assert after["pid"] != pid_before, "the actor was not restarted"
        assert ckpt_seen <= result["resumed_from_step"] < ppo.total_timesteps
        assert result["steps_this_process"] == ppo.total_timesteps - result["resumed_from_step"]
        assert result["global_step"] == ppo.total_timesteps and len(result["history"]) == 40
        try:  # Ray may also have retried the first call on the new process: the same run, the same answer
            assert ray.get(ref, timeout=60) == result
        except ray.exceptions.RayActorError:
            pass
    finally:
        ray.kill(learner, no_restart=True)


# --------------------------------------------------------------------------- the CLI
@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for k, v in {"STORE__URI": str(tmp_path / "store"), "LEARNER__WINDOW": str(W),
                 "LEARNER__EPISODE_LENGTH": str(L), "LEARNER__NUM_ENVS": str(N)}.items():
        monkeypatch.setenv(f"RAYTRADE_{k}", v)
    BarStore.from_settings(load_settings(use_file=False).store).append(SyntheticMarket(["SPY"], seed=9).generate(600))
    return tmp_path


@pytest.mark.parametrize("args, needle", [
    (["--symbols", "SPY", "--alpha", "1"], "--alpha 1.0: must be in (0, 1)"),
    (["--symbols", "SPY", "--steps", "100"], f"= {BATCH} steps; give at least that"),
    (["--symbols", "MSFT"], "no bars of MSFT"),
    (["--symbols", "SPY", "--run", "a b"], "--run 'a b'"),
    (["--symbols", "SPY", "--alpha", "lots"], "invalid float value: 'lots'"),
    (["--symbols", "SPY", "--steps", str(BATCH), "--beta", "nan"], "--beta nan: must be a finite"),
    (["--symbols", "SPY", "--beta", "-0.01", "--lambda-lr", "nan"], "--lambda-lr nan"),
])
def test_train_cli_bad_input_is_one_line_exit_2(cli_env, capsys, args, needle):
    from raytrade.cli import main

    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_train_cli_prints_baseline_and_cvar_ppo_on_the_same_heldout_bars(ray_session, named_registry, cli_env, capsys):
    from raytrade.cli import main

    assert main(["train", "--symbols", "SPY", "--steps", str(2 * BATCH), "--alpha", "0.25", "--run", "cli"]) == 0
    out = capsys.readouterr().out
    store = BarStore.from_settings(load_settings(use_file=False).store)
    results = {r: json.loads(store.get_bytes(run_path(f"cli-{r}", "result.json"))) for r in ("baseline", "cvar")}
    assert results["baseline"]["ppo"]["alpha"] == 1.0 and results["cvar"]["ppo"]["alpha"] == 0.25
    assert results["baseline"]["candidate"]["name"] == "cvar-ppo-baseline"  # never promoted as the CVaR model
    assert results["cvar"]["candidate"]["name"] == "cvar-ppo"
    # Both judged on the same bars, at the same CVaR level.
    assert (results["baseline"]["evaluation"]["symbols"]["SPY"]["first"]
            == results["cvar"]["evaluation"]["symbols"]["SPY"]["first"])
    assert results["baseline"]["evaluation"]["alpha"] == results["cvar"]["evaluation"]["alpha"] == 0.25
    rows = {line.split("  ")[0]: line for line in out.splitlines() if line.startswith(("risk-neutral", "CVaR-PPO"))}
    assert set(rows) == {"risk-neutral PPO (alpha=1)", "CVaR-PPO (alpha=0.25)"}
    for label, r in zip(sorted(rows), ("cvar", "baseline")):
        a = results[r]["evaluation"]["aggregate"]
        assert f"{a['cvar']:.6f}" in rows[label] and f"{a['sharpe']:.3f}" in rows[label]
    with pytest.raises(ValueError):  # the CLI removed the learner it started
        ray.get_actor("learner", namespace="raytrade")


def test_scheduler_target_trains_once_per_run_id(ray_session, named_registry, cli_env):
    from actors.learner import LEARNER_ACTOR, train_workflow
    from core.scheduling import import_target

    settings = load_settings(use_file=False)
    assert import_target(settings.scheduler.workflows["model_training"].target) is train_workflow
    try:
        first = train_workflow("wf", ["SPY"], 2 * BATCH, alpha=0.25)
        store = BarStore.from_settings(settings.store)
        from core.models.registry import ModelRegistry

        assert first["sha256"] == hashlib.sha256(ModelRegistry(settings).load("cvar-ppo", first["version"])).hexdigest()
        assert first["global_step"] == 2 * BATCH
        t0 = time.monotonic()
        assert train_workflow("wf", ["SPY"], 2 * BATCH, alpha=0.25) == first  # run twice: answered, not retrained
        assert time.monotonic() - t0 < 10
    finally:
        ray.kill(ray.get_actor(LEARNER_ACTOR, namespace=settings.ray.namespace), no_restart=True)


# --------------------------------------------------------------------------- GPU
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.mark.gpu
@requires_cuda
def test_gpu_memory_is_held_to_the_learners_share():
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        device, fraction = select_device("gpu", {"learner": {"num_gpus": 0.25}})
        assert (device, fraction) == ("cuda", 0.25)
        ok = torch.empty(int(0.10 * total), dtype=torch.uint8, device="cuda")
        del ok
        torch.cuda.empty_cache()
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(0.40 * total), dtype=torch.uint8, device="cuda")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        torch.cuda.empty_cache()
    assert select_device("cpu") == ("cpu", None)  # the table gives the role no GPU: it stays off the GPU


@pytest.mark.gpu
@requires_cuda
def test_a_run_on_the_gpu_exports_a_member_that_matches_torch(store_with_bars):
    settings, store, _ = store_with_bars
    try:
        device, _ = select_device("gpu")
        res = run_training(settings, store, RunRequest("gpu", tuple(SYMS), tiny_ppo(3)), device=device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert res["device"] == "cuda" and res["global_step"] == 3 * BATCH
    assert res["candidate"]["metadata"]["onnx_torch_max_abs_diff"]["member"] < 1e-5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback where no GPU is visible")
def test_without_a_visible_gpu_the_gpu_profile_trains_on_the_cpu():
    assert select_device("gpu") == ("cpu", None)
