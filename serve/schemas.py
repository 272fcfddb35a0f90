"""Request and response bodies of the decision endpoint, as pydantic models.

Every field a client sends is checked here: types, ranges, finite numbers
(NaN and infinities are refused), symbol spelling, list sizes. A body that
fails gets a 422 whose message names the field and what to fix; it never
reaches the ensemble, the risk manager or a broker.

Money, quantities and flags are strict (pydantic's strict mode, ``Money``,
``Flag``): a quantity or price is a JSON number, never the string ``"10"`` or
``true``; ``execute`` is a JSON boolean, never ``"yes"``, ``1`` or ``"on"``.
Whether a quantity may have a fraction depends on the account
(``risk.whole_shares``), so the route asks ``OrderRequest.units_error``; a
fraction is refused, never floored. Client-supplied bars only ever drive a
preview: a decision to execute is made on the live bars.
"""

from __future__ import annotations

from datetime import datetime
import math
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

SYMBOL_PATTERN = r"^[A-Za-z][A-Za-z0-9.\-]{0,14}$"
MAX_BARS = 4096
# Fractional shares go to the broker with at most this many decimals (core.risk sizes to 6).
FRACTION_DECIMALS = 6
CLIENT_BARS_EXECUTE = ("client bars are for previews only: executed decisions use the live bars; omit bars to "
                       "execute, or send execute: false for a preview on your bars")

# A JSON number (an int is a number too); never a string or a boolean.
Money = Annotated[float, Field(strict=True)]
# A JSON boolean; never "yes", 1, "1" or "on".
Flag = Annotated[bool, Field(strict=True)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, str_strip_whitespace=True)


class BarIn(_Body):
    ts: datetime = Field(description="bar open time; ISO 8601, UTC if no offset")
    open: Money = Field(gt=0)
    high: Money = Field(gt=0)
    low: Money = Field(gt=0)
    close: Money = Field(gt=0)
    volume: Money = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> "BarIn":
        if self.high < max(self.open, self.close):
            raise ValueError("high is below open or close")
        if self.low > min(self.open, self.close):
            raise ValueError("low is above open or close")
        return self


class DecisionRequest(_Body):
    symbol: str = Field(pattern=SYMBOL_PATTERN, description="e.g. SPY")
    # Before bars: bars' validator reads it.
    execute: Flag = Field(False, description="send the order through the risk manager to the broker (a JSON "
                          "boolean); only with the live bars, never with client bars")
    bars: list[BarIn] | None = Field(
        None, max_length=MAX_BARS,
        description="bars to decide on, oldest first; omit to use the feed router's latest window",
    )
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

    @field_validator("bars")
    @classmethod
    def _no_client_bars_to_execute(cls, v: list[BarIn] | None, info: ValidationInfo) -> list[BarIn] | None:
        # Client bars would set the price an order is sized and risk-checked on (a close at 0.04 sized 125,282 SPY).
        if v is not None and info.data.get("execute") is True:
            raise ValueError(CLIENT_BARS_EXECUTE)
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
    position: Money = Field(ge=-1, le=1, description="target position in [-1, 1]")
    confidence: Money = Field(ge=0, le=1)
    ttl_s: Money = Field(300, gt=0, le=86_400, description="how long the signal counts")

    @field_validator("symbol")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()


class OrderRequest(_Body):
    symbol: str = Field(pattern=SYMBOL_PATTERN)
    side: Literal["BUY", "SELL"]
    quantity: Money = Field(gt=0, le=1e9, description="shares, a JSON number; whole where the account trades "
                            "whole shares (risk.whole_shares)")
    account: str = Field("default", pattern=r"^[a-z0-9_\-]{1,32}$")
    client_order_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_\-]{8,64}$")
    confidence: Money = Field(1.0, ge=0, le=1)
    stop_loss: Money | None = Field(None, gt=0)
    take_profit: Money | None = Field(None, gt=0)

    @field_validator("symbol")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    def units_error(self, whole_shares: bool) -> str | None:
        """Why ``quantity`` cannot be traded as sent by an account with ``whole_shares``, or None."""
        q = self.quantity
        if whole_shares:
            if q != math.floor(q):
                lo = math.floor(q)
                send = f"{lo} or {lo + 1}" if lo >= 1 else "1"
                return (f"quantity: {q!r} is not a whole number of shares; account '{self.account}' trades whole "
                        f"shares (risk.whole_shares), so send {send}")
            return None
        # The shortest decimal that reads back as q: what the client wrote.
        if -Decimal(repr(q)).as_tuple().exponent > FRACTION_DECIMALS:
            return (f"quantity: {q!r} has more than {FRACTION_DECIMALS} decimals; send it rounded to "
                    f"{FRACTION_DECIMALS} (orders are never rounded for you)")
        return None


class HaltRequest(_Body):
    reason: str = Field("manual halt", min_length=1, max_length=500)
    account: str | None = Field(None, pattern=r"^[a-z0-9_\-]{1,32}$")


class PromoteRequest(_Body):
    version: int = Field(ge=1, strict=True, description="the registry version to make production (a JSON integer)")
