"""The ensemble: failing members isolated, hot reload without a failed request, feedback, Serve."""

from __future__ import annotations

import asyncio
import math
import os
import time

import numpy as np
import pytest
import torch

from actors.ensemble import BatchingHandle, Ensemble, EnsembleActor, get_or_create_ensemble
from actors.registry import get_or_create_registry
from core.baselines import export_onnx, random_model
from core.features import FEATURE_NAMES, WARMUP
from core.fusion import MultiplicativeWeights, outcome_loss
from core.models.cache import DeviceConfig, OnnxModel
from core.models.registry import ModelRegistry
from core.strategies import rsi_reversion, sma_crossover
from core.synthetic import generate_bars
from serve.ensemble import ensemble_deployment

F = len(FEATURE_NAMES)
HERE = "tests.test_ensemble"
LONG = 200  # bars per request: past the warm-up with room for the longest window


# -- members a user might write (named by import path in settings) ------------------------
def always_half_long(batch):
    return np.full(len(batch), 0.5)


def always_long(batch):
    return np.ones(len(batch))


def always_short(batch):
    return -np.ones(len(batch))


def raises(batch):
    raise ValueError("model server said no")


def returns_nan(batch):
    return np.full(len(batch), np.nan)


def too_slow(batch):
    time.sleep(1.0)
    return np.zeros(len(batch))


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spy():
    return generate_bars(["SPY"], 1200, seed=11).reset_index(drop=True)


def request(bars, end, n=LONG, symbol="SPY"):
    w = bars.iloc[end - n: end]
    out = {k: w[k].to_numpy() for k in ("open", "high", "low", "close", "volume")}
    out["ts"] = w["ts"].astype("int64").to_numpy()
    return {"symbol": symbol, "bars": out}


def python_members(*names, timeout=None):
    return [{"name": n, "import_path": f"{HERE}:{n}", **({"timeout_s": timeout} if timeout else {})} for n in names]


def run(coro):
    return asyncio.run(coro)


class _Constant(torch.nn.Module):
    """A model whose answer is known: ``value`` whatever the features."""

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return x[:, -1, 0] * 0.0 + self.value


# -- failure isolation --------------------------------------------------------------------------
def test_failing_members_are_left_out_and_confidence_says_so(make_settings, spy):
    settings = make_settings(ensemble={
        "rules": [],
        "python_members": python_members("always_half_long", "raises", "returns_nan")
        + python_members("too_slow", timeout=0.2),
        "max_tail_risk": 1.0,
    })
    ens = Ensemble(settings, use_registry=False, profile="cpu")
    t0 = time.time()
    answers = run(ens.predict([request(spy, e) for e in (300, 301, 302)]))
    assert time.time() - t0 < 0.9  # the slow member was not waited for
    for a in answers:
        assert not a["hold"] and a["position"] == pytest.approx(0.5)
        assert a["coverage"] == pytest.approx(0.25) and a["confidence"] == pytest.approx(0.25)
        assert set(a["members"]) == {"always_half_long"}
        assert a["failed"]["raises"] == "ValueError: model server said no"
        assert a["failed"]["returns_nan"] == "returned nan"
        assert a["failed"]["too_slow"] == "timeout: no answer within 0.2s"


def test_small_batches_run_rule_and_onnx_members_inline_and_a_late_one_is_still_left_out(make_settings, spy):
    """Rule members of a small batch run on the event loop (no thread): one that answers past its
    timeout cannot be cut off there, but its late answer is left out as a thread's would be."""
    import threading

    from core.ensemble import INLINE_MAX_ROWS, _Slot

    seen = {}

    class Rule:
        def __init__(self, name, value, sleep_s=0.0):
            self.name, self.value, self.sleep_s, self.version = name, value, sleep_s, "rule"

        def predict(self, batch):
            seen[self.name] = threading.current_thread() is threading.main_thread()
            time.sleep(self.sleep_s)
            return np.full(len(batch), self.value)

    settings = make_settings(ensemble={"rules": [], "python_members": python_members("always_short"),
                                       "max_tail_risk": 1.0})
    ens = Ensemble(settings, use_registry=False, profile="cpu")
    ens._slots = ens._slots + (_Slot(Rule("quick", 1.0), 1.0, "rule"), _Slot(Rule("late", 1.0, 0.05), 0.01, "rule"))
    (a,) = run(ens.predict([request(spy, 400)]))
    assert seen == {"quick": True, "late": True}  # on the loop's thread
    assert a["failed"]["late"].startswith("timeout: answered after") and "past 0.01s" in a["failed"]["late"]
    assert set(a["members"]) == {"quick", "always_short"} and a["position"] == pytest.approx(0.0)
    seen.clear()
    run(ens.predict([request(spy, e) for e in range(400, 401 + INLINE_MAX_ROWS)]))  # one row too many
    assert seen == {"quick": False, "late": False}  # in their threads


