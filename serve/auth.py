"""API keys, roles, the per-key rate limit and the throttle on wrong keys of the decision endpoint.

Keys come from settings (``api_keys``: name, key, role). Only their SHA-256
hashes are kept once the app starts; a request's key is hashed and compared in
constant time. Roles are ordered ``read < trade < admin``: a route names the
least role it needs. No key gives 401, a key without the role gives 403;
neither message echoes the key.

Every ``/v1`` route takes its caller from ``RequireKey``, a FastAPI security
dependency (the key in ``X-API-Key`` or ``Authorization: Bearer``), so no route
runs without a key; ``serve.gate`` also screens ``/v1`` requests before their
body is read, with the same ``KeyRing.identify``.

Two limits, both per ingress replica and in bounded memory:

- the rate limit is a token bucket per key (``rate_per_s`` tokens a second,
  bursts up to ``burst``); past it a request gets 429 with ``Retry-After``;
- wrong keys are throttled per client address (``FailedAuthThrottle``): an
  address that has sent ``AUTH_FAILURE_BURST`` wrong keys gets 429 with
  ``Retry-After`` for every key, right or wrong, until its count leaks away
  (one attempt back every ``1 / AUTH_FAILURE_REFILL_PER_S`` seconds). A
  missing key is refused but not counted: it guesses nothing. The address is
  the connection's peer; ``X-Forwarded-For`` is not trusted (``client_address``).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

ROLES = {"read": 1, "trade": 2, "admin": 3}

# Wrong keys an address may send at once, and how fast it earns attempts back.
# Constants, not settings: an operator has no reason to loosen them, and 20
# guesses then one every 2 s is nothing against a 128-bit key while a person
# who mistyped a key is never held up for more than 2 s.
AUTH_FAILURE_BURST = 20
AUTH_FAILURE_REFILL_PER_S = 0.5
# Addresses remembered at once; the least recently seen is forgotten first.
AUTH_FAILURE_ADDRESSES = 10_000

STATUS_ERROR = {401: "unauthorized", 403: "forbidden", 429: "too many requests"}


class AuthError(Exception):
    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def error(self) -> str:
        return STATUS_ERROR.get(self.status, "unauthorized")

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": f"{max(1, math.ceil(self.retry_after))}"} if self.retry_after else None


@dataclass(frozen=True)
class Caller:
    """Whoever a request's key belongs to."""

    name: str
    role: str

    def require(self, need: str) -> None:
        """403 unless this caller's role is at least ``need``."""
        if ROLES[self.role] < ROLES[need]:
            raise AuthError(403, f"key '{self.name}' has role '{self.role}'; this route needs '{need}'")


@dataclass
class _Bucket:
    tokens: float
    updated: float


class FailedAuthThrottle:
    """Wrong keys per client address: a leaky bucket of ``burst`` attempts, ``per_s`` coming back a second."""

    def __init__(self, burst: float = AUTH_FAILURE_BURST, per_s: float = AUTH_FAILURE_REFILL_PER_S,
                 max_addresses: int = AUTH_FAILURE_ADDRESSES, clock: Callable[[], float] = time.monotonic):
        self.burst, self.per_s, self.max_addresses, self.clock = float(burst), float(per_s), max_addresses, clock
        self._failures: OrderedDict[str, _Bucket] = OrderedDict()  # address -> wrong keys not yet leaked away
        self._lock = threading.Lock()

    def _level(self, address: str, now: float) -> _Bucket | None:
        b = self._failures.get(address)
        if b is None:
            return None
        b.tokens = max(0.0, b.tokens - (now - b.updated) * self.per_s)
        b.updated = now
        if b.tokens == 0.0:
            del self._failures[address]
            return None
        return b

    def check(self, address: str | None) -> None:
        """429 when ``address`` has no attempts left."""
        if address is None:
            return
        with self._lock:
            b = self._level(address, self.clock())
            if b is not None and b.tokens + 1 > self.burst:
                wait = (b.tokens + 1 - self.burst) / self.per_s
                raise AuthError(429, f"too many wrong API keys from {address}; every key from there is refused "
                                f"for {wait:.1f}s more: check the key before retrying", wait)

    def failed(self, address: str | None) -> None:
        if address is None:
            return
        with self._lock:
            now = self.clock()
            b = self._level(address, now)
            if b is None:
                b = self._failures[address] = _Bucket(0.0, now)
                while len(self._failures) > self.max_addresses:
                    self._failures.popitem(last=False)
            self._failures.move_to_end(address)
            b.tokens = min(self.burst, b.tokens + 1)

    def __len__(self) -> int:
        return len(self._failures)


