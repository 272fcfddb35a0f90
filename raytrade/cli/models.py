"""``raytrade models ls|show|promote|rollback|import|train-baseline``: the model registry from the command line.

When a raytrade cluster is up (``--address``, ``RAY_ADDRESS``, ``ray.address``
or the one ``raytrade up`` recorded), every command goes through the running
registry actor, and the ensemble follows a promotion within
``ensemble.reload_poll_s``. With no cluster, the commands open the registry in
this process on the store. Either way every index write is a compare-and-swap
(``core.models.registry``), so a writer beside the running system loses nothing
and is seen by it at once. ``gc`` lists (and, confirmed, removes) a crashed
writer's leftovers.

Ray, the store, ONNX Runtime and torch are imported inside the functions that
run the verb: `raytrade --help` does not pay for them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from typing import Any
from urllib.parse import urlparse

from cluster.runtime import connect, recorded_up
from cluster.settings import Settings
from core.models.errors import RegistryError
from raytrade.cli.errors import ArgParser, UserError


def add_parser(sub: Any) -> None:
    m = sub.add_parser("models", help="the model registry: versions, stages, metrics")
    ms = m.add_subparsers(dest="models_cmd", metavar="ACTION", parser_class=ArgParser)
    ls = ms.add_parser("ls", help="models and their versions")
    ls.add_argument("name", nargs="?")
    ls.add_argument("--json", action="store_true")
    show = ms.add_parser("show", help="one version's record and tracked metrics")
    show.add_argument("name")
    show.add_argument("--version", type=int, default=None, help="default: production, else the latest")
    pr = ms.add_parser("promote", help="make a version production (the ensemble follows)")
    pr.add_argument("name")
    pr.add_argument("version", type=int)
    rb = ms.add_parser("rollback", help="put back the previous production version")
    rb.add_argument("name")
    imp = ms.add_parser("import", help="register your own ONNX file (local path or s3://bucket/key)")
    imp.add_argument("source")
    imp.add_argument("--name", required=True)
    imp.add_argument("--task", default="forecasting")
    imp.add_argument("--tag", action="append", default=[])
    imp.add_argument("--promote", action="store_true", help="make it production at once")
    gc = ms.add_parser("gc", help="list files under models/ that no version owns (a writer's crash leftovers); "
                                  "remove them with confirmation")
    gc.add_argument("--yes", action="store_true", help="remove without asking")
    tb = ms.add_parser("train-baseline", help="train the MLP/LSTM baselines on the store's history and register them")
    tb.add_argument("--symbols", nargs="+", default=None, help="default: feeds.symbols")
    tb.add_argument("--kind", choices=["mlp", "lstm", "both"], default="both")
    tb.add_argument("--epochs", type=int, default=5)
    tb.add_argument("--max-samples", type=int, default=200_000)
    tb.add_argument("--promote", action="store_true", help="make the new versions production")


class _Remote:
    """A registry actor handle that reads like the class (blocking calls, the class's own errors)."""

    def __init__(self, handle: Any):
        self._h = handle

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._h, name)
        return lambda *a, **k: _call_actor(method, *a, **k)


def _call_actor(method: Any, *args: Any, **kwargs: Any) -> Any:
    import ray  # only with a cluster up, when the verb runs

    try:
        return ray.get(method.remote(*args, **kwargs), timeout=300)
    except ray.exceptions.RayTaskError as e:
        # The registry's own refusal, without the remote traceback Ray wraps around it.
        if isinstance(e.cause, RegistryError):
            raise e.cause from None
        raise
    except ray.exceptions.RayActorError as e:
        # An actor that cannot start (e.g. a malformed index) dies in __init__; Ray's message then
        # holds the remote traceback, and the registry's one-line reason at its end.
        raise RegistryError(_actor_death_reason(str(e))) from None


def _actor_death_reason(message: str) -> str:
    reasons = re.findall(r"RegistryError: (.+)", message)
    if reasons:
        return f"the model registry cannot start: {reasons[-1].strip()}"
    first = message.strip().splitlines()[0] if message.strip() else "no reason given"
    return f"the model registry actor died ({first}); `raytrade status` shows the actors, its logs say why"


def open_registry(settings: Settings) -> Any:
    """The running registry actor when a cluster is up, else a registry in this process on the store."""
    # Ray, the store and the registry: imported when the verb runs.
    if os.environ.get("RAY_ADDRESS") or settings.ray.address or recorded_up():
        from actors.registry import get_or_create_registry

        connect(settings, start_local=False)
        return _Remote(get_or_create_registry(settings))
    from core.models.registry import ModelRegistry

    return ModelRegistry(settings)


def run(args: argparse.Namespace, settings: Settings) -> int:
    cmd = args.models_cmd
    if cmd is None:
        raise UserError("raytrade models: choose an action: ls, show, promote, rollback, import, train-baseline, gc")
    try:
        reg = open_registry(settings)
        if cmd == "ls":
            return _ls(reg, args)
        if cmd == "show":
            rec = reg.get(args.name, args.version)
            rec["performance"] = reg.performance(args.name, rec["version"])[-20:]
            print(json.dumps(rec, indent=2, default=str))
            return 0
        if cmd == "promote":
            rec = reg.promote(args.name, args.version)
            print(f"{rec['name']} v{rec['version']} is production")
            return 0
        if cmd == "rollback":
            rec = reg.rollback(args.name)
            print(f"rolled back: {rec['name']} v{rec['version']} is production")
            return 0
        if cmd == "import":
            return _import(reg, args, settings)
        if cmd == "train-baseline":
            return _train(reg, args, settings)
        if cmd == "gc":
            return _gc(reg, args)
    except RegistryError as e:
        raise UserError(str(e)) from None
    raise UserError(f"unknown models action {cmd}")


