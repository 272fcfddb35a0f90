"""Connecting to Ray, or starting it, and the options raytrade's actors are created with.

``connect(settings)`` joins the cluster named by ``RAY_ADDRESS`` (or
``ray.address`` in settings, or the one ``raytrade up`` recorded), and
otherwise starts a local Ray on this machine: the embedded default. All of
raytrade's actors are named and live in one namespace (``ray.namespace``,
default ``raytrade``), so any process (the CLI, Serve, a Tune driver) finds
them by name: ``cluster.names`` holds every name and ``lookup``.

``status()`` is the one health view of the cluster: nodes and resources, and
each raytrade actor with its state, including actors that are waiting for
resources no node has (reported with what they asked for, not left hanging).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.logs import configure_logging, get_logger, ray_logging_config
from cluster.resources import choose_profile, ray_options
from cluster.settings import Settings

log = get_logger("runtime")

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("RAYTRADE_STATE_DIR", ".raytrade"))
UP_STATE = STATE_DIR / "up.json"


class ClusterUnavailable(RuntimeError):
    """No Ray cluster could be reached where one was expected (the CLI exits ``exit_code``)."""

    exit_code = 1


class StaleClusterRecord(ClusterUnavailable):
    """``raytrade up`` recorded a cluster that is gone: the user's to fix, in one of two ways."""

    exit_code = 2


@dataclass
class RuntimeInfo:
    address: str
    started_locally: bool
    dashboard_url: str | None
    namespace: str
    profile: str


def _target_address(settings: Settings) -> str | None:
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return env
    if settings.ray.address:
        return settings.ray.address
    return None


def serve_recovery_env(settings: Settings) -> dict[str, str]:
    """Serve's proxy health check every 2 s instead of 10 s, for a Ray that raytrade starts.

    Serve's controller replaces a proxy after three failed checks; at Serve's default period
    a SIGKILLed proxy left the HTTP port refusing connections for about 30 s. An operator's own
    value wins.

    Not in HAProxy mode: its proxy (HAProxyManager) can take longer than three 2 s checks to
    start on a loaded 2-core machine, and the controller then killed it (seen in CI): there
    Serve's own 10 s, even over a 2 s inherited from a process that started a Ray of its own.
    """
    key = "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S"
    if settings.serve.proxy == "haproxy":
        return {key: "10"}
    return {} if key in os.environ else {key: "2"}


def serve_proxy_env(settings: Settings) -> dict[str, str]:
    """Environment a Ray that raytrade starts (``connect``'s local Ray, ``start_head``) needs for ``serve.proxy``.

    Serve reads it at import, in every process of that Ray.

    ``"haproxy"``: Serve's HAProxy mode, which implies direct ingress (each
    ingress replica serves HTTP on a port of its own and HAProxy, on the
    HTTP port, forwards to them). Refused with what to do when there is no
    haproxy binary, rather than left to fail inside Serve's controller.
    """
    if settings.serve.proxy != "haproxy":
        return {}
    import shutil

    binary = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy")
    if not binary:
        raise ClusterUnavailable(
            "serve.proxy is 'haproxy' but no haproxy binary is on PATH: install it (apt-get install haproxy), "
            "set RAY_SERVE_HAPROXY_BINARY_PATH, or set serve.proxy to 'serve'"
        )
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": binary,
            # A stopping replica keeps its own port open this long so a load balancer can notice
            # (Serve's default: 30 s); HAProxy here is Serve's own and is told at once.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S":
                os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "2")}


def token_auth_env() -> dict[str, str]:
    """Environment for a Ray that raytrade starts: Ray's token authentication on, with a token on disk.

    Ray 2.60 turns token auth on for ``ray.init()``'s own local cluster, but ``ray start --head``
    only when a token already exists, so a fresh machine's head would take any client. Every
    client of the cluster (``raytrade`` commands, workers joining) reads the same token from
    ``~/.ray/auth_token`` (or ``RAY_AUTH_TOKEN``). ``RAY_AUTH_MODE`` set by the operator wins.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return {}
    try:  # Ray's own token file writer (private API of Ray 2.60, hence the guard)
        from ray._private.authentication.authentication_token_setup import generate_and_save_token
    except ImportError:  # pragma: no cover - a Ray without token auth
        return {}
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or (
        Path.home() / ".ray" / "auth_token").exists()
    if not has_token:
        generate_and_save_token()
    return {"RAY_AUTH_MODE": "token"}


def _enable_token_auth_here() -> None:
    """Token auth for this process too: Ray's C++ config caches the mode it read first."""
    env = token_auth_env()
    if env:
        os.environ.update(env)
        try:
            from ray._raylet import Config

            Config.initialize("")
        except ImportError:  # pragma: no cover - other Ray versions
            pass


