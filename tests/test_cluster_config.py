"""ray-cluster.yaml: Ray's own validation accepts it, and raytrade fits the nodes it describes.

`ray up` runs ``prepare_config`` (defaults for the provider, merged setup
commands) and then ``validate_config`` (Ray's JSON schema and its cross-field
rules); both run here offline. What `ray up` does after that talks to AWS and is
not tested here.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from cluster.resources import GiB, PINS, ROLES, RoleResources, fits, pinned, table

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "ray-cluster.yaml"

# What the instance types really have (AWS's published sizes), so that a node type
# cannot advertise more than its machine: vCPU, memory GiB, GPUs.
INSTANCE_SPECS = {
    "m6i.2xlarge": (8, 32, 0),
    "c6i.4xlarge": (16, 32, 0),
    "g5.2xlarge": (8, 32, 1),
}

# Where each role is meant to run. Roles pinned by a custom resource or a GPU must
# land only on those node types; the rest may go anywhere.
MEANT_FOR = {
    "feed": {"cpu_worker"},
    "ensemble": {"gpu_worker"},
    "learner": {"gpu_worker"},
}

# The long-lived system, one actor each (three feeds: replay, synthetic, Alpaca;
# two ingress replicas), in the GPU profile: it must fit the cluster at its minimum size.
SYSTEM = ["feed", "feed", "feed", "feed_router", "registry", "ensemble", "learner",
          "ingress", "ingress", "risk", "broker", "scheduler"]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CONFIG.read_text())


@pytest.fixture(scope="module")
def node_types(raw) -> dict[str, dict[str, float]]:
    return {name: {k: float(v) for k, v in t["resources"].items()} for name, t in raw["available_node_types"].items()}


def _cluster_resources(node_types: dict[str, dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for res in node_types.values():
        for k, v in res.items():
            out[k] = out.get(k, 0) + v
    return out


def test_rays_own_validation_accepts_the_file(raw):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    # Our setup reached every node: prepare_config merges setup_commands into both lists.
    install = [c for c in prepared["worker_setup_commands"] if "constraints.txt" in c and "-e ~/raytrade" in c]
    assert install and install[0] in prepared["head_setup_commands"]
    assert prepared["head_node_type"] == "head"


def test_validation_would_catch_a_broken_file(raw):
    """The check above can fail: Ray rejects a fractional resource and a missing head type."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))


def test_node_types_advertise_no_more_than_their_machines(raw):
    for name, t in raw["available_node_types"].items():
        res = t["resources"]
        vcpu, mem_gib, gpus = INSTANCE_SPECS[t["node_config"]["InstanceType"]]
        assert {"CPU", "memory"} <= set(res), f"{name} must state CPU and memory, not leave Ray to guess"
        assert res["CPU"] <= vcpu, f"{name} advertises {res['CPU']} CPUs on a {vcpu}-vCPU machine"
        assert res.get("GPU", 0) == gpus, f"{name}: GPU {res.get('GPU', 0)} but the machine has {gpus}"
        # Ray's own processes and the object store need memory too: at most 80 % is offered.
        assert res["memory"] <= 0.8 * mem_gib * GiB, f"{name} offers {res['memory'] / GiB:.0f} of {mem_gib} GiB"


def test_every_role_fits_the_node_type_meant_for_it(node_types):
    cluster = _cluster_resources(node_types)
    for profile in ("cpu", "gpu"):
        for role, r in table(profile).items():
            r = pinned(r, role, cluster)
            homes = {name for name, res in node_types.items() if fits(r, res)}
            assert homes, f"{profile}: {role} {r} fits no node type"
            if profile == "gpu" and role in MEANT_FOR:
                assert homes == MEANT_FOR[role], f"{role} would land on {homes}, meant for {MEANT_FOR[role]}"
    # Pins in the table match resources the file advertises; a pin no node offers would hang the role.
    for role, pins in PINS.items():
        for k in pins:
            assert cluster.get(k, 0) > 0, f"{role} is pinned to {k!r} but no node type advertises it"


def test_the_whole_system_fits_the_minimum_cluster(raw, node_types):
    """First-fit-decreasing placement of the long-lived roles on head + min_workers."""
    cluster = _cluster_resources(node_types)
    free: list[tuple[str, dict[str, float]]] = [("head", dict(node_types["head"]))]
    for name, t in raw["available_node_types"].items():
        if name != raw["head_node_type"]:
            free += [(name, dict(node_types[name])) for _ in range(t.get("min_workers", 0))]
    gpu = table("gpu")
    demands = sorted(((role, pinned(gpu[role], role, cluster)) for role in SYSTEM),
                     key=lambda x: (-x[1].num_gpus, -len(x[1].custom), -x[1].num_cpus))
    placed: dict[str, list[str]] = {}
    for role, r in demands:
        for name, res in free:
            if fits(r, res):
                res["CPU"] -= r.num_cpus
                res["GPU"] = res.get("GPU", 0) - r.num_gpus
                res["memory"] -= r.memory
                for k, v in r.custom:
                    res[k] -= v
                placed.setdefault(role, []).append(name)
                break
        else:
            pytest.fail(f"{role} {r} does not fit the minimum cluster; placed so far: {placed}")
    assert set(placed["feed"]) == {"cpu_worker"}
    assert placed["ensemble"] == placed["learner"] == ["gpu_worker"]  # they share the one GPU


def test_fit_check_rejects_a_role_the_nodes_cannot_hold(node_types):
    huge = RoleResources(num_cpus=1, num_gpus=2, memory=GiB)
    assert not any(fits(huge, res) for res in node_types.values())
    # Without the `feed` resource a node cannot hold a pinned feed.
    feed = pinned(table("cpu")["feed"], "feed", {"feed": 1})
    assert not fits(feed, node_types["gpu_worker"]) and fits(feed, node_types["cpu_worker"])


def test_setup_installs_the_pinned_ray_that_runs_the_tests(raw):
    import ray

    constraints = (ROOT / "constraints.txt").read_text()
    assert re.search(rf"^ray=={re.escape(ray.__version__)}$", constraints, re.M)
    cmds = "\n".join(raw["setup_commands"])
    assert "-c ~/raytrade/constraints.txt" in cmds and f"ray.__version__ == '{ray.__version__}'" in cmds
    mounted = raw["file_mounts"]
    assert mounted == {"/home/ubuntu/raytrade": "."}
    for start in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"]:
        assert "~/raytrade-venv/bin/ray" in start
    assert any("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"])


def test_every_role_is_in_the_table():
    assert set(table("gpu")) == set(ROLES)
