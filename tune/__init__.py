"""raytrade's Tune drivers: backtests that run as Ray Tune experiments.

- ``tune.walk_forward``: walk-forward optimisation (rolling or anchored
  folds; grid or sampled search on each fold's in-sample bars; the best set
  run out of sample; stitched out-of-sample equity, parameters per fold,
  walk-forward efficiency). The strategies it searches, and their name
  registry, are ``core.strategies``'; ``model:`` names resolve through the
  resolver the caller passes (``tune.models.connect_registry``).
- ``tune.experiment``: the Tune plumbing both drivers share (storage,
  chunking, naming). No function here connects to Ray: the caller does.
- ``tune.monte_carlo``: Monte Carlo robustness (trade bootstrap, block
  bootstrap of bar returns, re-runs on synthetic price paths).
- ``tune.models``: registry models as strategies (``model:NAME@VERSION``), a
  CVaR-PPO policy's member included.
- ``tune.report``: the HTML report with PNG charts, and the paper-fills
  against backtest comparison.

Each trial does hundreds or thousands of backtests with ``core.engine``, takes
its resources from ``cluster.resources`` (role ``backtest_trial``) and writes to
Tune's storage. This package shares its name with ``ray.tune``: import Ray's as
``from ray import tune`` and ours only with from-imports
(``from tune.walk_forward import walk_forward``).
"""