def test_member_weights_from_settings(make_settings, spy):
    members = python_members("always_long", "always_short")
    members[0]["weight"] = 3.0
    settings = make_settings(ensemble={"rules": [], "python_members": members, "max_tail_risk": 1.0})
    (a,) = run(Ensemble(settings, use_registry=False, profile="cpu").predict([request(spy, 400)]))
    # Weights 3:1 on +1 and -1: mean 0.5, weighted variance 0.75 (as in test_fusion).
    assert a["members"]["always_long"]["weight"] == pytest.approx(0.75)
    assert a["position"] == pytest.approx(0.5 * (1 - math.sqrt(0.75)))


def test_every_member_failing_is_hold_with_the_reasons(make_settings, spy):
    settings = make_settings(ensemble={"rules": [], "python_members": python_members("raises", "returns_nan")})
    (a,) = run(Ensemble(settings, use_registry=False, profile="cpu").predict([request(spy, 400)]))
    assert a["hold"] and a["action_hint"] == "HOLD" and a["position"] == 0.0 and a["confidence"] == 0.0
    assert a["reason"] == "every member failed: raises: ValueError: model server said no; returns_nan: returned nan"


def test_a_bad_request_is_hold_for_that_row_only(make_settings, spy):
    settings = make_settings(ensemble={"rules": [], "python_members": python_members("always_half_long")})
    ens = Ensemble(settings, use_registry=False, profile="cpu")
    good, short, junk = run(ens.predict([request(spy, 400), request(spy, 400, n=WARMUP - 5), {"bars": None}]))
    assert not good["hold"]
    # A Python member answers whatever the features; the rows still report what was wrong.
    assert "need 1 finite feature rows" in ens._prepare([request(spy, 400, n=WARMUP - 5)])[1][0]
    assert short["symbol"] == "SPY"
    assert junk["symbol"] == "" and "needs a symbol" in ens._prepare([{"bars": None}])[1][0]


def test_rule_members_are_cores_strategies(make_settings, spy):
    settings = make_settings(ensemble={"rules": [
        {"name": "sma", "strategy": "sma_crossover", "params": {"fast": 5, "slow": 20, "mode": "state"}},
        {"name": "rsi", "strategy": "rsi_reversion", "params": {"window": 14, "lower": 45, "upper": 55}},
    ], "max_tail_risk": 1.0})
    ens = Ensemble(settings, use_registry=False, profile="cpu")
    ends = list(range(300, 340))
    answers = run(ens.predict([request(spy, e) for e in ends]))
    for e, a in zip(ends, answers):
        w = spy.iloc[e - LONG: e]
        assert a["members"]["sma"]["position"] == sma_crossover(w, 5, 20, mode="state")[-1]
        assert a["members"]["rsi"]["position"] == rsi_reversion(w, 14, 45, 55)[-1]
    assert {a["members"]["sma"]["position"] for a in answers} == {-1.0, 1.0}  # the oracle is not trivially flat


# -- learned members from the registry -------------------------------------------------------------
def _register(reg, name, model, window, promote=True):
    rec = reg.register(name, export_onnx(model, window, F), "forecasting", {"window": window})
    if promote:
        reg.promote(name, rec["version"])
    return rec


