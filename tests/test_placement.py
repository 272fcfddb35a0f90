"""Roles land on the node types meant for them; a role no node can hold is reported, not left hanging.

The multi-node part runs tests/support/placement_cluster.py in its own process: it starts
a three-node Ray cluster on 127.0.0.1 (one node with a GPU count, one with the
``feed`` resource), which cannot share a process with the session's Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.resources import PINS, ray_options, tune_resources

ROOT = Path(__file__).resolve().parent.parent


def test_pins_apply_only_where_the_cluster_advertises_them():
    # The embedded default (one node, no custom resources): a feed asks for nothing it cannot get.
    assert "resources" not in ray_options("feed", "cpu", cluster_resources={"CPU": 4.0, "memory": 8e9})
    assert "resources" not in ray_options("feed", "cpu")
    assert ray_options("feed", "cpu", cluster_resources={"CPU": 16.0, "feed": 2.0})["resources"] == PINS["feed"]
    # Unpinned roles never get custom resources.
    assert "resources" not in ray_options("risk", "gpu", cluster_resources={"CPU": 16.0, "feed": 2.0})
    assert "feed" not in tune_resources()


def test_actor_options_on_the_session_cluster_carry_no_pin(ray_session, make_settings):
    from cluster.runtime import actor_options

    opts = actor_options("feed", make_settings(), "feed:pin-check", detached=False)
    assert "resources" not in opts  # the session's single node advertises no `feed`


@pytest.fixture(scope="module")
def placement(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYTRADE_") and k != "RAY_ADDRESS"}
    # Every node, driver and worker on loopback: Ray's switch for that is named for
    # Windows/macOS, but it is exactly "use 127.0.0.1 as this node's address".
    env.update(PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    store = str(tmp_path_factory.mktemp("placement-store"))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "support" / "placement_cluster.py"), store], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and the Ray nodes it started
        stdout, stderr = proc.communicate()
        pytest.fail(f"the placement cluster did not finish in 240 s: {stderr[-2000:]}")
    print(stderr[-1500:])  # the script's timings, shown with -s or on failure
    lines = [x for x in stdout.splitlines() if x.startswith("PLACEMENT ")]
    assert proc.returncode == 0 and lines, f"rc={proc.returncode}\n{stderr[-3000:]}"
    return json.loads(lines[-1][len("PLACEMENT "):])


@pytest.mark.slow  # tens of seconds on 2 cores: left out of a bare `pytest`, run by `make test`
def test_gpu_roles_land_on_the_gpu_node(placement):
    assert placement["profile"] == "gpu"  # the cluster has a GPU, so the GPU profile is chosen
    for role in ("ensemble", "learner"):
        assert placement["placed"][role]["node"] == "gpu", placement["placed"]
        assert placement["placed"][role]["gpus"] == ["0"]  # both share the one GPU
    assert placement["options"]["ensemble"]["num_gpus"] == 0.25
    assert placement["options"]["learner"]["num_gpus"] == 0.5


def test_feeds_land_on_the_feed_node(placement):
    for name in ("feed:replay", "feed:synthetic"):
        assert placement["placed"][name]["node"] == "feed", placement["placed"]
        assert placement["options"][name]["resources"] == PINS["feed"]
    # Roles without a pin or a GPU ask for neither.
    assert placement["options"]["risk"]["resources"] is None
    assert placement["placed"]["risk"]["gpus"] == []


def test_a_role_no_node_can_hold_is_reported_waiting(placement):
    w = placement["waiting"]
    assert w is not None and w["state"] == "WAITING_FOR_RESOURCES", w
    assert w["waiting_for"].get("GPU") == 2
    assert "learner:too-big" not in placement["alive"]
    assert {"ensemble", "learner", "feed:replay", "feed:synthetic", "risk", "scheduler"} <= set(placement["alive"])
    assert placement["nodes"] == 3


# -- limits that hold inside the actors (Ray's `memory` is only a reservation) ------------------
def test_gpu_memory_limits_follow_the_roles_share():
    from cluster.resources import GiB, gpu_memory_limits

    total = 24 * GiB  # an A10G, the GPU of ray-cluster.yaml's gpu_worker
    ens = gpu_memory_limits("ensemble", "gpu", total)
    learner = gpu_memory_limits("learner", "gpu", total)
    assert (ens.torch_fraction, ens.ort_gpu_mem_limit) == (0.25, 6 * GiB)
    assert (learner.torch_fraction, learner.ort_gpu_mem_limit) == (0.5, 12 * GiB)
    # The two roles that share one GPU are capped to less than all of it between them.
    assert ens.ort_gpu_mem_limit + learner.ort_gpu_mem_limit <= total
    # A CPU role, or the CPU profile, touches no GPU memory at all.
    assert gpu_memory_limits("learner", "cpu", total) == gpu_memory_limits("risk", "gpu", total)
    assert gpu_memory_limits("risk", "gpu", total).torch_fraction is None
    # Settings overrides move the cap with the reservation.
    over = gpu_memory_limits("learner", "gpu", total, {"learner": {"num_gpus": 0.4}})
    assert over.ort_gpu_mem_limit == int(0.4 * total) and over.torch_fraction == 0.4
    assert gpu_memory_limits("learner", "gpu", total, {"learner": {"num_gpus": 2}}).torch_fraction == 1.0
    with pytest.raises(ValueError, match="positive"):
        gpu_memory_limits("learner", "gpu", 0)


def test_ort_providers_carry_the_cap_and_fall_back_to_cpu():
    from cluster.resources import GiB, ort_cuda_providers

    providers = ort_cuda_providers("ensemble", "gpu", 24 * GiB, device_id=0)
    assert providers[-1] == "CPUExecutionProvider"
    name, opts = providers[0]
    assert name == "CUDAExecutionProvider"
    assert opts == {"device_id": 0, "gpu_mem_limit": 6 * GiB, "arena_extend_strategy": "kSameAsRequested"}
    assert ort_cuda_providers("ensemble", "cpu", 24 * GiB) == ["CPUExecutionProvider"]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU on this machine: the in-actor GPU caps are checked on a GPU machine")
def test_two_roles_share_one_gpu_each_inside_its_share():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAYTRADE_")}
    env.update(PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES=env.get("CUDA_VISIBLE_DEVICES", "0"))
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "support" / "gpu_share_probe.py"), role, "3"], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role in ("ensemble", "learner")]
    results = {}
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        r = json.loads(out.strip().splitlines()[-1])
        results[r["role"]] = r
    assert results["ensemble"]["fraction"] == 0.25 and results["learner"]["fraction"] == 0.5
    for r in results.values():
        assert r["over_refused"], f"{r['role']} allocated past its share"
        assert r["max_allocated"] <= r["share_bytes"]


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda(), reason="no CUDA GPU on this machine: ONNX Runtime's CUDA arena cap is checked on a GPU machine")
def test_onnx_runtime_takes_the_cap():
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from cluster.resources import ort_cuda_providers

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
    total = torch.cuda.get_device_properties(0).total_memory
    sess = ort.InferenceSession(model.SerializeToString(), providers=ort_cuda_providers("ensemble", "gpu", total))
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    cap = sess.get_provider_options()["CUDAExecutionProvider"]["gpu_mem_limit"]
    assert int(cap) == int(0.25 * total)
    assert onnx.checker.check_model(model) is None