def _gc(reg: Any, args: Any) -> int:
    """Orphans are listed first; removed only with --yes or a "y" at a terminal."""
    import sys

    paths = reg.orphans()
    if not paths:
        print("no orphaned files under models/")
        return 0
    print(f"{len(paths)} file(s) under models/ that no version owns (a writer stopped before its record):")
    for p in paths:
        print(f"  {p}")
    if not args.yes:
        if not sys.stdin.isatty():
            print("nothing removed: run `raytrade models gc --yes` to remove them")
            return 0
        if input("remove them? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 0
    gone = reg.collect(paths)
    print(f"removed {len(gone)} file(s)")
    return 0


def _ls(reg: Any, args: Any) -> int:
    rows = reg.list(args.name)
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if not rows:
        print("no models registered; `raytrade models train-baseline` or `raytrade models import FILE --name N`")
        return 0
    print(f"{'name':<20} {'ver':>4} {'stage':<11} {'task':<15} {'size':>9} {'sha256':<14} {'created':<20} metrics")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["created_at"]))
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(r["metrics"].items()))
        flags = f" [{','.join(r['flags'])}]" if r["flags"] else ""
        print(f"{r['name']:<20} {r['version']:>4} {r['stage']:<11} {r['task']:<15} {r['size']:>9} "
              f"{r['sha256'][:12]:<14} {created:<20} {metrics}{flags}")
    return 0


def read_source(source: str, settings: Settings) -> bytes:
    """Bytes of a local file or an ``s3://bucket/key`` object (the store's endpoint and keys)."""
    if source.startswith("s3://"):
        from minio.error import S3Error  # the store's clients: when the verb runs

        from core.store import minio_client

        u = urlparse(source)
        client = minio_client(settings.store)
        try:
            resp = client.get_object(u.netloc, u.path.lstrip("/"))
        except S3Error as e:
            raise FileNotFoundError(f"{source}: {e.code}") from None
        try:
            return resp.read()
        finally:
            resp.close()
            resp.release_conn()
    with open(source, "rb") as f:
        return f.read()


def check_member_contract(data: bytes) -> dict[str, Any]:
    """Load the ONNX file as a member would and run it once; returns what was learnt."""
    import numpy as np

    from core.features import FEATURE_NAMES
    from core.models.cache import DeviceConfig, OnnxModel

    model = OnnxModel("import", 0, data, DeviceConfig(), n_features=len(FEATURE_NAMES))
    x = np.random.default_rng(0).standard_normal((4, model.window, model.n_features)).astype(np.float32)
    y = model.run(x)
    if not np.all(np.isfinite(y)) or np.any(np.abs(y) > 1 + 1e-5):
        raise ValueError(f"on test inputs the model returned {y.tolist()}; a member must return positions in [-1, 1]")
    return {"window": model.window, "n_features": model.n_features}


def _import(reg: Any, args: Any, settings: Settings) -> int:
    from core.features import FEATURE_NAMES, feature_spec_hash
    from core.models.artefacts import check_onnx
    from core.models.cache import BadModelContract

    try:
        data = read_source(args.source, settings)
    except OSError as e:
        raise UserError(f"cannot read {args.source}: {e}") from None
    try:
        check_onnx(data)
        contract = check_member_contract(data)
    except (RegistryError, BadModelContract, ValueError) as e:
        raise UserError(f"{args.source}: {e}") from None
    meta = {
        "source": args.source,
        "tags": ["imported", *args.tag],
        "window": contract["window"],
        # Importing states that the model reads core.features rows, in this order.
        "feature_names": list(FEATURE_NAMES),
        "feature_spec_hash": feature_spec_hash(),
    }
    rec = reg.register(args.name, data, args.task, meta)
    print(f"registered {rec['name']} v{rec['version']} ({rec['size']} bytes, sha256 {rec['sha256'][:12]}) as {rec['stage']}")
    if args.promote:
        rec = reg.promote(rec["name"], rec["version"])
        print(f"{rec['name']} v{rec['version']} is production")
    return 0


def _train(reg: Any, args: Any, settings: Settings) -> int:
    from core.baselines import train_direction_model
    from core.store import BarStore, CorruptPartError

    store = BarStore.from_settings(settings.store, settings.resilience)
    symbols = [s.upper() for s in (args.symbols or settings.feeds.symbols)]
    try:
        bars = {s: store.read(s) for s in symbols}
    except CorruptPartError as e:
        raise UserError(str(e)) from None
    empty = [s for s, b in bars.items() if len(b) == 0]
    if empty:
        raise UserError(f"the store at {store.uri} has no bars for {', '.join(empty)}; `raytrade data generate` first")
    if args.epochs < 1:
        raise UserError("--epochs must be at least 1")
    kinds = ["mlp", "lstm"] if args.kind == "both" else [args.kind]
    for kind in kinds:
        try:
            res = train_direction_model(bars, kind, epochs=args.epochs, max_samples=args.max_samples)
        except ValueError as e:
            raise UserError(str(e)) from None
        name = f"baseline_{kind}"
        rec = reg.register(name, res.onnx, "classification", res.metadata)
        hit = res.metadata["holdout_hit_rate"]
        if hit == hit:  # NaN when the model never took a side on the holdout
            reg.track_performance(name, rec["version"], {"hit_rate": hit})
        print(f"{name} v{rec['version']}: holdout hit rate {res.metadata['holdout_hit_rate']:.3f} on "
              f"{res.metadata['holdout_samples']} windows, ONNX vs torch max |diff| {res.metadata['onnx_torch_max_abs_diff']:.2g}")
        if args.promote:
            reg.promote(name, rec["version"])
            print(f"{name} v{rec['version']} is production")
    return 0


COMMANDS = {"models": run}
