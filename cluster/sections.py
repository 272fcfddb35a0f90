"""The sections of raytrade's settings: one validated model per part of the system.

Each class here is one table of ``raytrade.toml`` (``[store]``, ``[feeds]``,
``[serve]``, ...), with its defaults, its bounds and a description per field
that ``raytrade config show`` and the docs read. A section rejects names it
does not know and values out of range, with a message that says what is
allowed. The risk limits are core's (``core.risk_limits.RiskLimits``), next to
the rules that read them.

Not here: the one ``Settings`` object that holds the sections, where values
come from (file, secrets, environment) and the one-line errors
(``cluster.settings``); what each number does (the module each section names).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from core.risk_limits import RiskLimits


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ResilienceSettings(_Section):
    """Retry with exponential backoff and the circuit breaker, for every call to the outside."""

    retry_attempts: int = Field(3, ge=1, le=20)
    retry_base_delay_s: float = Field(1.0, ge=0, le=60)
    retry_multiplier: float = Field(2.0, ge=1, le=10)
    retry_max_delay_s: float = Field(30.0, gt=0)
    breaker_failures: int = Field(5, ge=1, description="consecutive failures that open the breaker")
    breaker_open_s: float = Field(60.0, gt=0, description="how long an open breaker refuses calls before a trial")
    breaker_recovery_s: float = Field(
        300.0, gt=0, description="after a trial succeeds, time without failure until the breaker is fully recovered"
    )


class StoreSettings(_Section):
    """Where bars and model artefacts live: a local directory or s3://bucket/prefix."""

    uri: str = Field("data/store", description="local path, or s3://bucket/prefix")
    endpoint: str | None = Field(None, description="S3 endpoint URL for MinIO, e.g. http://127.0.0.1:9000")
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    region: str = "us-east-1"

    @field_validator("uri")
    @classmethod
    def _uri_ok(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a local path or s3://bucket/prefix")
        if "://" in v and not v.startswith("s3://"):
            raise ValueError("only local paths and s3://bucket/prefix are supported")
        if v.startswith("s3://") and len(v) <= len("s3://"):
            raise ValueError("s3:// needs a bucket, e.g. s3://raytrade/store")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint_ok(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError("must start with http:// or https://")
        return v


class AlpacaSettings(_Section):
    """Alpaca market data and trading. Off until keys are given."""

    api_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    feed: Literal["iex", "sip"] = "iex"
    data_stream_url: str | None = Field(None, description="override of the market-data websocket URL")
    data_rest_url: str | None = Field(None, description="override of the market-data REST URL")
    trading_url: str | None = Field(None, description="override of the trading REST URL")
    bar_seconds: int = Field(60, ge=1, description="spacing of the streamed bars (Alpaca streams minute bars)")
    stream_data_timeout_s: float = Field(
        120.0, gt=0, description="reconnect when the socket is open but silent this long"
    )

    @property
    def enabled(self) -> bool:
        return self.api_key is not None and self.secret_key is not None


class FeedSettings(_Section):
    """Market data feeds and the router's health rules."""

    symbols: list[str] = Field(default_factory=lambda: ["SPY", "QQQ", "AAPL", "MSFT"], min_length=1)
    calendar: str = Field(
        "XNYS", pattern=r"^(24/7|[A-Z0-9]{3,5}(-[A-Z0-9]+)?)$",
        description="the exchange calendar the trading day follows (exchange_calendars' code, e.g. XNYS, XLON; "
        "'24/7': the bars' UTC date): day P&L and the daily loss halt roll over with the bars' session, not the "
        "wall clock",
    )
    sources: list[Literal["replay", "synthetic", "alpaca"]] = Field(
        default_factory=lambda: ["replay", "synthetic"], min_length=1, description="in priority order"
    )
    bar_interval_s: float = Field(1.0, gt=0, description="expected time between bars while streaming")
    replay_pace: Literal["interval", "realtime", "fast"] = Field(
        "interval",
        description="replay: one bar per bar_interval_s, the bars' own spacing / replay_speed, or as fast as possible",
    )
    replay_speed: float = Field(1.0, gt=0, description="with replay_pace=realtime: N times faster than the bars' time")
    replay_start: str | None = Field(
        None, description="replay (and the synthetic backup) from this time; earlier stored bars are history"
    )
    warm_bars: int = Field(
        256, ge=0, description="with no replay_start, a first start replays from after each symbol's first "
        "warm_bars stored bars, which warm the live windows (0: replay the store from its beginning)")
    stall_intervals: float = Field(2.0, gt=0, description="no bar for this many intervals is a stall")
    start_grace_intervals: float = Field(
        10.0, ge=0, description="a source that has sent no bar yet (starting up) is stalled only after this many "
        "intervals: the stall clock starts with its first bar")
    failback_intervals: int = Field(5, ge=1, description="healthy intervals before failing back")
    min_quality: float = Field(0.9, ge=0, le=1, description="share of bars that must pass the quality gate")
    spike_sigmas: float = Field(8.0, gt=0)
    window: int = Field(512, ge=16, description="bars kept in memory per symbol")
    store_batch: int = Field(64, ge=1, description="accepted bars written to the store per batch")
    seed: int = 7

    @field_validator("symbols")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [s.upper() for s in v]


class ServeSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    external_weight: float = Field(0.3, ge=0, le=1, description="weight of an outside signal against the ensemble's")
    rate_limit_per_s: float = Field(50.0, gt=0, description="requests a second per API key (per ingress replica)")
    rate_burst: float = Field(100.0, ge=1, description="burst size of the per-key rate limit")
    ensemble: Literal["ingress", "deployment"] = Field(
        "ingress",
        description="where the ensemble runs: inside each ingress replica (no hop per decision; the ingress takes "
        "the ensemble role's resources as well as its own) or as its own Serve deployment (scaled apart from HTTP)",
    )
    signal_per_bar: bool = Field(
        True,
        description="decisions on the live window reuse the ensemble's signal for that window's last bar (same bars, "
        "same models: the same signal) until a new bar or a model change; false computes it for every request. "
        "Only with the ensemble in the ingress; a signal with a failed member is never reused",
    )
    max_bar_age: float = Field(
        3.0, gt=0, description="a decision on the live window whose last bar arrived longer ago than this many "
        "feeds.bar_interval_s (and min_stale_s) is HOLD, with the age as its reason: stale data never trades",
    )
    min_stale_s: float = Field(
        5.0, ge=0, description="data is never called stale sooner than this (fast replays' bars come in bursts)",
    )
    proxy: Literal["serve", "haproxy"] = Field(
        "serve",
        description="what takes the HTTP port: Serve's own proxy, or HAProxy in front of the ingress replicas' "
        "own ports (Serve's direct ingress: one hop fewer, and the request body comes with the request; needs "
        "the haproxy binary; replica ports then listen on all interfaces). Takes effect when raytrade starts Ray; "
        "a cluster sets RAY_SERVE_ENABLE_HA_PROXY=1 on its nodes (ray-cluster.yaml)",
    )


class ApiKey(_Section):
    name: str
    key: SecretStr
    role: Literal["read", "trade", "admin"] = "read"


class RaySettings(_Section):
    address: str | None = Field(None, description="Ray cluster to join; RAY_ADDRESS wins; empty starts a local Ray")
    namespace: str = "raytrade"
    profile: Literal["auto", "cpu", "gpu"] = Field("auto", description="resource profile; auto picks gpu when the cluster has GPUs")
    num_cpus: int | None = Field(None, ge=1, description="logical CPUs of a local Ray; default: this machine's")
    include_dashboard: bool = True
    resource_overrides: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="per-role overrides of num_cpus/num_gpus/memory"
    )


class LearnerSettings(_Section):
    """The CVaR-PPO learner's environment, evaluation and checkpoints (``actors.learner``).

    The PPO hyper-parameters themselves are ``core.rl.cvar_ppo.CVaRPPOSettings``,
    given per training run; these are the numbers a run does not choose.
    """

    window: int = Field(16, ge=1, le=512, description="feature rows in each observation (and in the served member)")
    episode_length: int = Field(64, ge=2, description="decisions per training episode")
    num_envs: int = Field(64, ge=1, description="episodes stepped at once; split evenly over the symbols")
    positions: list[float] = Field(
        default_factory=lambda: [-1.0, 0.0, 1.0], min_length=2, description="the action grid of target positions"
    )
    commission: float = Field(0.0005, ge=0, lt=1, description="fraction of traded notional, in training and evaluation")
    slippage: float = Field(0.0005, ge=0, lt=1, description="fraction of traded notional, in training and evaluation")
    holdout_fraction: float = Field(
        0.25, gt=0, lt=1, description="the latest share of each symbol's bars, never trained on, for the evaluation"
    )
    eval_fill: Literal["open", "close"] = Field(
        "open", description="evaluation fills at the next bar's open (live-like) or the decision bar's close"
    )
    eval_alpha: float = Field(0.05, gt=0, le=1, description="CVaR level of the evaluation when the run's alpha is 1")
    periods_per_year: float = Field(252.0, gt=0, description="bars per year, for the evaluation's Sharpe")
    checkpoint_every: int = Field(5, ge=1, description="iterations between checkpoints written to the store")
    model_name: str = Field(
        "cvar-ppo", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,54}$",
        description="registry name of the candidates; risk-neutral runs register as <name>-baseline",
    )

    @field_validator("positions")
    @classmethod
    def _positions_in_range(cls, v: list[float]) -> list[float]:
        if any(not -1.0 <= x <= 1.0 for x in v) or len(set(v)) != len(v):
            raise ValueError("positions must be distinct values in [-1, 1]")
        return v


