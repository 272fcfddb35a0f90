"""The checked-in Serve config agrees with the resource table, field by field."""

from __future__ import annotations

import yaml

from cluster.resources import ray_options
from serve.config import CONFIG_PATH, render


def test_checked_in_config_is_the_generated_one():
    assert CONFIG_PATH.read_text() == render("cpu"), "regenerate: python -m serve.config > serve/config.yaml"


def test_every_deployment_carries_all_resource_fields():
    cfg = yaml.safe_load(CONFIG_PATH.read_text())
    (app,) = cfg["applications"]
    assert app["import_path"] == "serve.app:build_app"
    roles = {"Ingress": "ingress", "Ensemble": "ensemble"}
    for dep in app["deployments"]:
        want = ray_options(roles[dep["name"]], "cpu")
        got = dep["ray_actor_options"]
        # Serve replaces ray_actor_options whole: a missing num_gpus or memory is a silent drop.
        assert set(got) >= {"num_cpus", "num_gpus", "memory"}
        assert {k: got[k] for k in ("num_cpus", "num_gpus", "memory")} == {k: want[k] for k in ("num_cpus", "num_gpus", "memory")}
    assert cfg["http_options"]["host"] == "127.0.0.1"


def test_gpu_profile_config_keeps_the_gpu():
    cfg = yaml.safe_load(render("gpu"))
    ens = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "Ensemble")
    assert ens["ray_actor_options"]["num_gpus"] == ray_options("ensemble", "gpu")["num_gpus"] > 0