def test_corrupted_or_oversized_models_are_refused_and_the_rest_serve(make_settings, spy):
    from pathlib import Path

    settings = make_settings(ensemble={"rules": [], "cache_budget_bytes": 60_000, "max_tail_risk": 1.0})
    reg = ModelRegistry(settings)
    _register(reg, "mlp", random_model("mlp", seed=1), 8)
    ens = Ensemble(settings, reg, profile="cpu")
    assert ens.model_versions() == {"mlp": "v1"}
    # v2 is corrupted in the store after registration: the replica keeps serving v1.
    rec = _register(reg, "mlp", random_model("mlp", seed=2), 8, promote=False)
    path = Path(settings.store.uri) / rec["path"]
    path.write_bytes(path.read_bytes()[:-10] + b"0123456789")
    reg.promote("mlp", 2)
    # An LSTM with 64 hidden units is bigger than the whole budget.
    big = random_model("lstm", seed=3, hidden=64)
    big_rec = _register(reg, "big", big, 32)
    assert big_rec["size"] > 60_000
    run(ens.refresh())
    assert ens.model_versions() == {"mlp": "v1"}
    assert "CorruptArtefact" in ens.load_errors["mlp"] and "sha256" in ens.load_errors["mlp"]
    assert f"{big_rec['size']:,} bytes" in ens.load_errors["big"] and "60,000 bytes" in ens.load_errors["big"]
    (a,) = run(ens.predict([request(spy, 500)]))
    assert not a["hold"] and a["model_versions"] == {"mlp": "v1"}


def test_a_batch_answers_each_request_as_it_would_be_answered_alone(make_settings, spy):
    # The batch's features are computed in one pass (core.features.latest_features);
    # no row may come out different from that request sent on its own, bad rows included.
    from core.features import compute_features

    settings = make_settings(ensemble={"rules": [], "python_members": python_members("always_half_long"),
                                       "max_tail_risk": 1.0})
    reg = ModelRegistry(settings)
    _register(reg, "lstm", random_model("lstm", seed=4), 32)
    ens = Ensemble(settings, reg, profile="cpu")
    assert ens.window() == 32
    bad = request(spy, 700)
    bad["bars"]["close"] = bad["bars"]["close"].copy()
    bad["bars"]["close"][-3] = -1.0
    reqs = [request(spy, e, n=n, symbol=f"S{e}") for e, n in ((400, LONG), (450, WARMUP + 32), (500, 300), (520, WARMUP + 31))]
    reqs.insert(2, bad)
    batch, errors, _ = ens._prepare(reqs)
    for i in (0, 1, 3):
        np.testing.assert_array_equal(batch.features[i], compute_features(reqs[i]["bars"])[-32:])
    assert errors[:2] == [None, None] and errors[3] is None
    assert errors[2] == "close prices must be finite and positive" and "not all finite" in errors[4]
    together = run(ens.predict(reqs))
    for r, a in zip(reqs, together):
        (alone,) = run(ens.predict([r]))
        # ONNX Runtime may pick another GEMM kernel for one row than for five: equal to float32 rounding.
        assert a["members"].keys() == alone["members"].keys() and a["failed"] == alone["failed"]
        for name, m in a["members"].items():
            assert m["position"] == pytest.approx(alone["members"][name]["position"], abs=1e-6)
        assert a["position"] == pytest.approx(alone["position"], abs=1e-6) and a["hold"] == alone["hold"]
    assert "lstm" in together[2]["failed"] and "lstm" in together[4]["failed"] and "lstm" not in together[0]["failed"]


def test_feedback_scores_members_against_the_next_bar(make_settings, spy):
    n = 60
    settings = make_settings(ensemble={
        "rules": [], "python_members": python_members("always_long", "always_short"),
        "adapt_eta": 0.02, "degradation_min_samples": 20, "accuracy_window": 500,
    })
    reg = ModelRegistry(settings)
    _register(reg, "const", _Constant(1.0), 1)
    ens = Ensemble(settings, reg, profile="cpu")
    ends = list(range(400, 400 + n))
    answers = [run(ens.predict([request(spy, e)]))[0] for e in ends]
    close = spy["close"].to_numpy()
    moves = [close[e] / close[e - 1] - 1 for e in ends[1:]]  # the bar after each prediction
    # The always-long model is right exactly when the next bar rose.
    up = [m > 0 for m in moves if m != 0]
    run(ens.flush_outcomes())
    stats = reg.record_outcomes("const", 1, [])
    assert stats["samples"] == len(up) and stats["rolling_accuracy"] == pytest.approx(np.mean(up))
    # Replaying the same outcomes through multiplicative weights gives the ensemble's weights.
    mw = MultiplicativeWeights(0.02)
    for a, m in zip(answers[:-1], moves):
        mw.update(a["regime"], {n: float(outcome_loss(a["members"][n]["position"], m)) for n in a["members"]})
    def flat(state):
        return {(r, m): v for r, row in state.items() for m, v in row.items()}

    assert flat(ens.weights.adaptive.state()) == pytest.approx(flat(mw.state()))
    assert any(v < 1.0 for r in mw.state().values() for v in r.values())