class WorkflowSpec(_Section):
    """One named workflow the scheduler runs: how urgent, which locks, what to call."""

    priority: int = Field(..., ge=0, description="lower runs first")
    locks: list[str] = Field(default_factory=list, description="named resources held exclusively while it runs")
    target: str | None = Field(None, description="the callable, as 'package.module:function'")
    timeout_s: float | None = Field(None, gt=0, description="per attempt; default scheduler.timeout_s")
    max_attempts: int | None = Field(None, ge=1, le=20, description="default scheduler.max_attempts")

    @field_validator("target")
    @classmethod
    def _import_path(cls, v: str | None) -> str | None:
        if v is not None:
            mod, sep, fn = v.partition(":")
            if not sep or not mod or not fn.isidentifier():
                raise ValueError("must be an import path 'package.module:function'")
        return v

    @field_validator("locks")
    @classmethod
    def _lock_names(cls, v: list[str]) -> list[str]:
        for name in v:
            if not name.replace("_", "").isalnum():
                raise ValueError(f"lock {name!r}: use letters, digits and _")
        return sorted(set(v))


def _default_workflows() -> dict[str, WorkflowSpec]:
    # Priorities from the operating plan; locks are the data each one changes.
    # Targets are filled in by the parts that own the work (report, learner, ...).
    return {
        "critical_trading": WorkflowSpec(priority=1, locks=["trading_decision", "portfolio_data"]),
        "risk_management": WorkflowSpec(priority=2, locks=["risk_calculation", "portfolio_data"]),
        "position_reconciliation": WorkflowSpec(priority=3, locks=["portfolio_data"]),
        "model_intelligence": WorkflowSpec(priority=4, locks=["model_registry"]),
        "daily_report": WorkflowSpec(priority=15, locks=["risk_calculation"]),
        "model_training": WorkflowSpec(priority=20, locks=["model_registry", "training"],
                                       target="actors.learner:train_workflow"),
        # `raytrade backtest walk-forward|monte-carlo` beside a running system (raytrade.jobs):
        # one research sweep at a time, each on the whole cluster's free CPUs.
        "backtest": WorkflowSpec(priority=22, locks=["research"], target="raytrade.job_runner:run_cli"),
        "data_collection": WorkflowSpec(priority=25, locks=["market_data"]),
    }


