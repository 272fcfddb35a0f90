"""One logging configuration for the driver and every actor, with secrets scrubbed.

``configure_logging(settings)`` sets the ``raytrade`` logger tree (one child
per component: ``raytrade.feeds``, ``raytrade.router``, ...) to text or JSON and
installs a filter that replaces every secret value from settings with ``***``
in the message and its arguments, whichever component logs it. The same
choice of format and level is handed to Ray as its ``LoggingConfig`` so
actors' logs land in Ray's log files and dashboard in the same shape.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

REDACTED = "***"
_SECRETS: set[str] = set()


def get_logger(component: str) -> logging.Logger:
    return logging.getLogger(f"raytrade.{component}")


def add_secrets(values: list[str]) -> None:
    """Register values that must never appear in a log line."""
    # Very short values would scrub ordinary words; settings refuse none, so
    # only skip the empty string.
    _SECRETS.update(v for v in values if v)


def scrub(text: str) -> str:
    for s in sorted(_SECRETS, key=len, reverse=True):
        if s in text:
            text = text.replace(s, REDACTED)
    return text


class SecretFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if _SECRETS:
            try:
                msg = record.getMessage()
            except Exception:  # noqa: BLE001 - a bad format string is still logged
                msg = str(record.msg)
            record.msg = scrub(msg)
            record.args = None
            if record.exc_info and not record.exc_text:
                record.exc_text = logging.Formatter().formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = scrub(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info or record.exc_text:
            out["exc"] = scrub(record.exc_text or self.formatException(record.exc_info))
        return json.dumps(out)


_HANDLER_NAME = "raytrade"


def configure_logging(settings: Any | None = None, level: str | None = None, fmt: str | None = None) -> None:
    """Configure the ``raytrade`` loggers once per process (idempotent)."""
    if settings is not None:
        add_secrets(settings.secret_values())
        level = level or settings.log.level
        fmt = fmt or settings.log.format
    level = level or "INFO"
    fmt = fmt or "text"
    root = logging.getLogger("raytrade")
    root.setLevel(level)
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(
        JsonFormatter() if fmt == "json" else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(SecretFilter())
    root.addHandler(handler)
    root.propagate = False
    # Libraries that may log request details (URLs with keys, headers).
    for noisy in ("urllib3", "websockets", "alpaca"):
        lg = logging.getLogger(noisy)
        if not any(isinstance(f, SecretFilter) for f in lg.filters):
            lg.addFilter(SecretFilter())


def ray_logging_config(settings: Any) -> Any:
    """Ray's ``LoggingConfig`` matching our format and level."""
    import ray

    return ray.LoggingConfig(encoding="JSON" if settings.log.format == "json" else "TEXT", log_level=settings.log.level)
