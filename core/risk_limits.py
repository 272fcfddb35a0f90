"""An account's risk limits: the numbers ``core.risk.evaluate`` judges every order against.

``RiskLimits`` is a validated section of raytrade's settings (``risk``, and
``accounts.<name>.risk`` field by field on top, joined by
``cluster.settings.Settings.risk_limits_for``). It lives in core so the rules
and the limits they read sit in one layer: ``core.risk`` and its tests build
limits without the settings object. Fractions are of account equity
(0.05 = 5 %).

Not here: applying the limits (``core.risk``), reading them from a file or the
environment (``cluster.settings``), the state they are judged on (the risk
manager, ``actors.risk``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RiskLimits(BaseModel):
    """Trading limits. Fractions are of account equity (0.05 = 5 %)."""

    # As every settings section: an unknown name or a bad assignment fails loudly.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    max_position_pct: float = Field(0.05, gt=0, le=1, description="max position per symbol, fraction of equity")
    max_position_pct_by_symbol: dict[str, float] = Field(
        default_factory=dict, description="per-symbol overrides of max_position_pct"
    )
    max_risk_per_trade_pct: float = Field(0.01, gt=0, le=1, description="max loss to the stop per trade, fraction of equity")
    min_reward_risk: float = Field(2.0, gt=0, description="min take-profit distance over stop distance")
    allowed_symbols: list[str] = Field(
        default_factory=lambda: ["SPY", "QQQ", "AAPL", "MSFT"], min_length=1, description="symbols that may be traded"
    )
    confidence_threshold: float = Field(0.7, ge=0, le=1, description="min model confidence to open or add")
    max_daily_loss_pct: float = Field(0.02, gt=0, le=1, description="loss in a day that halts new entries")
    max_drawdown_pct: float = Field(0.05, gt=0, le=1, description="drawdown from peak that trips the kill switch")
    production: bool = Field(False, description="trade a live account; off means paper only")
    atr_stop_multiple: float = Field(
        2.0, gt=0, le=50, description="stop distance in ATRs when an order names no stop-loss"
    )
    whole_shares: bool = Field(True, description="size orders in whole shares (off: fractional, 6 decimals)")
    max_price_deviation_pct: float = Field(
        0.05, gt=0, le=1,
        description="an entry whose price is further than this from the account's own last mark is refused",
    )

    @field_validator("allowed_symbols")
    @classmethod
    def _symbols_upper(cls, v: list[str]) -> list[str]:
        out = []
        for s in v:
            if not s or not s.replace(".", "").replace("-", "").isalnum():
                raise ValueError(f"symbol {s!r} must be letters/digits (., - allowed)")
            out.append(s.upper())
        return out

    @field_validator("max_position_pct_by_symbol")
    @classmethod
    def _overrides_in_range(cls, v: dict[str, float]) -> dict[str, float]:
        for sym, pct in v.items():
            if not 0 < pct <= 1:
                raise ValueError(f"override for {sym} is {pct}; must be > 0 and <= 1")
        return {k.upper(): p for k, p in v.items()}

    def max_position_for(self, symbol: str) -> float:
        return self.max_position_pct_by_symbol.get(symbol.upper(), self.max_position_pct)
