"""The model registry: versions and stages, checked artefacts, atomic writes, restarts, metrics, CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from actors.registry import get_or_create_registry
from core.baselines import export_onnx, random_model
from core.features import FEATURE_NAMES
from core.models.artefacts import ArtefactStore
from core.models.errors import CorruptArtefact, RegistryError, UnknownModel
from core.models.index import INDEX
from core.models.registry import ModelRegistry

F = len(FEATURE_NAMES)


@pytest.fixture(scope="module")
def blobs():
    return [export_onnx(random_model("mlp", seed=s), 8, F) for s in range(3)]


def test_versions_stages_promote_and_rollback(make_settings, blobs):
    reg = ModelRegistry(make_settings())
    r1 = reg.register("dir", blobs[0], "forecasting", {"tags": ["a"], "params": {"h": 64}})
    r2 = reg.register("dir", blobs[1], "forecasting", {"parent_version": 1})
    r3 = reg.register("dir", blobs[2], "forecasting")
    assert [r["version"] for r in (r1, r2, r3)] == [1, 2, 3]
    assert {r["stage"] for r in reg.list("dir")} == {"candidate"}
    with pytest.raises(RegistryError, match="no production version"):
        reg.get("dir", stage="production")
    reg.promote("dir", 1)
    reg.promote("dir", 3)
    stages = {r["version"]: r["stage"] for r in reg.list("dir")}
    assert stages == {1: "archived", 2: "candidate", 3: "production"}
    assert reg.production()["models"]["dir"]["version"] == 3
    assert reg.rollback("dir")["version"] == 1
    assert {r["version"]: r["stage"] for r in reg.list("dir")} == {1: "production", 2: "candidate", 3: "archived"}
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        reg.rollback("dir")
    assert reg.load("dir") == blobs[0]  # production, checked
    assert reg.get("dir", 2)["metadata"]["parent_version"] == 1


def test_refusals_say_what_to_fix(make_settings, blobs):
    reg = ModelRegistry(make_settings())
    with pytest.raises(RegistryError, match="not a valid ONNX model"):
        reg.register("x", b"not onnx at all", "forecasting")
    with pytest.raises(RegistryError, match="task 'astrology'"):
        reg.register("x", blobs[0], "astrology")
    with pytest.raises(RegistryError, match="model name"):
        reg.register("../etc", blobs[0], "forecasting")
    with pytest.raises(RegistryError, match="parent_version 7"):
        reg.register("x", blobs[0], "forecasting", {"parent_version": 7})
    with pytest.raises(UnknownModel, match="no model named 'nope'"):
        reg.promote("nope", 1)
    assert reg.list() == [] and reg.generation() == 0  # nothing refused was written


def test_corrupted_artefact_is_refused(make_settings, blobs):
    settings = make_settings()
    reg = ModelRegistry(settings)
    rec = reg.register("dir", blobs[0], "forecasting")
    path = Path(settings.store.uri) / rec["path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtefact, match="sha256 .* registered as .*corrupted"):
        reg.load("dir", 1)
    path.unlink()
    with pytest.raises(CorruptArtefact, match="missing"):
        reg.load("dir", 1)


class _FailingIndex(ArtefactStore):
    """A store that dies when the index is written: a crash between artefact and index."""

    def __init__(self, inner, fail_on=INDEX):
        super().__init__(inner.backend, inner.uri)
        self.fail_on = fail_on

    def put(self, rel, data):
        if rel.endswith(self.fail_on):
            raise OSError("disk gone")
        super().put(rel, data)

    def put_if(self, rel, data, tag):
        if rel.endswith(self.fail_on):
            raise OSError("disk gone")
        return super().put_if(rel, data, tag)


def test_a_crash_before_the_index_commit_is_adopted_at_the_next_start(make_settings, blobs):
    settings = make_settings()
    reg = ModelRegistry(settings)
    reg.register("dir", blobs[0], "forecasting", {"by": "first"})
    crashing = ModelRegistry(settings, artefacts=_FailingIndex(ArtefactStore.from_settings(settings)))
    with pytest.raises(OSError, match="disk gone"):
        crashing.register("dir", blobs[1], "forecasting", {"by": "crashed"})
    assert (Path(settings.store.uri) / "models/dir/v2/model.onnx").exists()  # the artefact is whole...
    assert [r["version"] for r in reg.list("dir")] == [1]  # ...and no index names it yet
    again = ModelRegistry(settings)  # the next start adopts it, checked against its sha256
    assert [(r["version"], r["metadata"]["by"], r["stage"]) for r in again.list("dir")] == [
        (1, "first", "candidate"), (2, "crashed", "candidate")]
    assert again.load("dir", 2) == blobs[1]
    assert again.register("dir", blobs[2], "forecasting")["version"] == 3
    assert again.orphans() == []
    assert not [p for p in (Path(settings.store.uri) / "models").rglob(".tmp-*")]


def test_a_crash_before_the_record_leaves_an_orphan_that_gc_removes(make_settings, blobs):
    settings = make_settings()
    reg = ModelRegistry(settings)
    reg.register("dir", blobs[0], "forecasting")
    crashing = ModelRegistry(settings, artefacts=_FailingIndex(ArtefactStore.from_settings(settings), "record.json"))
    with pytest.raises(OSError, match="disk gone"):
        crashing.register("dir", blobs[1], "forecasting")
    again = ModelRegistry(settings)
    assert [r["version"] for r in again.list("dir")] == [1]  # nothing to adopt: no record
    assert again.orphans() == ["models/dir/v2/model.onnx"]
    # The version it took is skipped, never reused: no record can point at the orphan's bytes.
    assert again.register("dir", blobs[2], "forecasting")["version"] == 3
    assert again.collect(["models/dir/v2/model.onnx", "models/dir/v1/model.onnx"]) == ["models/dir/v2/model.onnx"]
    assert again.orphans() == [] and not (Path(settings.store.uri) / "models/dir/v2/model.onnx").exists()
    assert again.load("dir", 1) == blobs[0] and again.load("dir", 3) == blobs[2]


def test_performance_history_and_best(make_settings, blobs):
    reg = ModelRegistry(make_settings())
    for i in range(3):
        reg.register(f"m{i}", blobs[i], "forecasting")
    reg.register("policy", blobs[0], "policy")
    reg.track_performance("m0", 1, {"sharpe": 1.0, "max_drawdown": 0.10, "cvar": -0.030, "latency_ms": 2.0})
    reg.track_performance("m0", 1, {"sharpe": 0.4})  # the latest counts
    reg.track_performance("m1", 1, {"sharpe": 0.9, "max_drawdown": 0.05, "cvar": -0.020, "latency_ms": 5.0})
    reg.track_performance("m2", 1, {"sharpe": 0.7, "max_drawdown": 0.20, "cvar": -0.050, "win_rate": 0.6})
    reg.track_performance("policy", 1, {"sharpe": 9.0})
    assert [h["metrics"] for h in reg.performance("m0", 1)] == [
        {"sharpe": 1.0, "max_drawdown": 0.10, "cvar": -0.030, "latency_ms": 2.0}, {"sharpe": 0.4}]
    assert reg.best("forecasting", "sharpe")["name"] == "m1"
    assert reg.best("forecasting", "max_drawdown")["name"] == "m1"  # lower is better
    assert reg.best("forecasting", "cvar")["name"] == "m1"  # a return: less negative is better
    assert reg.best("forecasting", "latency_ms")["name"] == "m0"
    assert reg.best("policy", "sharpe")["name"] == "policy"
    with pytest.raises(RegistryError, match="unknown metric"):
        reg.track_performance("m0", 1, {"sharp": 1.0})
    with pytest.raises(RegistryError, match="not finite"):
        reg.track_performance("m0", 1, {"sharpe": float("nan")})
    with pytest.raises(RegistryError, match="no forecasting model .* hit_rate"):
        reg.best("forecasting", "hit_rate")


def test_degraded_production_member_is_flagged_and_retraining_requested(make_settings, blobs):
    reg = ModelRegistry(make_settings(ensemble={"degradation_threshold": 0.5, "degradation_min_samples": 20,
                                                "accuracy_window": 40}))
    reg.register("dir", blobs[0], "forecasting")
    reg.register("dir", blobs[1], "forecasting")
    reg.promote("dir", 1)
    # Candidates are scored but never flagged; production at 60 % is fine.
    assert not reg.record_outcomes("dir", 2, [False] * 30)["degraded"]
    out = reg.record_outcomes("dir", 1, [True, True, False, True, False] * 4)
    assert out["rolling_accuracy"] == pytest.approx(0.6) and not out["degraded"]
    assert reg.retraining_requests() == []
    # 20 misses: the last 40 outcomes are 12/40 = 0.3 right.
    out = reg.record_outcomes("dir", 1, [False] * 20)
    assert out["degraded"] and out["rolling_accuracy"] == pytest.approx(0.3) and out["samples"] == 40
    (req,) = reg.retraining_requests()
    assert req["model"] == "dir" and req["version"] == 1 and "0.300" in req["reason"]
    assert reg.get("dir", 1)["flags"] == ["degraded"]
    reg.record_outcomes("dir", 1, [False] * 5)
    assert len(reg.retraining_requests()) == 1  # raised once, not per outcome
    # The request survives a restart: the scheduler may not be up yet.
    assert len(ModelRegistry(reg.settings).retraining_requests()) == 1


def _s3_settings(make_settings, s3_server, bucket):
    from minio import Minio

    mc = Minio(s3_server["endpoint"].split("://")[1], s3_server["access_key"], s3_server["secret_key"], secure=False)
    if not mc.bucket_exists(bucket):
        mc.make_bucket(bucket)
    return make_settings(store={"uri": f"s3://{bucket}/raytrade", "endpoint": s3_server["endpoint"],
                                "access_key": s3_server["access_key"], "secret_key": s3_server["secret_key"]},
                         resilience={"retry_attempts": 1})


def test_on_s3_through_the_minio_client(make_settings, s3_server, blobs):
    settings = _s3_settings(make_settings, s3_server, "models-s3")
    reg = ModelRegistry(settings)
    reg.register("dir", blobs[0], "forecasting")
    reg.promote("dir", 1)
    from minio import Minio

    mc = Minio(s3_server["endpoint"].split("://")[1], s3_server["access_key"], s3_server["secret_key"], secure=False)
    keys = sorted(o.object_name for o in mc.list_objects("models-s3", prefix="raytrade/models/", recursive=True))
    assert keys == ["raytrade/models/dir/v1/model.onnx", "raytrade/models/dir/v1/record.json",
                    "raytrade/models/index.json"]
    mc.put_object("models-s3", "raytrade/models/dir/v1/model.onnx", __import__("io").BytesIO(b"evil"), 4)
    fresh = ModelRegistry(settings)
    assert fresh.get("dir", stage="production")["version"] == 1
    with pytest.raises(CorruptArtefact, match="corrupted"):
        fresh.load("dir")


def test_registry_actor_rebuilds_itself_after_being_killed(ray_session, make_settings, s3_server, blobs):
    import ray

    settings = _s3_settings(make_settings, s3_server, "models-actor")
    settings.ray.namespace = "test-registry-restart"
    actor = get_or_create_registry(settings)
    try:
        ray.get(actor.register.remote("dir", blobs[0], "forecasting", {"tags": ["x"]}), timeout=60)
        ray.get(actor.register.remote("dir", blobs[1], "forecasting"), timeout=60)
        ray.get(actor.promote.remote("dir", 2), timeout=60)
        ray.get(actor.track_performance.remote("dir", 2, {"sharpe": 1.5}), timeout=60)
        before = ray.get(actor.list.remote(), timeout=60)
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
        ray.kill(actor, no_restart=False)  # Ray restarts it (max_restarts=-1); its memory is gone
        deadline = time.time() + 60
        while True:  # ray.kill is asynchronous: wait for a new process to answer
            try:
                if ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30) != pid:
                    break
            except ray.exceptions.RayActorError:
                pass
            assert time.time() < deadline, "the registry did not come back"
            time.sleep(0.5)
        assert ray.get(actor.list.remote(), timeout=30) == before
        assert ray.get(actor.production.remote(), timeout=30)["models"]["dir"]["version"] == 2
        assert ray.get(actor.load.remote("dir"), timeout=30) == blobs[1]
        # The production history came back too: v2 is the only version ever promoted.
        with pytest.raises(ray.exceptions.RayTaskError, match="v2 has no earlier production version"):
            ray.get(actor.rollback.remote("dir"), timeout=30)
    finally:
        ray.kill(actor, no_restart=True)


def test_models_cli_without_a_cluster(make_settings, blobs, tmp_path, capsys, monkeypatch):
    from raytrade.cli import main

    settings = make_settings()
    cfg = tmp_path / "raytrade.toml"
    cfg.write_text(f'[store]\nuri = "{settings.store.uri}"\n')
    monkeypatch.setenv("RAYTRADE_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("cluster.runtime.UP_STATE", tmp_path / "state" / "up.json")
    onnx_file = tmp_path / "mine.onnx"
    onnx_file.write_bytes(blobs[0])
    assert main(["--config", str(cfg), "models", "import", str(onnx_file), "--name", "mine", "--promote"]) == 0
    onnx_file.write_bytes(blobs[1])
    assert main(["--config", str(cfg), "models", "import", str(onnx_file), "--name", "mine"]) == 0
    out = capsys.readouterr().out
    assert "registered mine v1" in out and "mine v1 is production" in out and "registered mine v2" in out
    assert main(["--config", str(cfg), "models", "promote", "mine", "2"]) == 0
    assert main(["--config", str(cfg), "models", "ls"]) == 0
    out = capsys.readouterr().out
    assert "mine v2 is production" in out
    lines = [ln for ln in out.splitlines() if ln.startswith("mine ") and ln.split()[1].isdigit()]
    assert [ln.split()[1:3] for ln in lines] == [["1", "archived"], ["2", "production"]]
    assert main(["--config", str(cfg), "models", "rollback", "mine"]) == 0
    assert main(["--config", str(cfg), "models", "show", "mine"]) == 0
    shown = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["version"] == 1 and shown["stage"] == "production" and shown["metadata"]["window"] == 8
    # A mistake is one line and exit 2.
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    assert main(["--config", str(cfg), "models", "import", str(tmp_path / "junk.onnx"), "--name", "j"]) == 2
    assert main(["--config", str(cfg), "models", "promote", "mine", "9"]) == 2
    err = capsys.readouterr().err
    assert "not a valid ONNX model" in err and "mine has no version 9" in err
    assert ModelRegistry(settings).get("mine", stage="production")["version"] == 1


def test_train_baseline_registers_a_checked_model(make_settings, tmp_path, capsys, monkeypatch):
    from raytrade.cli import main
    from core.store import BarStore
    from core.synthetic import generate_bars

    settings = make_settings()
    BarStore.from_settings(settings.store).append(generate_bars(["SPY"], 500, seed=9))
    cfg = tmp_path / "raytrade.toml"
    cfg.write_text(f'[store]\nuri = "{settings.store.uri}"\n')
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("cluster.runtime.UP_STATE", tmp_path / "state" / "up.json")
    args = ["--config", str(cfg), "models", "train-baseline", "--symbols", "SPY", "--kind", "mlp", "--epochs", "1"]
    assert main([*args, "--promote"]) == 0
    assert "baseline_mlp v1 is production" in capsys.readouterr().out
    rec = ModelRegistry(settings).get("baseline_mlp", stage="production")
    assert rec["task"] == "classification" and rec["metadata"]["onnx_torch_max_abs_diff"] < 1e-5
    assert rec["metadata"]["training_data"][0]["symbol"] == "SPY" and 0 <= rec["metrics"]["hit_rate"] <= 1
    assert main(["--config", str(cfg), "models", "train-baseline", "--symbols", "NOPE"]) == 2
    assert "no bars for NOPE" in capsys.readouterr().err


def test_import_from_s3(make_settings, s3_server, blobs, capsys):
    import io

    from minio import Minio

    from raytrade.cli.models import read_source

    settings = _s3_settings(make_settings, s3_server, "imports")
    mc = Minio(s3_server["endpoint"].split("://")[1], s3_server["access_key"], s3_server["secret_key"], secure=False)
    mc.put_object("imports", "incoming/mine.onnx", io.BytesIO(blobs[2]), len(blobs[2]))
    assert read_source("s3://imports/incoming/mine.onnx", settings) == blobs[2]
    with pytest.raises(FileNotFoundError, match="NoSuchKey"):
        read_source("s3://imports/incoming/absent.onnx", settings)
