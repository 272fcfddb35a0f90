"""Errors a person can act on (issue 18): one line, exit 2, no traceback, no colour codes, one prefix."""

from __future__ import annotations

import json

import pytest

from raytrade.cli import main
from tests.conftest import free_port
from tests.test_cli import run_cli


def _clean_one_line(err: str) -> None:
    assert err.count("\n") == 1, err
    assert err.startswith("raytrade: error: ") and err.count("raytrade: error:") == 1, err
    assert "Traceback" not in err and "\x1b" not in err, err


@pytest.mark.parametrize("verb", [["models", "ls"], ["feeds", "ls"], ["status"], ["workflows", "ls"]])
def test_a_stale_cluster_record_names_the_address_and_the_two_ways_out(verb, tmp_path):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there: the recorded cluster is gone
    state = tmp_path / "state"
    state.mkdir()
    (state / "up.json").write_text(json.dumps({"address": address, "started_head": False, "head_pgid": None}))
    r = run_cli(*verb, env={"RAYTRADE_STATE_DIR": str(state), "RAYTRADE_STORE__URI": str(tmp_path / "store")},
                cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    _clean_one_line(r.stderr)
    assert address in r.stderr and "`raytrade up`" in r.stderr and "remove the record" in r.stderr


def test_an_unknown_argument_has_one_prefix(tmp_path):
    r = run_cli("models", "ls", "--bogus", cwd=tmp_path)
    assert r.returncode == 2
    _clean_one_line(r.stderr)
    assert "unrecognized arguments: --bogus" in r.stderr and "raytrade: error: raytrade" not in r.stderr


def test_an_error_inside_an_actor_reaches_the_cli_as_its_own_message(ray_session, tmp_path, capsys, monkeypatch):
    import ray

    from cluster import names

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "raytrade.toml"
    cfg.write_text(f'[store]\nuri = "{tmp_path / "store"}"\n[ray]\nnamespace = "test-cli-errors"\n')
    try:
        code = main(["--config", str(cfg), "--address", ray_session.address, "models", "promote", "nope", "1"])
        err = capsys.readouterr().err
        assert code == 2
        _clean_one_line(err)
        assert "no model named 'nope'" in err and "RayTaskError" not in err
    finally:
        actor = names.lookup(names.REGISTRY, _settings(cfg))
        if actor is not None:
            ray.kill(actor, no_restart=True)


def _settings(cfg):
    from cluster.settings import load_settings

    return load_settings(str(cfg))


def test_models_gc_lists_then_removes_only_with_yes(make_settings, tmp_path, monkeypatch, capsys):
    from core.baselines import export_onnx, random_model
    from core.features import FEATURE_NAMES
    from core.models.registry import ModelRegistry

    settings = make_settings()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYTRADE_STORE__URI", settings.store.uri)
    monkeypatch.setenv("RAYTRADE_STATE_DIR", str(tmp_path / "no-cluster"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    blob = export_onnx(random_model("mlp", seed=0), 8, len(FEATURE_NAMES))
    ModelRegistry(settings).register("m", blob, "forecasting")
    leftover = tmp_path / "store" / "models" / "m" / "v2" / "model.onnx"  # a writer killed before its record
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(blob)
    assert main(["models", "gc"]) == 0
    out = capsys.readouterr().out
    assert "models/m/v2/model.onnx" in out and "nothing removed" in out and leftover.exists()
    assert main(["models", "gc", "--yes"]) == 0
    assert "removed 1 file(s)" in capsys.readouterr().out and not leftover.exists()
    assert ModelRegistry(settings).load("m", 1) == blob