class SchedulerSettings(_Section):
    """The workflow scheduler: priorities (lower first), ageing, retries, timeouts."""

    workflows: dict[str, WorkflowSpec] = Field(default_factory=_default_workflows)
    ageing_per_minute: float = Field(
        1.0, ge=0, description="priority points a waiting workflow gains per minute, so the lowest still runs"
    )
    max_running: int = Field(4, ge=1, le=256, description="workflows running at once")
    max_attempts: int = Field(3, ge=1, le=20, description="attempts per workflow, the first included")
    retry_base_delay_s: float = Field(2.0, ge=0, le=3600)
    retry_multiplier: float = Field(2.0, ge=1, le=10)
    retry_max_delay_s: float = Field(300.0, gt=0)
    timeout_s: float = Field(900.0, gt=0, description="default time limit of one attempt")
    history: int = Field(200, ge=1, le=100_000, description="finished workflows kept in status")
    tick_s: float = Field(0.2, gt=0, le=10, description="how often the scheduler looks at its queue")
    recovery_grace_s: float = Field(
        10.0, ge=0, description="after a restart, how long a run that may still be alive keeps its locks if Ray cannot say"
    )
    journal: str = Field("scheduler/journal.json", description="the queue's journal, relative to the store root")

    @field_validator("workflows", mode="before")
    @classmethod
    def _over_defaults(cls, v: Any) -> Any:
        # A file that sets one field of one workflow (a target, a priority) keeps
        # the other workflows and the other fields: the defaults are merged under it.
        if not isinstance(v, dict):
            return v
        merged: dict[str, Any] = {k: spec.model_dump() for k, spec in _default_workflows().items()}
        for name, spec in v.items():
            spec = spec.model_dump(exclude_unset=True) if isinstance(spec, BaseModel) else spec
            if isinstance(spec, dict) and name in merged:
                merged[name] = {**merged[name], **spec}
            else:
                merged[name] = spec
        return merged


