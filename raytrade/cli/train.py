"""``raytrade train``: CVaR-PPO and the risk-neutral baseline, trained and compared on held-out bars.

The arguments and the data are checked before any cluster is touched. Beside
a running system the training is its ``model_training`` workflow
(``raytrade.jobs``: submitted, followed, ``--detach`` to return at once);
otherwise the learner actor (the system's, or one started for this command and removed
after it) trains both runs, with progress on stderr, and the table of
held-out results goes to stdout. Ray, torch and the learner are imported
inside the functions that run the verb: `raytrade --help` does not pay for them.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from typing import Any

from cluster import names
from cluster.runtime import ClusterUnavailable
from cluster.settings import Settings
from raytrade.cli.errors import EXIT_UNAVAILABLE, UserError, one_line, unavailable
from raytrade.jobs import join, running_scheduler, submit


def add_parser(sub: Any) -> None:
    tr = sub.add_parser("train", help="train CVaR-PPO and the risk-neutral baseline; compare them on held-out bars")
    tr.add_argument("--symbols", nargs="+", default=None, help="symbols in the store to learn from (default: feeds.symbols)")
    tr.add_argument("--steps", type=int, default=200_000, help="environment steps per run")
    tr.add_argument("--alpha", type=float, default=0.1, help="CVaR level in (0, 1): the worst alpha share of episodes")
    tr.add_argument("--beta", type=float, default=None,
                    help="CVaR floor (log return per episode): maximise the mean subject to CVaR_alpha >= beta; "
                         "without it, maximise CVaR_alpha itself")
    tr.add_argument("--lambda-lr", type=float, default=10.0, help="with --beta: the Lagrange multiplier's step per iteration")
    tr.add_argument("--soft-risk", type=float, default=0.2, help="share of training over which alpha anneals from 1")
    tr.add_argument("--seed", type=int, default=1)
    tr.add_argument("--run", default=None, help="run id; giving an interrupted run's id resumes it (default: a new one)")
    tr.add_argument("--detach", action="store_true",
                    help="beside a running system: submit the model_training job and return its id at once")


def _train_requests(args: argparse.Namespace, settings: Settings) -> tuple[str, list[str], list[tuple[str, str, Any]]]:
    """Check the arguments and the data, before any cluster is touched; (run, symbols, runs)."""
    # torch and the store: imported when the verb runs.
    from core.rl.data import MultiSymbolEnv, load_data
    from core.rl.run import ppo_settings_for
    from core.store import BarStore

    if not 0.0 < args.alpha < 1.0:
        raise UserError(f"--alpha {args.alpha}: must be in (0, 1); the baseline is alpha = 1")
    if not 0.0 <= args.soft_risk <= 1.0:
        raise UserError(f"--soft-risk {args.soft_risk}: must be in [0, 1]")
    if not args.lambda_lr > 0 or not math.isfinite(args.lambda_lr):  # NaN passes a plain "<= 0" check
        raise UserError(f"--lambda-lr {args.lambda_lr}: must be a positive number")
    if args.beta is not None and not math.isfinite(args.beta):
        # A NaN floor would silently train plain PPO: max(0, lambda + NaN) keeps lambda at 0.
        raise UserError(f"--beta {args.beta}: must be a finite log return, e.g. -0.02")
    symbols = [s.upper() for s in (args.symbols or settings.feeds.symbols)]
    for sym in symbols:
        if not sym.replace(".", "").replace("-", "").isalnum():
            raise UserError(f"--symbols {sym!r}: use letters and digits, e.g. SPY")
    if len(set(symbols)) != len(symbols):
        raise UserError(f"--symbols {' '.join(symbols)}: a symbol is repeated")
    ls = settings.learner
    batch = ls.num_envs * ls.episode_length
    if args.steps < batch:
        raise UserError(f"--steps {args.steps}: one rollout is learner.num_envs x learner.episode_length = {batch} "
                        f"steps; give at least that")
    run = args.run or time.strftime("run-%Y%m%d-%H%M%S")
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,54}$", run):
        raise UserError(f"--run {run!r}: use letters, digits, '_', '-', '.' (at most 55)")
    try:
        MultiSymbolEnv.from_data(load_data(BarStore.from_settings(settings.store, settings.resilience), symbols, ls),
                                 ls, args.seed, "cpu")
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.steps % batch:
        print(f"training {args.steps // batch * batch} steps per run: whole rollouts of {batch}", file=sys.stderr)
    kw = dict(seed=args.seed, soft_risk=args.soft_risk, lambda_lr=args.lambda_lr)
    baseline = ppo_settings_for(ls, args.steps, **kw)
    risky = ppo_settings_for(ls, args.steps, args.alpha, args.beta, **kw)
    label = f"CVaR-PPO (alpha={args.alpha:g}" + ("" if args.beta is None else f", beta={args.beta:g}") + ")"
    return run, symbols, [("risk-neutral PPO (alpha=1)", f"{run}-baseline", baseline), (label, f"{run}-cvar", risky)]


def _progress_line(label: str, p: dict[str, Any]) -> str:
    total = p.get("total_timesteps") or 0
    step = p.get("global_step") or 0
    frac = min(1.0, step / total) if total else 0.0
    bar = "#" * int(frac * 24) + "." * (24 - int(frac * 24))
    line = f"\r{label:<34} [{bar}] {frac:4.0%} {int(step):>9}/{int(total)} {p.get('phase', ''):<11}"
    if p.get("phase") == "training":
        line += (f" return {p.get('mean_return', float('nan')):+.4f} CVaR {p.get('cvar', float('nan')):+.4f}"
                 f" KL {p.get('approx_kl', float('nan')):.4f} lambda {p.get('lambda_', 0.0):.3f}")
    return line.ljust(140)  # a shorter line must cover the longer one it overwrites


def run(args: argparse.Namespace, settings: Settings) -> int:
    import ray  # Ray and torch: when the verb runs

    from actors.learner import get_or_create_learner

    _, symbols, runs = _train_requests(args, settings)
    try:
        info = join(settings)
    except ClusterUnavailable as e:
        return unavailable(e)
    sched = None if info.started_locally else running_scheduler(settings)
    if sched is not None:  # a running system: the work is its model_training workflow
        return submit(settings, sched, "model_training", args.argv, args.detach)
    # A learner the system runs: use it, leave it running. Otherwise start one, and remove it after.
    ours = names.lookup(names.LEARNER, settings) is None
    learner = get_or_create_learner(settings, detached=not ours)
    results = []
    try:
        for label, run_id, ppo in runs:
            ref = learner.train.remote(run_id, symbols, ppo, args.alpha)
            while True:
                ready, _ = ray.wait([ref], timeout=0.5)
                try:
                    p = ray.get(learner.progress.remote(), timeout=10)
                    if p.get("run_id") == run_id:
                        print(_progress_line(label, p), end="", file=sys.stderr, flush=True)
                except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
                    pass  # restarting: the retried call resumes from the checkpoint
                if ready:
                    break
            print(file=sys.stderr)
            try:
                results.append((label, ray.get(ref)))
            except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                cause = getattr(e, "cause", None) or e
                print(f"raytrade: training {run_id} failed: {one_line(cause)}", file=sys.stderr)
                return EXIT_UNAVAILABLE
    finally:
        if ours:
            ray.kill(learner, no_restart=True)
    _print_train_table(results, settings, args.alpha)
    return 0


def _num(x: float | None, width: int, fmt: str) -> str:
    # Results come back as JSON, where a metric that could not be measured is null.
    return f"{'n/a':>{width}}" if x is None else f"{x:>{width}{fmt}}"


def _print_train_table(results: list[tuple[str, dict[str, Any]]], settings: Settings, alpha: float) -> None:
    ls = settings.learner
    first = results[0][1]["evaluation"]
    print(f"held-out bars (never trained on), fills at the {'next open' if ls.eval_fill == 'open' else 'close'}, "
          f"costs {ls.commission:.4%} + {ls.slippage:.4%} of notional:")
    for sym, m in first["symbols"].items():
        print(f"  {sym:<8} {m['first']} .. {m['last']} ({m['bars']} bars)")
    head = f"CVaR_{alpha:g}"
    print(f"{'':<34} {'mean/bar':>11} {'Sharpe':>8} {head:>11} {'max DD':>8} {'exposure':>9} {'lambda':>7}")
    for label, r in results:
        a = r["evaluation"]["aggregate"]
        lam = r["history"][-1].get("lambda_", 0.0) if r["history"] else 0.0
        print(f"{label:<34} {_num(a['mean'], 11, '.6f')} {_num(a['sharpe'], 8, '.3f')} {_num(a['cvar'], 11, '.6f')} "
              f"{_num(a['max_drawdown'], 8, '.2%')} {_num(a['exposure'], 9, '.2f')} {_num(lam or 0.0, 7, '.3f')}")
    print("over symbols: mean of mean and Sharpe, worst CVaR and drawdown. Registered as candidates "
          "(`raytrade models ls`):")
    for label, r in results:
        c = r["candidate"]
        print(f"  {c['name']} v{c['version']} ({label}, run {r['run_id']}): {c['path']} (sha256 {c['sha256'][:12]})")


COMMANDS = {"train": run}
