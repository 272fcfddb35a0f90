"""Start a Ray cluster of three nodes on 127.0.0.1, place raytrade's roles, print where they landed.

Run by tests/test_placement.py in its own process (one Ray per process: the test
session already has one). Nodes:

* head: 2 CPUs, 4 GiB, nothing else;
* gpu:  4 CPUs, 1 GPU (a count Ray schedules by; no CUDA code runs), 16 GiB;
* feed: 2 CPUs, 4 GiB and the ``feed`` custom resource, like ray-cluster.yaml's cpu_worker.

A feed could fit on any of the three, so landing on the feed node is the pin's doing.

Each role gets a stand-in actor with exactly the options ``cluster.runtime.actor_options``
gives the real one; the actor reports its node. Then a role no node can hold
(the learner asking for two GPUs) must show in ``cluster.runtime.status`` as
waiting for resources, with what it asked for. Prints one JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time

import ray
import ray._common.utils
import ray._private.utils
from ray.cluster_utils import Cluster

GiB = 1024**3


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    # A test cluster must not become "the" local cluster of this shared machine:
    # Cluster() would write (and on shutdown delete) /tmp/ray/ray_current_cluster,
    # which every `ray.init()` on the machine reads.
    ray._private.utils.write_ray_address = lambda *a, **k: None
    ray._common.utils.reset_ray_address = lambda *a, **k: None

    t0 = time.time()
    lap = lambda what: print(f"[{time.time() - t0:6.1f}s] {what}", file=sys.stderr, flush=True)  # noqa: E731
    from cluster.runtime import actor_options, current_profile, status
    from cluster.settings import load_settings

    store = sys.argv[1]
    small = {"object_store_memory": 80 * 1024**2, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "memory": 4 * GiB, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": free_port(),
        "resources": {"node_head": 1}, **small})
    out: dict = {}
    try:
        nodes = {
            "gpu": cluster.add_node(num_cpus=4, num_gpus=1, memory=16 * GiB, resources={"node_gpu": 1}, **small),
            "feed": cluster.add_node(num_cpus=2, memory=4 * GiB, resources={"feed": 1, "node_feed": 1}, **small),
        }
        lap("nodes up")
        ray.init(address=cluster.address, namespace="raytrade", log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
        names = {cluster.head_node.node_id: "head", **{n.node_id: k for k, n in nodes.items()}}
        settings = load_settings(use_file=False, store={"uri": store},
                                 ray={"resource_overrides": {}})
        out["profile"] = current_profile(settings)

        @ray.remote
        class StandIn:
            def where(self) -> dict:
                ctx = ray.get_runtime_context()
                return {"node": ctx.get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

        roles = [("feed", "feed:replay"), ("feed", "feed:synthetic"), ("ensemble", "ensemble"),
                 ("learner", "learner"), ("risk", "risk"), ("scheduler", "scheduler")]
        actors, options = {}, {}
        for role, name in roles:
            opts = actor_options(role, settings, name, detached=False)
            options[name] = {k: opts.get(k) for k in ("num_cpus", "num_gpus", "memory", "resources")}
            actors[name] = StandIn.options(**opts).remote()
        placed = {name: ray.get(a.where.remote(), timeout=120) for name, a in actors.items()}
        lap("stand-ins placed")
        out["placed"] = {name: {"node": names.get(p["node"], p["node"]), "gpus": p["gpus"]} for name, p in placed.items()}
        out["options"] = options

        # No node has two GPUs: this learner can never start, and must be reported, not hang.
        too_big = settings.model_copy(update={"ray": settings.ray.model_copy(
            update={"resource_overrides": {"learner": {"num_gpus": 2}}})})
        # Kept referenced: a non-detached actor whose handle is dropped is gone, not waiting.
        actors["learner:too-big"] = StandIn.options(
            **actor_options("learner", too_big, "learner:too-big", detached=False)).remote()
        deadline = time.time() + 60
        waiting = None
        while time.time() < deadline:
            st = status(settings)
            by_name = {a["name"]: a for a in st["actors"]}
            waiting = by_name.get("learner:too-big")
            if waiting and waiting["state"] == "WAITING_FOR_RESOURCES":
                break
            time.sleep(0.5)
        lap("waiting reported")
        out["waiting"] = waiting
        out["alive"] = sorted(a["name"] for a in st["actors"] if a["state"] == "ALIVE")
        out["nodes"] = len([n for n in st["nodes"] if n["alive"]])
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("PLACEMENT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