def test_degrading_production_model_raises_a_retraining_request(make_settings, spy):
    settings = make_settings(ensemble={"rules": [], "degradation_min_samples": 10, "degradation_threshold": 0.99})
    reg = ModelRegistry(settings)
    _register(reg, "const", _Constant(-1.0), 1)
    ens = Ensemble(settings, reg, profile="cpu")
    for e in range(600, 640):
        run(ens.predict([request(spy, e)]))
    run(ens.flush_outcomes())
    (req,) = reg.retraining_requests()
    assert req["model"] == "const" and req["version"] == 1 and "below 0.99" in req["reason"]
    assert "degraded" in reg.get("const", 1)["flags"]


# -- hot reload under load, through Ray actors ---------------------------------------------------
def test_promotion_and_rollback_during_concurrent_requests_fail_none(ray_session, make_settings, spy):
    import ray

    settings = make_settings(ensemble={"rules": [], "reload_poll_s": 0.2, "member_timeout_s": 5.0, "max_tail_risk": 1.0})
    settings.ray.namespace = "test-ensemble-reload"
    reg = get_or_create_registry(settings)
    models = {1: random_model("mlp", seed=21), 2: random_model("mlp", seed=22)}
    blobs = {v: export_onnx(m, 8, F) for v, m in models.items()}
    for v in (1, 2):
        ray.get(reg.register.remote("dir", blobs[v], "forecasting", {"window": 8}), timeout=60)
    ray.get(reg.promote.remote("dir", 1), timeout=60)
    ens = get_or_create_ensemble(settings)
    local = {v: OnnxModel("dir", v, b, DeviceConfig(), n_features=F) for v, b in blobs.items()}
    reqs = [request(spy, e) for e in range(300, 332)]
    from core.features import compute_features

    feats = {i: compute_features(r["bars"])[-8:][None] for i, r in enumerate(reqs)}
    want = {v: {i: float(local[v].run(f)[0]) for i, f in feats.items()} for v in (1, 2)}
    assert max(abs(want[1][i] - want[2][i]) for i in want[1]) > 1e-3  # the versions are distinguishable

    seen: list[tuple[float, int]] = []
    errors: list[str] = []

    async def caller(k: int, stop: asyncio.Event) -> None:
        i = k
        while not stop.is_set():
            idx = i % len(reqs)
            i += 1
            try:
                a = await ens.predict_one.remote(reqs[idx])
            except Exception as e:  # noqa: BLE001 - counted, must be none
                errors.append(repr(e))
                continue
            if a["hold"] or "dir" in a["failed"]:
                errors.append(f"{a['reason']} {a['failed']}")
                continue
            v = int(a["model_versions"]["dir"][1:])
            if abs(a["members"]["dir"]["position"] - want[v][idx]) > 1e-5:
                errors.append(f"request {idx}: position {a['members']['dir']['position']} is not v{v}'s {want[v][idx]}")
            seen.append((time.time(), v))

    async def wait_for(version: int, after: int, timeout: float = 60) -> None:
        t0 = time.time()
        while not any(v == version for _, v in seen[after:]):
            assert time.time() - t0 < timeout, f"v{version} never served"
            await asyncio.sleep(0.05)
        mark = len(seen)
        while len(seen) < mark + 40:  # keep streaming after the swap
            await asyncio.sleep(0.02)

    async def scenario() -> None:
        stop = asyncio.Event()
        callers = [asyncio.create_task(caller(k, stop)) for k in range(16)]
        await wait_for(1, 0)
        n = len(seen)
        await reg.promote.remote("dir", 2)
        await wait_for(2, n)
        n = len(seen)
        await reg.rollback.remote("dir")
        await wait_for(1, n)
        stop.set()
        await asyncio.gather(*callers)

    try:
        asyncio.run(scenario())
        status = ray.get(ens.status.remote(), timeout=30)
    finally:
        ray.kill(ens, no_restart=True)
        ray.kill(reg, no_restart=True)
    assert errors == []
    versions = [v for _, v in sorted(seen)]
    # v1, then v2 once promoted, then v1 after the rollback (callers may straddle a swap briefly).
    first2, last2 = versions.index(2), len(versions) - 1 - versions[::-1].index(2)
    assert 1 in versions[:first2] and 1 in versions[last2 + 1:] and len(versions) > 150
    assert status["largest_batch"] > 1  # concurrent callers were batched
    assert status["generation"] >= 4