@dataclass
class KeyRing:
    """Hashed keys -> (name, role); per-key token buckets; the wrong-key throttle."""

    hashes: dict[str, tuple[str, str]]
    rate_per_s: float = 50.0
    burst: float = 100.0
    throttle: FailedAuthThrottle = field(default_factory=FailedAuthThrottle)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(cls, api_keys: list[Any], rate_per_s: float = 50.0, burst: float = 100.0) -> "KeyRing":
        hashes = {}
        for k in api_keys:
            hashes[_hash(k.key.get_secret_value())] = (k.name, k.role)
        return cls(hashes, rate_per_s, burst)

    def identify(self, presented: str | None, address: str | None = None) -> Caller:
        """The caller a key belongs to; 429 for a throttled address, 401 for a missing or unknown key.

        Takes no rate-limit token (``authenticate`` does): the screen before a
        body is read and the route's dependency both ask, for one request.
        """
        self.throttle.check(address)
        if not presented:
            raise AuthError(401, "missing API key: send it in the X-API-Key header (or Authorization: Bearer)")
        h = _hash(presented)
        found = None
        for known, who in self.hashes.items():
            if hmac.compare_digest(known, h):
                found = who
        if found is None:
            self.throttle.failed(address)
            raise AuthError(401, "unknown API key: check the key you were given (X-API-Key header)")
        return Caller(*found)

    def authenticate(self, presented: str | None, need: str, address: str | None = None) -> Caller:
        """The caller of a key with at least role ``need``, with one rate-limit token taken; raises AuthError."""
        caller = self.identify(presented, address)
        caller.require(need)
        self._take(caller.name)
        return caller

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
                raise AuthError(429, f"rate limit of {self.rate_per_s:g} requests/s exceeded; retry in {wait:.2f}s",
                                wait)
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


# The address wrong keys are counted against for a request that carries X-Forwarded-For.
FORWARDED = "any client sending X-Forwarded-For"


def client_address(scope: dict) -> str | None:
    """The client address wrong keys are counted against: the connection's peer, never a header.

    Serve's proxy (uvicorn) replaces the peer with the last X-Forwarded-For
    entry when the connection comes from a host it trusts (loopback, by
    default), so on loopback any client could name itself anew on each
    guess. A request that carries the header is therefore counted under one
    shared address, ``FORWARDED``, whatever the header says.
    """
    if any(k == b"x-forwarded-for" for k, _ in scope.get("headers", ())):
        return FORWARDED
    client = scope.get("client")
    return client[0] if client else None


API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="ApiKey",
                              description="an API key from settings (api_keys); roles read < trade < admin")
BEARER = HTTPBearer(auto_error=False, scheme_name="Bearer", description="the same API key as a bearer token")


class RequireKey:
    """FastAPI security dependency: the request's ``Caller``, with at least role ``need``.

    ``need=None`` makes the key optional (the health pages): no key gives
    ``None``; a key that is sent must still be right. ``keys`` finds the
    replica's ``KeyRing`` at request time.
    """

    def __init__(self, keys: Callable[[], KeyRing], need: str | None):
        if need is not None and need not in ROLES:
            raise ValueError(f"unknown role {need!r}; roles: {', '.join(ROLES)}")
        self.keys, self.need = keys, need

    async def __call__(self, request: Request, api_key: str | None = Security(API_KEY_HEADER),
                       bearer: HTTPAuthorizationCredentials | None = Security(BEARER)) -> Caller | None:
        presented = (api_key or "").strip() or (bearer.credentials.strip() if bearer else None)
        if self.need is None:
            if not presented:
                return None
            return self.keys().authenticate(presented, "read", client_address(request.scope))
        return self.keys().authenticate(presented, self.need, client_address(request.scope))
