"""raytrade's Ray-free domain code: bars, the store, features, strategies,
metrics, the backtest engine and the CVaR-PPO maths.

Nothing under ``core`` imports Ray, so the same functions run inside actors,
Tune trials, the Serve ingress and plain scripts.
"""