def connect(settings: Settings, *, start_local: bool = True, num_cpus: int | None = None,
            use_record: bool = True) -> RuntimeInfo:
    """Join the running cluster, or start a local Ray when there is none; once per process.

    The cluster to join, first found: ``RAY_ADDRESS``, ``ray.address`` (the CLI's
    ``--address`` sets it), the one ``raytrade up`` recorded (``use_record``; ``up``
    itself does not). A recorded cluster that is gone is ``StaleClusterRecord``,
    never a silent second Ray. With none of them, ``start_local`` starts a Ray of
    this process's own (``RuntimeInfo.started_locally`` says so); otherwise Ray's
    ``"auto"`` looks for one on this machine.
    """
    import ray

    configure_logging(settings)
    ns = settings.ray.namespace
    if ray.is_initialized():
        ctx = ray.get_runtime_context()
        return RuntimeInfo(ctx.gcs_address, False, _dashboard_url(), ctx.namespace, current_profile(settings))

    address = _target_address(settings)
    if address is None and use_record:
        address = _recorded_address()
        if address is not None:
            _check_recorded(address)
    if address is None and not start_local:
        address = "auto"
    # Workers import our packages by name; the repo root goes on their path.
    # On a remote cluster every node has raytrade installed (ray-cluster.yaml),
    # and the working_dir ships this checkout's code so driver and actors agree.
    runtime_env: dict[str, Any] = {"env_vars": {"PYTHONPATH": str(REPO_ROOT), "RAY_DEDUP_LOGS": "1"}}
    if address not in (None, "auto") and not address.startswith("ray://"):
        _check_reachable(address)
        # ray.init enables token auth (when a token exists) for "auto" but not for
        # an explicit address; do what it does for "auto". Private API of Ray 2.60,
        # hence the guard: without it a cluster using token auth refuses us.
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )

            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        except ImportError:  # pragma: no cover - other Ray versions
            pass
    try:
        if address is not None:
            if address.startswith("ray://") or (address != "auto" and not _is_local_address(address)):
                runtime_env = {
                    "working_dir": str(REPO_ROOT),
                    "excludes": [".venv", ".git", "data", "var", "reports", ".raytrade", "**/__pycache__"],
                }
            ray.init(
                address=address,
                namespace=ns,
                runtime_env=runtime_env,
                logging_config=ray_logging_config(settings),
                log_to_driver=False,
            )
            started = False
        else:
            # "local": a new Ray of our own. Without it ray.init() joins whatever
            # cluster /tmp/ray/ray_current_cluster names (any `ray start` on this
            # machine) and then refuses num_cpus.
            # The local raylet, and so Serve's controller and replicas, inherit this environment.
            os.environ.update(serve_proxy_env(settings))
            os.environ.update(serve_recovery_env(settings))
            _enable_token_auth_here()
            ray.init(
                address="local",
                namespace=ns,
                num_cpus=num_cpus or settings.ray.num_cpus or max(2, os.cpu_count() or 2),
                include_dashboard=settings.ray.include_dashboard,
                dashboard_host="127.0.0.1",
                runtime_env=runtime_env,
                logging_config=ray_logging_config(settings),
                log_to_driver=False,
            )
            started = True
    except ConnectionError as e:
        raise ClusterUnavailable(
            f"no Ray cluster at {address}: {e}. Start one with `raytrade up` or `ray up ray-cluster.yaml`"
        ) from None
    ctx = ray.get_runtime_context()
    return RuntimeInfo(ctx.gcs_address, started, _dashboard_url(), ns, current_profile(settings))


def _check_recorded(address: str) -> None:
    try:
        _check_reachable(address)
    except ClusterUnavailable:
        raise StaleClusterRecord(
            f"the cluster `raytrade up` recorded at {address} ({UP_STATE}) is not reachable: start it again "
            f"with `raytrade up`, or remove the record (`raytrade down`, or delete {UP_STATE})"
        ) from None


def _check_reachable(address: str, timeout_s: float = 3.0) -> None:
    """Fail in seconds, not minutes, when nothing listens at the GCS address."""
    import socket

    host, _, port = address.split("://")[-1].rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return
    except (OSError, ValueError) as e:
        raise ClusterUnavailable(
            f"no Ray cluster at {address} ({e.__class__.__name__}). Start one with `raytrade up` or `ray up ray-cluster.yaml`"
        ) from None


def _is_local_address(address: str) -> bool:
    host = address.split("://")[-1].split(":")[0]
    return host in ("127.0.0.1", "localhost", "") or host == _this_host_ip()


def _this_host_ip() -> str:
    try:
        import ray._private.services as services

        return services.get_node_ip_address()
    except Exception:  # noqa: BLE001
        return "127.0.0.1"


def _dashboard_url() -> str | None:
    try:
        import ray

        ctx = ray.get_runtime_context()
        url = ctx.dashboard_url if hasattr(ctx, "dashboard_url") else None
        if not url:
            from ray._private.worker import global_worker

            url = global_worker.node.address_info.get("webui_url") if global_worker.node else None
        return f"http://{url}" if url and not url.startswith("http") else url
    except Exception:  # noqa: BLE001
        return None


def current_profile(settings: Settings) -> str:
    import ray

    if not ray.is_initialized():
        return choose_profile({}, settings.ray.profile)
    return choose_profile(ray.cluster_resources(), settings.ray.profile)


