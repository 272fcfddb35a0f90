"""Request and response bodies of the decision endpoint, as pydantic models.

Every field a client sends is checked here: types, ranges, finite numbers
(NaN and infinities are refused), symbol spelling, list sizes. A body that
fails gets a 422 whose message names the field and what to fix; it never
reaches the ensemble, the risk manager or a broker.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SYMBOL_PATTERN = r"^[A-Za-z][A-Za-z0-9.\-]{0,14}$"
MAX_BARS = 4096


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_strip_whitespace=True)


class BarIn(_Body):
    ts: datetime = Field(description="bar open time; ISO 8601, UTC if no offset")
    open: float = Field(gt=0)
    high: float = Field(gt=0)
    low: float = Field(gt=0)
    close: float = Field(gt=0)
    volume: float = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "BarIn":
        if self.high < max(self.open, self.close):
            raise ValueError("high is below open or close")
        if self.low > min(self.open, self.close):
            raise ValueError("low is above open or close")
        return self


class DecisionRequest(_Body):
    symbol: str = Field(pattern=SYMBOL_PATTERN, description="e.g. SPY")
    bars: list[BarIn] | None = Field(
        None, max_length=MAX_BARS,
        description="bars to decide on, oldest first; omit to use the feed router's latest window",
    )
    execute: bool = Field(False, description="send the order through the risk manager to the broker")
    account: str = Field("default", pattern=r"^[a-z0-9_\-]{1,32}$")
    decision_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_\-]{8,64}$",
        description="idempotency key: the same id executes at most one order",
    )

    @field_validator("symbol")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    @field_validator("bars")
    @classmethod
    def _increasing(cls, v: list[BarIn] | None) -> list[BarIn] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("give at least one bar, or omit bars to use the live window")
        for i in range(1, len(v)):
            if v[i].ts <= v[i - 1].ts:
                raise ValueError(f"bars must be in increasing time order; bar {i} is not after bar {i - 1}")
        return v


class MemberContribution(BaseModel):
    position: float | None = None
    contribution: float = 0.0
    weight: float = 0.0
    version: str | None = None


class RiskVerdict(BaseModel):
    approved: bool
    reasons: list[str]
    quantity: float = 0.0
    checks: dict[str, Any] = Field(default_factory=dict)
    preview: bool = Field(False, description="judged by the ingress from the account's risk snapshot, for a "
                          "decision not executed; an order is judged again by the risk manager")
    state_age_ms: float | None = Field(None, description="age of the snapshot a preview was judged from")


class LastBar(BaseModel):
    seq: int | None = None
    ts: datetime | None = None
    close: float | None = None


class Decision(BaseModel):
    decision_id: str
    symbol: str
    account: str
    action: Literal["BUY", "SELL", "HOLD"]
    target_position: float
    current_position: float
    quantity: float
    confidence: float
    reason: str | None = None
    regime: str | None = None
    members: dict[str, MemberContribution] = Field(default_factory=dict)
    failed_members: dict[str, str] = Field(default_factory=dict)
    model_versions: dict[str, str | None] = Field(default_factory=dict)
    external: dict[str, Any] | None = None
    risk: RiskVerdict
    last_bar: LastBar
    executed: bool = False
    order: dict[str, Any] | None = None
    latency_ms: float = 0.0


class ExternalSignal(_Body):
    source: str = Field(pattern=r"^[A-Za-z0-9_\-.]{1,64}$")
    symbol: str = Field(pattern=SYMBOL_PATTERN)
    position: float = Field(ge=-1, le=1, description="target position in [-1, 1]")
    confidence: float = Field(ge=0, le=1)
    ttl_s: float = Field(300, gt=0, le=86_400, description="how long the signal counts")

    @field_validator("symbol")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()


class OrderRequest(_Body):
    symbol: str = Field(pattern=SYMBOL_PATTERN)
    side: Literal["BUY", "SELL"]
    quantity: float = Field(gt=0, le=1e9)
    account: str = Field("default", pattern=r"^[a-z0-9_\-]{1,32}$")
    client_order_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_\-]{8,64}$")
    confidence: float = Field(1.0, ge=0, le=1)
    stop_loss: float | None = Field(None, gt=0)
    take_profit: float | None = Field(None, gt=0)

    @field_validator("symbol")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()


class HaltRequest(_Body):
    reason: str = Field("manual halt", min_length=1, max_length=500)
    account: str | None = Field(None, pattern=r"^[a-z0-9_\-]{1,32}$")


class PromoteRequest(_Body):
    version: int = Field(ge=1, description="the registry version to make production")