class BrokerSettings(_Section):
    """The paper broker's costs and the ledgers every broker keeps (see docs/risk.md)."""

    starting_cash: float = Field(100_000.0, gt=0, description="a new paper account's cash")
    slippage_bps: float = Field(5.0, ge=0, le=1000, description="paper fills: basis points against the taker")
    commission_per_share: float = Field(0.005, ge=0, description="paper fills: commission per share")
    commission_min: float = Field(1.0, ge=0, description="paper fills: minimum commission per fill")
    ledger_dir: str = Field("var/ledger", description="one folder per account: ledger.sqlite and risk.sqlite")
    http_timeout_s: float = Field(10.0, gt=0, le=300, description="Alpaca trading REST timeout per request")
    signing_key: SecretStr | None = Field(
        None, description="HMAC key of the risk manager's verdict tokens; empty: a random key per start"
    )
    token_ttl_s: float = Field(30.0, gt=0, le=3600, description="how long a verdict token may be presented")
    fill_stall_s: float = Field(
        30.0, gt=0, le=86_400,
        description="a paper market order waiting longer than this for its fill marks the broker's fills stalled",
    )


class AccountSettings(_Section):
    """One trading account: its broker, and risk limits that override ``risk`` field by field."""

    kind: Literal["paper", "alpaca"] = "paper"
    risk: dict[str, Any] = Field(default_factory=dict, description="overrides of the top-level risk limits")
    starting_cash: float | None = Field(None, gt=0, description="paper: overrides broker.starting_cash")
    api_key: SecretStr | None = Field(None, description="alpaca: this account's key (default alpaca.api_key)")
    secret_key: SecretStr | None = Field(None, description="alpaca: this account's secret (default alpaca.secret_key)")

    @field_validator("risk")
    @classmethod
    def _known_limits(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(RiskLimits.model_fields))
        if unknown:
            raise ValueError(f"unknown risk limit(s) {', '.join(unknown)}; valid: {', '.join(RiskLimits.model_fields)}")
        return v


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