def test_batching_handle_sends_concurrent_callers_in_one_ray_call_with_their_own_answers(ray_session, make_settings,
                                                                                            spy):
    import ray

    settings = make_settings(ensemble={"max_tail_risk": 1.0})  # the default rule members: no imports in the actor
    actor = EnsembleActor.options(num_cpus=0.25).remote(settings, use_registry=False, profile="cpu")
    reqs = [request(spy, 300 + 7 * k, symbol=f"S{k}") for k in range(24)]
    try:
        want = ray.get([actor.predict_one.remote(r) for r in reqs], timeout=120)
        handle = BatchingHandle(actor)

        async def callers():
            return await asyncio.gather(*(handle.predict_one(r) for r in reqs))

        got = run(callers())
    finally:
        ray.kill(actor, no_restart=True)
    assert sum(handle.batch_sizes) == len(reqs) and len(handle.batch_sizes) < len(reqs)
    for w, g in zip(want, got):
        assert g["symbol"] == w["symbol"] and g["members"] == w["members"]
        assert (g["position"], g["confidence"], g["hold"]) == (w["position"], w["confidence"], w["hold"])


def test_callers_answered_by_a_batch_form_the_next_one_without_waiting_again():
    # Only a burst's first batch waits batch_wait_s for company. Callers that
    # resubmit as soon as they are answered (a closed loop, as the benchmark's
    # and a busy ingress's are) must not pay it again on every batch.
    from core.batching import Batcher

    async def answer(items):
        return [i * 2 for i in items]

    batcher = Batcher(answer, max_batch=64, wait_s=0.05)

    async def caller(k):
        return [await batcher.submit(k) for _ in range(10)]

    async def closed_loop():
        t0 = time.perf_counter()
        got = await asyncio.gather(*(caller(k) for k in range(8)))
        return got, time.perf_counter() - t0

    got, took = run(closed_loop())
    assert got == [[2 * k] * 10 for k in range(8)]
    assert batcher.batch_sizes == [8] * 10
    assert took < 0.3, f"{took:.3f} s: ten batches each waited 0.05 s"  # one wait, not ten


def test_batching_handle_gives_every_caller_in_a_failed_batch_the_error():
    class Down:
        class predict:  # noqa: N801 - shaped like an actor method
            @staticmethod
            async def remote(requests):
                raise ConnectionError(f"ensemble unreachable ({len(requests)} requests)")

    handle = BatchingHandle(Down())

    async def callers():
        return await asyncio.gather(*(handle.predict_one({"symbol": "SPY"}) for _ in range(5)), return_exceptions=True)

    errors = run(callers())
    assert [str(e) for e in errors] == ["ensemble unreachable (5 requests)"] * 5


