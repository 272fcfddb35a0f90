"""The one table of what each raytrade role asks of Ray.

Every actor, Serve deployment and Tune trial takes its ``num_cpus``,
``num_gpus`` and ``memory`` (bytes) from here: actors through
``.options(**ray_options(role))``, Tune trials through
``tune.with_resources(fn, resources(role))`` and Serve deployments through
the Serve config, which is checked against this table. Decorators carry no
numbers.

Two profiles: ``cpu`` for clusters without GPUs and ``gpu`` for clusters with
them. ``profile="auto"`` picks ``gpu`` only when the cluster advertises a GPU,
so a GPU role never waits for a resource that is not there. Settings can
override any number per role (``ray.resource_overrides``).

``memory`` is a scheduling reservation in Ray, not a cap; the actors that hold
models enforce their own budgets (the model cache, torch's memory fraction,
ONNX Runtime's ``gpu_mem_limit``) from ``gpu_share`` and ``memory_budget``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

MiB = 1024**2
GiB = 1024**3

ROLES = (
    "feed",
    "feed_router",
    "registry",
    "ensemble",
    "learner",
    "ingress",
    "risk",
    "broker",
    "scheduler",
    "backtest_trial",
)


@dataclass(frozen=True)
class RoleResources:
    num_cpus: float
    num_gpus: float
    memory: int  # bytes
    # Custom resources that pin a role to a node type (``{"feed": 0.01}``).
    custom: tuple[tuple[str, float], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["custom"] = dict(self.custom)
        return d


# Long-lived roles ask for fractions of a CPU: they mostly wait on I/O, and the
# whole system must be schedulable on a 2-core laptop. Work that burns CPU
# (training, backtest trials) asks for whole cores.
CPU_PROFILE: dict[str, RoleResources] = {
    "feed": RoleResources(0.05, 0, 256 * MiB),
    "feed_router": RoleResources(0.1, 0, 512 * MiB),
    "registry": RoleResources(0.05, 0, 256 * MiB),
    "ensemble": RoleResources(0.25, 0, 2 * GiB),
    "learner": RoleResources(1.0, 0, 3 * GiB),
    "ingress": RoleResources(0.1, 0, 512 * MiB),
    "risk": RoleResources(0.05, 0, 256 * MiB),
    "broker": RoleResources(0.05, 0, 256 * MiB),
    "scheduler": RoleResources(0.05, 0, 256 * MiB),
    "backtest_trial": RoleResources(1.0, 0, 1 * GiB),
}

GPU_PROFILE: dict[str, RoleResources] = {
    **CPU_PROFILE,
    # Two roles share one GPU: the ensemble's inference and the learner's training.
    "ensemble": RoleResources(1.0, 0.25, 4 * GiB),
    "learner": RoleResources(2.0, 0.5, 8 * GiB),
}

PROFILES = {"cpu": CPU_PROFILE, "gpu": GPU_PROFILE}


def choose_profile(cluster_resources: dict[str, float], requested: str = "auto") -> str:
    """``gpu`` only when asked for it or when the cluster has a GPU."""
    if requested in ("cpu", "gpu"):
        return requested
    return "gpu" if cluster_resources.get("GPU", 0) > 0 else "cpu"


def table(profile: str, overrides: dict[str, dict[str, float]] | None = None) -> dict[str, RoleResources]:
    base = dict(PROFILES[profile])
    for role, fields in (overrides or {}).items():
        if role not in base:
            raise ValueError(f"resource override for unknown role {role!r}; roles are {', '.join(ROLES)}")
        kw: dict[str, Any] = {}
        for k, v in fields.items():
            if k not in ("num_cpus", "num_gpus", "memory"):
                raise ValueError(f"resource override {role}.{k}: only num_cpus, num_gpus, memory can be set")
            kw[k] = int(v) if k == "memory" else float(v)
        base[role] = replace(base[role], **kw)
    return base


def resolve(role: str, profile: str = "cpu", overrides: dict[str, dict[str, float]] | None = None) -> RoleResources:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    return table(profile, overrides)[role]


def ray_options(role: str, profile: str = "cpu", overrides: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``ActorClass.options(...)`` / ``ray_actor_options``."""
    r = resolve(role, profile, overrides)
    opts: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "memory": r.memory}
    if r.custom:
        opts["resources"] = dict(r.custom)
    return opts


def tune_resources(role: str = "backtest_trial", profile: str = "cpu", overrides: dict | None = None) -> dict[str, float]:
    """The dict ``tune.with_resources`` takes."""
    r = resolve(role, profile, overrides)
    out: dict[str, float] = {"cpu": r.num_cpus, "gpu": r.num_gpus, "memory": r.memory}
    out.update(dict(r.custom))
    return out


def gpu_share(role: str, profile: str, overrides: dict | None = None) -> float:
    """Fraction of one GPU the role may use (torch memory fraction, ORT gpu_mem_limit)."""
    return float(resolve(role, profile, overrides).num_gpus)


def fits(r: RoleResources, node: dict[str, float]) -> bool:
    """Whether one node's total resources can hold the role."""
    if r.num_cpus > node.get("CPU", 0) or r.num_gpus > node.get("GPU", 0) or r.memory > node.get("memory", 0):
        return False
    return all(node.get(k, 0) >= v for k, v in r.custom)
