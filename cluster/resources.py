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
    "workflow",
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
    # One attempt of a scheduled workflow; heavy work it starts (training) asks for its own.
    "workflow": RoleResources(0.1, 0, 256 * MiB),
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


def ray_options(
    role: str,
    profile: str = "cpu",
    overrides: dict[str, dict[str, float]] | None = None,
    cluster_resources: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``ActorClass.options(...)`` / ``ray_actor_options``.

    With ``cluster_resources`` (``ray.cluster_resources()``), the role is also
    pinned by the custom resources in ``PINS`` that the cluster advertises.
    """
    r = resolve(role, profile, overrides)
    if cluster_resources is not None:
        r = pinned(r, role, cluster_resources)
    opts: dict[str, Any] = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus, "memory": r.memory}
    if r.custom:
        opts["resources"] = dict(r.custom)
    return opts


def combined_options(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Several roles' ``ray_actor_options`` held by one actor: CPUs, GPUs and memory add up; a custom
    (pinning) resource is asked for once, at its largest."""
    out: dict[str, Any] = {"num_cpus": 0.0, "num_gpus": 0.0, "memory": 0}
    custom: dict[str, float] = {}
    for o in parts:
        for k in out:
            out[k] += o.get(k) or 0
        for name, amount in (o.get("resources") or {}).items():
            custom[name] = max(custom.get(name, 0.0), amount)  # a pin is a pin, not a bigger share
    out["num_cpus"], out["num_gpus"] = round(out["num_cpus"], 6), round(out["num_gpus"], 6)
    if custom:
        out["resources"] = custom
    return out


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


# -- pinning roles to node types ------------------------------------------------------
# Custom resources a role asks for so that it lands on a node type of
# ray-cluster.yaml: feeds on the nodes near the data, which advertise ``feed``.
# A pin applies only where the cluster advertises the resource, so the embedded
# default (one node, no custom resources) still runs every role.
PINS: dict[str, dict[str, float]] = {
    "feed": {"feed": 0.01},
}


def pinned(r: RoleResources, role: str, cluster_resources: dict[str, float]) -> RoleResources:
    """``r`` plus the role's pins that ``cluster_resources`` advertises."""
    extra = {k: v for k, v in PINS.get(role, {}).items() if cluster_resources.get(k, 0) > 0}
    if not extra:
        return r
    return replace(r, custom=tuple(sorted({**dict(r.custom), **extra}.items())))


# -- GPU memory inside the actor ---------------------------------------------------------
@dataclass(frozen=True)
class GpuMemoryLimits:
    """What a role may use of one GPU, as torch and ONNX Runtime take it.

    ``torch_fraction`` goes to ``torch.cuda.set_per_process_memory_fraction``
    (a fraction of the device's total memory); ``ort_gpu_mem_limit`` is the
    byte cap of ONNX Runtime's CUDA arena. Both are ``None`` for a role with no
    GPU share: it runs on the CPU and must not touch the GPU.
    """

    share: float
    torch_fraction: float | None
    ort_gpu_mem_limit: int | None


def gpu_memory_limits(
    role: str, profile: str, total_gpu_bytes: int, overrides: dict | None = None
) -> GpuMemoryLimits:
    """The role's GPU share (``gpu_share``) as torch's fraction and ORT's byte limit.

    A share above one GPU (a role given two whole GPUs) caps each device at all
    of it; the share is per device because both libraries limit per device.
    """
    if total_gpu_bytes <= 0:
        raise ValueError(f"total_gpu_bytes must be positive, got {total_gpu_bytes}")
    share = gpu_share(role, profile, overrides)
    if share <= 0:
        return GpuMemoryLimits(0.0, None, None)
    per_device = min(share, 1.0)
    return GpuMemoryLimits(share, per_device, int(per_device * total_gpu_bytes))


def limit_torch_gpu_memory(role: str, profile: str, device: int = 0, overrides: dict | None = None) -> GpuMemoryLimits:
    """Cap this process's torch allocations on ``device`` to the role's share.

    Past the cap torch raises ``torch.cuda.OutOfMemoryError`` instead of
    taking memory the other role on the same GPU was promised.
    """
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    limits = gpu_memory_limits(role, profile, total, overrides)
    if limits.torch_fraction is not None:
        torch.cuda.set_per_process_memory_fraction(limits.torch_fraction, device)
    return limits


def ort_cuda_providers(
    role: str, profile: str, total_gpu_bytes: int, device_id: int = 0, overrides: dict | None = None
) -> list[Any]:
    """ONNX Runtime's ``providers`` for the role: CUDA capped to its share, then CPU.

    ``kSameAsRequested`` keeps the arena from doubling past the cap.
    """
    limits = gpu_memory_limits(role, profile, total_gpu_bytes, overrides)
    if limits.ort_gpu_mem_limit is None:
        return ["CPUExecutionProvider"]
    cuda = {
        "device_id": device_id,
        "gpu_mem_limit": limits.ort_gpu_mem_limit,
        "arena_extend_strategy": "kSameAsRequested",
    }
    return [("CUDAExecutionProvider", cuda), "CPUExecutionProvider"]
