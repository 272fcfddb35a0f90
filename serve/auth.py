"""API keys, roles and the per-key rate limit of the decision endpoint.

Keys come from settings (``api_keys``: name, key, role). Only their SHA-256
hashes are kept once the app starts; a request's key is hashed and compared in
constant time. Roles are ordered ``read < trade < admin``: a route names the
least role it needs. No key gives 401, a key without the role gives 403;
neither message echoes the key.

The rate limit is a token bucket per key and per ingress replica
(``rate_per_s`` tokens a second, bursts up to ``burst``); past it a request
gets 429 with ``Retry-After``.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from dataclasses import dataclass, field
from typing import Any

ROLES = {"read": 1, "trade": 2, "admin": 3}


class AuthError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class KeyRing:
    """Hashed keys -> (name, role); per-key token buckets."""

    hashes: dict[str, tuple[str, str]]
    rate_per_s: float = 50.0
    burst: float = 100.0
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, api_keys: list[Any], rate_per_s: float = 50.0, burst: float = 100.0) -> "KeyRing":
        hashes = {}
        for k in api_keys:
            hashes[_hash(k.key.get_secret_value())] = (k.name, k.role)
        return cls(hashes, rate_per_s, burst)

    def authenticate(self, presented: str | None, need: str) -> tuple[str, str]:
        """(key name, role) for a key with at least role ``need``; raises AuthError."""
        if not presented:
            raise AuthError(401, "missing API key: send it in the X-API-Key header (or Authorization: Bearer)")
        h = _hash(presented)
        found = None
        for known, who in self.hashes.items():
            if hmac.compare_digest(known, h):
                found = who
        if found is None:
            raise AuthError(401, "unknown API key")
        name, role = found
        if ROLES[role] < ROLES[need]:
            raise AuthError(403, f"key '{name}' has role '{role}'; this route needs '{need}'")
        self._take(name)
        return name, role

    def _take(self, name: str) -> None:
        now = time.monotonic()
        with self._lock:
            b = self._buckets.get(name)
            if b is None:
                b = self._buckets[name] = _Bucket(self.burst, now)
            b.tokens = min(self.burst, b.tokens + (now - b.updated) * self.rate_per_s)
            b.updated = now
            if b.tokens < 1:
                wait = (1 - b.tokens) / self.rate_per_s
                raise AuthError(429, f"rate limit of {self.rate_per_s:g} requests/s exceeded; retry in {wait:.2f}s", wait)
            b.tokens -= 1


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_from_headers(headers: Any) -> str | None:
    k = headers.get("x-api-key")
    if k:
        return k.strip()
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return None
