"""Reinforcement learning for raytrade: a batched torch trading environment and CVaR-PPO.

For the learner actor and scripts, Ray-free. The two names a user needs:

    from core.rl.env import TradingEnv
    from core.rl.cvar_ppo import CVaRPPOSettings, train, export_onnx

    env = TradingEnv(features, close=close, window=32, episode_length=256, num_envs=256,
                     commission=0.0005, slippage=0.0005, device="cuda")
    settings = CVaRPPOSettings(risk_mode="cvar", alpha=0.1, soft_risk_fraction=0.1)
    history, policy = train(settings, env, checkpoint_path="ckpt.pt")
    export_onnx(policy, "policy.onnx", env.obs_dim)

``core.rl.cvar`` is the empirical VaR/CVaR estimator; ``core.rl.oracle_envs`` holds toy
envs whose CVaR-optimal answers are known by hand (for tests). The learner's run is here
too, Ray-free: ``core.rl.data`` (the held-out split, one env over every symbol),
``core.rl.export`` (the policy as an ensemble member), ``core.rl.evaluate`` (the member's
backtest on held-out bars) and ``core.rl.run`` (``run_training``: train, checkpoint,
export, evaluate, register). Not here: scheduling, or the learner actor (``actors.learner``).
"""