def test_serve_deployment_batches_and_reconfigures(ray_session, make_settings, spy, serve_port):
    from ray import serve


    settings = make_settings(ensemble={"rules": [], "python_members": python_members("always_half_long"),
                                       "max_tail_risk": 1.0})
    reg = ModelRegistry(settings)  # created first, so the replica finds an index in the store
    _register(reg, "mlp", random_model("mlp", seed=1), 8)
    dep = ensemble_deployment(settings, profile="cpu")
    assert dep.ray_actor_options["num_cpus"] == 0.25 and dep.ray_actor_options["memory"] == 2 * 1024**3
    # Serve's local testing mode cannot run @serve.batch in Ray 2.60 (it asks for a
    # replica context), so this runs a real replica. It reads the index from the
    # store itself: no registry actor is needed for this test.
    serve.start(http_options={"host": "127.0.0.1", "port": serve_port})
    handle = serve.run(dep.bind(settings, registry="store"), name="ensemble-test", route_prefix=None)
    try:
        reqs = [request(spy, e) for e in range(400, 432)]
        answers = [r.result(timeout_s=60) for r in [handle.predict_one.remote(q) for q in reqs]]
        status = handle.status.remote().result(timeout_s=60)
        assert status["requests"] == len(reqs) and status["largest_batch"] > 1  # Serve batched them
        assert all(not a["hold"] and a["members"]["always_half_long"]["position"] == 0.5 for a in answers)
        assert answers[0]["model_versions"] == {"always_half_long": "python", "mlp": "v1"}
        handle.reconfigure.remote({"weights": {"mlp": 0.0}}).result(timeout_s=60)
        a = handle.predict_one.remote(reqs[0]).result(timeout_s=60)
        assert a["members"]["mlp"]["weight"] == 0.0 and a["position"] == pytest.approx(0.5)
    finally:
        # Only this app: the session's trading app shares the Serve instance.
        serve.delete("ensemble-test")


def test_default_settings_weigh_rule_members_by_regime(make_settings):
    from core.fusion import RegimeWeights

    w = RegimeWeights(regime_multipliers=make_settings().ensemble.regime_weights)
    assert w.weight("trending", "sma_cross") > w.weight("trending", "rsi_reversion")
    assert w.weight("ranging", "rsi_reversion") > w.weight("ranging", "sma_cross")
    assert w.weight("unknown", "sma_cross") == w.weight("unknown", "rsi_reversion") == 1.0


def test_without_a_registry_the_rule_members_still_serve(ray_session, make_settings, spy):
    settings = make_settings(ensemble={"rules": [], "python_members": python_members("always_half_long")})
    settings.ray.namespace = "test-no-registry"
    ens = Ensemble(settings, profile="cpu")  # no registry actor exists in this namespace
    assert "registry" in ens.load_errors and "model-registry" in ens.load_errors["registry"]
    (a,) = run(ens.predict([request(spy, 400)]))
    assert not a["hold"] and a["model_versions"] == {"always_half_long": "python"}


@pytest.mark.gpu
def test_ensemble_replica_holding_a_gpu_uses_cuda_with_its_share(ray_session, make_settings, spy):
    import ray

    if not torch.cuda.is_available() or ray.cluster_resources().get("GPU", 0) < 1:
        pytest.skip("no CUDA GPU: torch.cuda.is_available() is False or Ray sees no GPU on this machine")
    settings = make_settings(ensemble={"rules": []})
    settings.ray.namespace = "test-ensemble-gpu"
    reg = get_or_create_registry(settings)
    m = random_model("lstm", seed=7)
    ray.get(reg.register.remote("lstm", export_onnx(m, m.window, F), "forecasting", {"window": m.window}), timeout=60)
    ray.get(reg.promote.remote("lstm", 1), timeout=60)
    ens = get_or_create_ensemble(settings)
    try:
        status = ray.get(ens.status.remote(), timeout=120)
        snap = ray.get(ens.memory_snapshot.remote(), timeout=60)
        a = ray.get(ens.predict_one.remote(request(spy, 500)), timeout=60)
    finally:
        ray.kill(ens, no_restart=True)
        ray.kill(reg, no_restart=True)
    total = torch.cuda.get_device_properties(0).total_memory
    share = 0.25  # the gpu profile's ensemble role
    assert status["device"]["cuda"] and status["providers"]["lstm"][0] == "CUDAExecutionProvider"
    assert status["device"]["gpu_mem_limit"] == int(total * share)
    assert snap["gpu"]["gpu_mem_limit"] == int(total * share) and snap["gpu"]["used_bytes"] > 0
    assert not a["hold"] and "lstm" in a["members"]
    print(f"replica on CUDA: providers {status['providers']['lstm']}, gpu_mem_limit {status['device']['gpu_mem_limit']}")
