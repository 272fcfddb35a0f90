"""The resource table: profiles, overrides, and fit on the nodes."""

from __future__ import annotations

import pytest

from cluster.resources import (
    CPU_PROFILE, GPU_PROFILE, ROLES, choose_profile, fits, gpu_share, ray_options, table, tune_resources,
)


def test_every_role_in_both_profiles():
    assert set(CPU_PROFILE) == set(GPU_PROFILE) == set(ROLES)
    assert all(r.num_gpus == 0 for r in CPU_PROFILE.values())
    assert GPU_PROFILE["ensemble"].num_gpus > 0 and GPU_PROFILE["learner"].num_gpus > 0


def test_gpu_profile_only_when_cluster_has_gpus():
    assert choose_profile({"CPU": 16.0, "memory": 1e11}) == "cpu"
    assert choose_profile({"CPU": 16.0, "GPU": 0.0}) == "cpu"
    assert choose_profile({"CPU": 16.0, "GPU": 1.0}) == "gpu"
    assert choose_profile({"CPU": 16.0, "GPU": 1.0}, "cpu") == "cpu"  # settings win


def test_roles_sharing_a_gpu_fit_on_one():
    share = gpu_share("ensemble", "gpu") + gpu_share("learner", "gpu")
    assert 0 < share <= 1.0
    assert gpu_share("ensemble", "cpu") == 0


def test_overrides_and_bad_overrides():
    t = table("cpu", {"learner": {"num_cpus": 3, "memory": 2**30}})
    assert t["learner"].num_cpus == 3.0 and t["learner"].memory == 2**30
    with pytest.raises(ValueError, match="unknown role"):
        table("cpu", {"trader": {"num_cpus": 1}})
    with pytest.raises(ValueError, match="only num_cpus, num_gpus, memory"):
        table("cpu", {"feed": {"disk": 1}})


def test_options_shapes():
    assert ray_options("ensemble", "gpu") == {"num_cpus": 1.0, "num_gpus": 0.25, "memory": 4 * 1024**3}
    assert tune_resources()["cpu"] == 1.0


def test_no_role_asks_for_more_than_the_largest_node(ray_session):
    import ray

    from cluster.runtime import current_profile
    from cluster.settings import load_settings

    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    profile = current_profile(load_settings(use_file=False))
    assert profile == ("gpu" if ray.cluster_resources().get("GPU", 0) else "cpu")
    for role, r in table(profile).items():
        assert any(fits(r, node) for node in nodes), f"{role} {r} fits no node"


def test_fit_check_catches_an_oversized_role():
    from cluster.resources import RoleResources

    node = {"CPU": 2.0, "memory": 8 * 1024**3}
    assert fits(RoleResources(1, 0, 1024**3), node)
    assert not fits(RoleResources(1, 0.5, 1024**3), node)
    assert not fits(RoleResources(4, 0, 1024**3), node)
    assert not fits(RoleResources(1, 0, 16 * 1024**3), node)
