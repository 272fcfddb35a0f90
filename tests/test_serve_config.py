"""The checked-in Serve config agrees with the resource table, field by field."""

from __future__ import annotations

import yaml

from cluster.resources import GiB, MiB, ray_options
from serve.config import CONFIG_PATH, render


def test_checked_in_config_is_the_generated_one():
    assert CONFIG_PATH.read_text() == render("cpu"), "regenerate: python -m serve.config > serve/config.yaml"


def test_every_deployment_carries_all_resource_fields():
    cfg = yaml.safe_load(CONFIG_PATH.read_text())
    (app,) = cfg["applications"]
    assert app["import_path"] == "serve.app:build_app"
    # The default runs the ensemble inside the ingress: one deployment asking for both roles.
    (dep,) = app["deployments"]
    assert dep["name"] == "Ingress"
    got = dep["ray_actor_options"]
    # Serve replaces ray_actor_options whole: a missing num_gpus or memory is a silent drop.
    assert set(got) >= {"num_cpus", "num_gpus", "memory"}
    # ingress 0.1 CPU + 512 MiB, ensemble 0.25 CPU + 2 GiB (cluster/resources.py's cpu profile)
    assert {k: got[k] for k in ("num_cpus", "num_gpus", "memory")} == {"num_cpus": 0.35, "num_gpus": 0.0,
                                                                        "memory": 512 * MiB + 2 * GiB}
    assert cfg["http_options"]["host"] == "127.0.0.1"


def test_ensemble_as_its_own_deployment_keeps_each_roles_resources():
    cfg = yaml.safe_load(render("cpu", "deployment"))
    roles = {"Ingress": "ingress", "Ensemble": "ensemble"}
    deps = cfg["applications"][0]["deployments"]
    assert sorted(d["name"] for d in deps) == ["Ensemble", "Ingress"]
    for dep in deps:
        want = ray_options(roles[dep["name"]], "cpu")
        got = dep["ray_actor_options"]
        assert {k: got[k] for k in ("num_cpus", "num_gpus", "memory")} == {k: want[k] for k in ("num_cpus", "num_gpus", "memory")}


def test_gpu_profile_config_keeps_the_gpu():
    ens = ray_options("ensemble", "gpu")["num_gpus"]
    assert ens > 0
    (ing,) = yaml.safe_load(render("gpu"))["applications"][0]["deployments"]
    assert ing["ray_actor_options"]["num_gpus"] == ens + ray_options("ingress", "gpu")["num_gpus"]
    cfg = yaml.safe_load(render("gpu", "deployment"))
    dep = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "Ensemble")
    assert dep["ray_actor_options"]["num_gpus"] == ens