def actor_options(role: str, settings: Settings, name: str, *, detached: bool = True, **extra: Any) -> dict[str, Any]:
    """Options for a named raytrade actor of ``role``: resources from the table, restarts on."""
    import ray

    # The cluster's resources decide the profile and which pins (``feed``) apply.
    opts = ray_options(
        role, current_profile(settings), settings.ray.resource_overrides,
        cluster_resources=ray.cluster_resources() if ray.is_initialized() else None,
    )
    opts.update(
        name=name,
        namespace=settings.ray.namespace,
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=3,
    )
    if detached:
        opts["lifetime"] = "detached"
    opts.update(extra)
    return opts


# -- `up` bookkeeping -------------------------------------------------------------
def record_up(address: str, started_head: bool, head_pgid: int | None = None) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    UP_STATE.write_text(json.dumps({"address": address, "started_head": started_head, "head_pgid": head_pgid,
                                    "pid": os.getpid(), "at": time.time()}))


def _recorded_address() -> str | None:
    try:
        return json.loads(UP_STATE.read_text())["address"]
    except (OSError, ValueError, KeyError):
        return None


def recorded_up() -> dict[str, Any] | None:
    try:
        return json.loads(UP_STATE.read_text())
    except (OSError, ValueError):
        return None


def forget_up() -> None:
    """What ``record_up`` wrote is over (``raytrade down``, or the end of a foreground ``up``)."""
    UP_STATE.unlink(missing_ok=True)


def start_head(settings: Settings, timeout_s: float = 120.0) -> tuple[str, int]:
    """Start a local Ray head that outlives this process (``ray start --head --block``).

    It runs in its own process group, recorded by ``record_up``, so ``raytrade
    down`` stops exactly this head and never another Ray on the machine.
    Returns the GCS address and the process group id.
    """
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [
        ray_bin, "start", "--head", "--block", f"--port={port}", "--dashboard-host=127.0.0.1",
        f"--num-cpus={settings.ray.num_cpus or max(2, os.cpu_count() or 2)}", "--disable-usage-stats",
    ]
    if not settings.ray.include_dashboard:
        cmd.append("--include-dashboard=false")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), **serve_proxy_env(settings), **token_auth_env(),
               **serve_recovery_env(settings))
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    log_file = open(STATE_DIR / "head.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"{_this_host_ip()}:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = (STATE_DIR / "head.log").read_text(errors="replace").strip().splitlines()[-1:]
            raise ClusterUnavailable(f"`ray start --head` exited: {tail}")
        # The port opens before the node has registered; `ray start` says when it is ready.
        if "Ray runtime started" in (STATE_DIR / "head.log").read_text(errors="replace"):
            break
        time.sleep(0.5)
    else:
        stop_head(proc.pid)
        raise ClusterUnavailable(f"the local Ray head did not come up within {timeout_s:.0f}s; see {STATE_DIR / 'head.log'}")
    return address, proc.pid


def stop_head(pgid: int, timeout_s: float = 30.0) -> None:
    """Stop the head started by ``start_head`` (its whole process group)."""
    import signal

    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + wait
        while time.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


# -- status -------------------------------------------------------------------------
def status(settings: Settings) -> dict[str, Any]:
    """Nodes, resources and raytrade's actors with their states."""
    import ray

    nodes = []
    for n in ray.nodes():
        nodes.append(
            {
                "node_id": n["NodeID"][:12],
                "address": n.get("NodeManagerAddress"),
                "alive": n.get("Alive", False),
                "resources": {k: v for k, v in n.get("Resources", {}).items() if not k.startswith("node:")},
            }
        )
    actors = _actor_states(settings)
    return {
        "namespace": settings.ray.namespace,
        "profile": current_profile(settings),
        "cluster_resources": ray.cluster_resources(),
        "available_resources": ray.available_resources(),
        "nodes": nodes,
        "actors": actors,
    }


def _actor_states(settings: Settings) -> list[dict[str, Any]]:
    import ray

    ns = settings.ray.namespace
    out: list[dict[str, Any]] = []
    try:
        from ray.util.state import list_actors

        # The address is explicit: with several Ray instances on one machine the
        # state API's "auto" cannot tell which one this process is connected to.
        address = ray.get_runtime_context().gcs_address
        for a in list_actors(address=address, filters=[("ray_namespace", "=", ns)], detail=True, limit=1000,
                             raise_on_missing_output=False):
            d = a if isinstance(a, dict) else a.__dict__
            if not d.get("name"):
                continue
            state = d.get("state")
            entry = {"name": d.get("name"), "class": d.get("class_name"), "state": state, "pid": d.get("pid")}
            if state in ("PENDING_CREATION", "DEPENDENCIES_UNREADY"):
                entry["waiting_for"] = d.get("required_resources") or {}
                entry["state"] = "WAITING_FOR_RESOURCES"
            out.append(entry)
        return sorted(out, key=lambda e: (e["name"], e["state"] != "ALIVE"))
    except Exception as e:  # noqa: BLE001 - no dashboard: fall back to names only
        log.debug("state API unavailable: %s", e)
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") == ns:
            out.append({"name": entry["name"], "class": None, "state": "UNKNOWN (no dashboard)"})
    return out
