"""raytrade's one settings object.

Settings come from, in rising priority: the sections' defaults, a TOML file
(``raytrade.toml`` in the working directory, or the one named by ``--config`` or
``RAYTRADE_CONFIG``), secret files in ``RAYTRADE_SECRETS_DIR``, and ``RAYTRADE_*``
environment variables (nested fields joined by ``__``, for example
``RAYTRADE_RISK__MAX_DAILY_LOSS=0.03`` or ``RAYTRADE_ALPACA__API_KEY=...``).

Every secret is a ``SecretStr``: it prints as ``***`` in ``repr``, ``str``,
logs, ``raytrade config show`` and status. A bad value fails at start-up with
one line naming the field, the value and what is allowed (``SettingsError``,
which the CLI turns into exit code 2).

The sections themselves (``[store]``, ``[feeds]``, ``[serve]``, ...) are in
``cluster.sections``, the risk limits in ``core.risk_limits``; their names are
importable from here too, as ``Settings`` uses them.

This module is not where limits are enforced; the risk manager does that.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cluster.sections import (
    AccountSettings,
    AlpacaSettings,
    ApiKey,
    BrokerSettings,
    EnsembleSettings,
    FeedSettings,
    LearnerSettings,
    LogSettings,
    RaySettings,
    ResilienceSettings,
    SchedulerSettings,
    ServeSettings,
    StoreSettings,
)
from core.risk_limits import RiskLimits

DEFAULT_CONFIG_FILE = "raytrade.toml"
REDACTED = "***"


class SettingsError(ValueError):
    """A setting has a value raytrade cannot run with; the message is one line."""


def _default_accounts() -> dict[str, AccountSettings]:
    return {"default": AccountSettings()}


class Settings(BaseSettings):
    """Everything raytrade can be told. One object, validated once, passed down."""

    model_config = SettingsConfigDict(
        env_prefix="RAYTRADE_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        case_sensitive=False,
    )

    risk: RiskLimits = Field(default_factory=RiskLimits)
    resilience: ResilienceSettings = Field(default_factory=ResilienceSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    alpaca: AlpacaSettings = Field(default_factory=AlpacaSettings)
    feeds: FeedSettings = Field(default_factory=FeedSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    api_keys: list[ApiKey] = Field(default_factory=list)
    ray: RaySettings = Field(default_factory=RaySettings)
    scheduler: SchedulerSettings = Field(default_factory=SchedulerSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    ensemble: EnsembleSettings = Field(default_factory=EnsembleSettings)
    broker: BrokerSettings = Field(default_factory=BrokerSettings)
    accounts: dict[str, AccountSettings] = Field(default_factory=_default_accounts, min_length=1)
    learner: LearnerSettings = Field(default_factory=LearnerSettings)

    @model_validator(mode="after")
    def _alpaca_keys_paired(self) -> "Settings":
        a = self.alpaca
        if (a.api_key is None) != (a.secret_key is None):
            raise ValueError("alpaca.api_key and alpaca.secret_key must be given together")
        if "alpaca" in self.feeds.sources and not a.enabled:
            raise ValueError("feeds.sources lists alpaca but alpaca.api_key/secret_key are not set")
        return self

    @model_validator(mode="after")
    def _accounts_valid(self) -> "Settings":
        for name, acc in self.accounts.items():
            if not name or not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"account name {name!r}: use letters, digits, - and _")
            try:
                self.risk_limits_for(name)
            except ValidationError as e:
                first = e.errors()[0]
                raise ValueError(f"accounts.{name}.risk.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
            if acc.kind == "alpaca" and (acc.api_key or self.alpaca.api_key) is None:
                raise ValueError(f"account {name!r} is an alpaca account but no api_key/secret_key is set")
            if (acc.api_key is None) != (acc.secret_key is None):
                raise ValueError(f"accounts.{name}.api_key and secret_key must be given together")
        return self

    def risk_limits_for(self, account: str) -> RiskLimits:
        """The top-level risk limits with the account's overrides on top."""
        acc = self.accounts.get(account)
        if acc is None:
            raise KeyError(f"unknown account {account!r}; accounts are {', '.join(self.accounts)}")
        if not acc.risk:
            return self.risk
        return RiskLimits(**{**self.risk.model_dump(), **acc.risk})

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment beats the file (passed as init kwargs): an operator
        # overrides one value for one run without editing the file.
        return env_settings, file_secret_settings, init_settings

    # -- secrets ---------------------------------------------------------------
    def secret_values(self) -> list[str]:
        """Every secret's plain value, so log filters can scrub them."""
        out: list[str] = []

        def walk(obj: Any) -> None:
            if isinstance(obj, SecretStr):
                v = obj.get_secret_value()
                if v:
                    out.append(v)
            elif isinstance(obj, BaseModel):
                for name in type(obj).model_fields:
                    walk(getattr(obj, name))
            elif isinstance(obj, (list, tuple)):
                for x in obj:
                    walk(x)
            elif isinstance(obj, dict):
                for x in obj.values():
                    walk(x)

        walk(self)
        return out

    def redacted(self) -> dict[str, Any]:
        """The effective settings as plain data, secrets as ``***``."""
        return json.loads(self.model_dump_json())  # SecretStr dumps as '**********'

    def show(self) -> str:
        data = self.redacted()
        text = json.dumps(data, indent=2, sort_keys=False)
        return text.replace('"**********"', f'"{REDACTED}"')


def _describe_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if p != "__root__") or "settings"
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    value = first.get("input")
    if isinstance(value, dict) or first.get("type") == "extra_forbidden":
        shown = ""
    else:
        shown = f"={value!r}"
        # Never echo a secret back, even a malformed one.
        if any(k in loc for k in ("key", "secret", "password", "token")):
            shown = f"={REDACTED}"
    if first.get("type") == "extra_forbidden":
        msg = "unknown setting; see `raytrade config show` for the valid names"
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"invalid setting {loc}{shown} from {source}: {msg}{more}"


def load_settings(path: str | os.PathLike[str] | None = None, *, use_file: bool = True, **overrides: Any) -> Settings:
    """Read settings from the file (if any) with environment overrides.

    ``path`` defaults to ``RAYTRADE_CONFIG`` or ``./raytrade.toml`` when present.
    Raises ``SettingsError`` with a one-line message on any bad value.
    """
    explicit = path is not None or "RAYTRADE_CONFIG" in os.environ
    cfg_path = Path(path or os.environ.get("RAYTRADE_CONFIG") or DEFAULT_CONFIG_FILE)
    data: dict[str, Any] = {}
    source = "defaults/environment"
    if use_file and cfg_path.exists():
        try:
            data = tomllib.loads(cfg_path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise SettingsError(f"config file {cfg_path} is not valid TOML: {e}") from None
        source = f"{cfg_path} or environment"
    elif use_file and explicit:
        raise SettingsError(f"config file {cfg_path} does not exist")
    _deep_merge(data, overrides)
    secrets_dir = os.environ.get("RAYTRADE_SECRETS_DIR")
    try:
        if secrets_dir:
            return Settings(_secrets_dir=secrets_dir, **data)
        return Settings(**data)
    except ValidationError as e:
        raise SettingsError(_describe_error(e, source)) from None


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
