"""Every raytrade actor's name, and how to find one.

All of raytrade's actors are named and live in one namespace
(``settings.ray.namespace``), so any process (the CLI, Serve, a Tune driver, a
workflow) finds them by name. This module is the one place those names are
written; code that creates or looks up an actor takes its name from here and
never spells it out.

    feed(source)        feed:<source>       one per market-data source (actors.feeds, actors.alpaca_feed)
    router(group)       router:<group>      the feed router over them ("default")
    risk(account)       risk:<account>      an account's risk manager (actors.risk)
    broker(account)     broker:<account>    an account's broker, paper or Alpaca (actors.broker)
    BAR_PUMP            pump:bars           feeds the router's bars to the paper brokers (actors.accounts)
    REGISTRY            model-registry      the model registry, the only writer of its index
    ENSEMBLE            ensemble            the ensemble actor (outside Serve)
    LEARNER             learner             the CVaR-PPO learner
    SCHEDULER           scheduler           the workflow scheduler (actors.scheduler)
    SERVE_APP           raytrade            the Serve application's name

``lookup(name, settings)`` returns the running actor's handle, or None when
no actor of that name is running. Which resources an actor gets is not here:
that is ``cluster.resources``' table, applied by ``cluster.runtime.actor_options``.
"""

from __future__ import annotations

from typing import Any

from cluster.settings import Settings

DEFAULT_ROUTER_GROUP = "default"
BAR_PUMP = "pump:bars"
REGISTRY = "model-registry"
ENSEMBLE = "ensemble"
LEARNER = "learner"
SCHEDULER = "scheduler"
SERVE_APP = "raytrade"


def feed(source: str) -> str:
    """A feed actor: ``feed("replay")`` is ``feed:replay``."""
    return f"feed:{source}"


def router(group: str = DEFAULT_ROUTER_GROUP) -> str:
    """The feed router of ``group``; the system runs one, ``router:default``."""
    return f"router:{group}"


def risk(account: str) -> str:
    """An account's risk manager, the only way to its broker."""
    return f"risk:{account}"


def broker(account: str) -> str:
    """An account's broker."""
    return f"broker:{account}"


def workflow_task(workflow: str) -> str:
    """The Ray task name of one attempt of a workflow (a task, not an actor: shown by `ray list tasks`)."""
    return f"workflow:{workflow}"


def lookup(name: str, settings: Settings) -> Any | None:
    """The running actor named ``name`` in raytrade's namespace, or None if there is none."""
    # Imported here, not at the top: the CLI imports this module, and `raytrade --help`
    # should not pay for importing Ray (seconds).
    import ray

    try:
        return ray.get_actor(name, namespace=settings.ray.namespace)
    except ValueError:
        return None


def require(name: str, settings: Settings) -> Any:
    """Like ``lookup``, but a missing actor is a ``LookupError`` that says how to start it."""
    handle = lookup(name, settings)
    if handle is None:
        raise LookupError(f"no raytrade actor named {name!r}; is the system up (`raytrade up`)?")
    return handle