class RuleMemberSettings(_Section):
    """A rule member: one of core's strategies with its parameters."""

    name: str = Field(description="member name, unique in the ensemble")
    strategy: Literal["sma_crossover", "atr_breakout", "rsi_reversion"]
    params: dict[str, int | float | bool | str] = Field(default_factory=dict, description="keyword arguments of the core strategy")
    weight: float = Field(1.0, ge=0)
    timeout_s: float | None = Field(None, gt=0, description="default: ensemble.member_timeout_s")


class PythonMemberSettings(_Section):
    """A user's member: a function ``fn(batch: core.members.MemberBatch) -> positions[B]``."""

    name: str
    import_path: str = Field(description="module:function, importable on every node")
    weight: float = Field(1.0, ge=0)
    timeout_s: float | None = Field(None, gt=0)

    @field_validator("import_path")
    @classmethod
    def _path_ok(cls, v: str) -> str:
        mod, _, fn = v.partition(":")
        if not mod or not fn or not all(p.isidentifier() for p in mod.split(".")) or not fn.isidentifier():
            raise ValueError("must be package.module:function")
        return v


def _default_rules() -> list[RuleMemberSettings]:
    return [
        RuleMemberSettings(name="sma_cross", strategy="sma_crossover", params={"fast": 10, "slow": 50}),
        RuleMemberSettings(name="atr_breakout", strategy="atr_breakout", params={"window": 20, "multiplier": 2.0}),
        RuleMemberSettings(name="rsi_reversion", strategy="rsi_reversion", params={"window": 14, "lower": 30, "upper": 70}),
    ]


class EnsembleSettings(_Section):
    """The model ensemble, its model cache and the registry's feedback loop."""

    models: list[str] = Field(
        default_factory=list, description="registry models used as members; empty: every production model of `tasks`"
    )
    tasks: list[str] = Field(default_factory=lambda: ["forecasting", "classification"])
    rules: list[RuleMemberSettings] = Field(default_factory=_default_rules)
    python_members: list[PythonMemberSettings] = Field(default_factory=list)
    weights: dict[str, float] = Field(default_factory=dict, description="base weight per learned member (default 1)")
    regime_weights: dict[str, dict[str, float]] = Field(
        # Trend followers lead in a trend, the reverter in a range; in a volatile
        # market only the breakout keeps its full say. Learned members default to 1.
        default_factory=lambda: {
            "trending": {"sma_cross": 1.5, "atr_breakout": 1.5, "rsi_reversion": 0.5},
            "ranging": {"sma_cross": 0.5, "atr_breakout": 0.5, "rsi_reversion": 1.5},
            "volatile": {"sma_cross": 0.5, "atr_breakout": 1.0, "rsi_reversion": 0.5},
        },
        description="regime -> member -> multiplier of its base weight",
    )
    member_timeout_s: float = Field(0.25, gt=0, description="a member slower than this is left out of the call")
    max_versions_per_model: int = Field(3, ge=1, description="versions of one model kept loaded")
    cache_budget_bytes: int | None = Field(
        None, gt=0, description="model cache budget; default: cache_budget_fraction of the ensemble role's memory"
    )
    cache_budget_fraction: float = Field(0.5, gt=0, le=1)
    intra_op_threads: int | None = Field(None, ge=1, description="ONNX Runtime threads per session; default: role CPUs")
    max_batch_size: int = Field(256, ge=1)
    batch_wait_s: float = Field(0.002, ge=0, description="how long a batch waits for more requests")
    reload_poll_s: float = Field(2.0, gt=0, description="how often replicas ask the registry for production versions")
    adapt_eta: float = Field(0.05, ge=0, description="learning rate of the multiplicative weights")
    max_tail_risk: float = Field(0.02, gt=0, description="predicted one-bar CVaR (95 %) above which positions shrink")
    accuracy_window: int = Field(500, ge=10, description="outcomes in a member's rolling accuracy")
    degradation_threshold: float = Field(0.45, ge=0, le=1, description="rolling hit rate that flags a production member")
    degradation_min_samples: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _names_unique(self) -> "EnsembleSettings":
        names = [r.name for r in self.rules] + [p.name for p in self.python_members]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"member names must be unique; repeated: {', '.join(sorted(dup))}")
        return self
