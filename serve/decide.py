"""A decision as the endpoint makes it: bars -> the ensemble's signal -> target -> action -> risk verdict.

``Decider.decide`` takes the bars from the request (a preview) or the live
window (``serve.live.BarWindows``), asks the ensemble for its fused signal,
blends in an outside signal (``serve.external_weight``) while one is fresh,
and compares the target with the account's current position from its risk
snapshot by the rule in ``core.decision`` (within ``MIN_POSITION_CHANGE`` it
is HOLD). An executed decision's order goes to the account's risk manager;
one that is not carries a preview verdict judged from the snapshot
(``serve.live.RiskSnapshots``).

The ensemble runs in this process by default (``serve.ensemble =
"ingress"``), or one hop away as its own Serve deployment; with
``serve.signal_per_bar`` many callers on one bar cost one ensemble pass.

The decisions this replica made are counted here, for ``/v1/status`` and
the dashboard.

Not here: the routes (``serve.app``), fusion (``core.ensemble``), the rule
that turns a signal and a position into an action (``core.decision``), the
risk rules (``core.risk``).
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from collections import deque
from typing import Any

from actors.ensemble import Ensemble
from cluster.logs import get_logger
from cluster.settings import Settings
from core.decision import ACTIONS, action_for, blend, hold_verdict, stale_limit_s, stale_signal, unavailable_signal
from serve.errors import ApiError
from serve.health import account_names
from serve.live import BarWindows, RiskSnapshots, bar_columns, epoch_ns, sizing_atr
from serve.metrics import ServeMetrics
from serve.schemas import Decision, DecisionRequest, LastBar, MemberContribution, RiskVerdict

log = get_logger("serve")

RECENT_FIELDS = {"decision_id", "symbol", "account", "action", "target_position", "quantity", "confidence", "risk",
                 "executed", "last_bar", "reason", "regime", "members"}
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def _ts(ns: Any) -> datetime.datetime:
    """Epoch nanoseconds as a UTC datetime, to the microsecond (what pandas' ``to_pydatetime`` keeps)."""
    return _EPOCH + datetime.timedelta(microseconds=int(ns) // 1000)


class Decider:
    """Makes and counts this replica's decisions."""

    def __init__(self, settings: Settings, bars: BarWindows, risk: RiskSnapshots, metrics: ServeMetrics,
                 ensemble: Any = None):
        self.settings, self.bars, self.risk, self.metrics = settings, bars, risk, metrics
        # A deployment handle (serve.ensemble = "deployment"), or None: the ensemble runs here.
        self.ensemble = ensemble
        # No wait for company: a lone decision is not held back, and decisions that arrive
        # while a batch runs still form the next batch.
        self._local_ensemble = Ensemble(settings, batch_wait_s=0.0) if ensemble is None else None
        self._signals: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}  # symbol -> ((bar, generation), signal)
        self.external: dict[str, dict[str, Any]] = {}
        self.latencies: deque[float] = deque(maxlen=5000)
        self.counts = dict.fromkeys(ACTIONS, 0)
        self.risk_rejections = 0
        self.recent: deque[Decision] = deque(maxlen=100)  # dumped when read (recent_decisions)
        self.alerts: Any = None  # the health view's Alerts (serve.app sets it): one alert per stale episode
        self.stale_since: dict[str, float] = {}  # symbol -> when its data went stale (an episode)

    # -- the ensemble, here or one hop away --------------------------------------------------
    async def _predict(self, request: dict[str, Any], bar: int | None = None) -> dict[str, Any]:
        """The ensemble's signal for ``request``; ``bar``: the seq of the live window's last bar.

        The signal is a function of the window's bars and the models being
        served, so with ``serve.signal_per_bar`` a decision on a bar the
        ensemble has already answered for (and the same model generation)
        reuses that answer: many callers per bar cost one ensemble pass. An
        answer with a failed member is not kept (the next call may get it).
        """
        local = self._local_ensemble
        if local is None:
            return await self.ensemble.predict_one.remote(request)
        if bar is None or not self.settings.serve.signal_per_bar:
            return await local.predict_one(request)
        key = (bar, local.generation)
        sym = request["symbol"]
        hit = self._signals.get(sym)
        if hit is not None and hit[0] == key:
            return hit[1]
        sig = await local.predict_one(request)
        if not sig.get("failed") and sig.get("generation") == key[1]:
            self._signals[sym] = (key, sig)
        return sig

    async def ensemble_status(self) -> dict[str, Any]:
        if self._local_ensemble is not None:
            return await self._local_ensemble.status()
        return await self.ensemble.status.remote()

    # -- what this replica decided -----------------------------------------------------------
    def recent_decisions(self, n: int = 100) -> list[dict[str, Any]]:
        return [json.loads(d.model_dump_json(include=RECENT_FIELDS)) for d in list(self.recent)[:n]]

    def rejected(self, account: str) -> None:
        """Count an order the risk manager refused."""
        self.risk_rejections += 1
        self.metrics.rejection(account)

    def known_symbols(self) -> set[str]:
        return set(self.settings.risk.allowed_symbols) | set(self.settings.feeds.symbols) | set(self.bars.windows)

    def add_external(self, symbol: str, source: str, position: float, confidence: float, ttl_s: float) -> None:
        """An outside signal for ``symbol``, blended into its decisions for ``ttl_s`` seconds."""
        self.external[symbol] = {"source": source, "position": position, "confidence": confidence,
                                 "expires": time.time() + ttl_s}

    def _stale(self, sym: str) -> float | None:
        """The age of ``sym``'s last bar when it is stale (``core.decision.stale_limit_s``), else None.
        The first stale decision of an episode raises one alert; the first fresh one ends the episode."""
        age = self.bars.age_s(sym)
        s = self.settings
        if age is None or age <= stale_limit_s(s.serve.max_bar_age, s.feeds.bar_interval_s, s.serve.min_stale_s):
            if self.stale_since.pop(sym, None) is not None:
                log.info("%s: fresh data again", sym)
            return None
        if sym not in self.stale_since:
            self.stale_since[sym] = time.time()
            log.warning("%s: stale data: last bar %.1f s ago; decisions HOLD until bars flow", sym, age)
            if self.alerts is not None:
                self.alerts.stale_data(sym, age, self.stale_since[sym])
        return age

    # -- the decision -------------------------------------------------------------------------
    async def decide(self, req: DecisionRequest, execute: bool) -> Decision:
        t0 = time.perf_counter()
        sym = req.symbol
        if sym not in self.known_symbols():
            raise ApiError(422, "unknown symbol", f"{sym} is neither an allowed symbol nor fed; known: "
                           f"{', '.join(sorted(self.known_symbols()))}", ["symbol"])
        if req.bars is not None:
            cols = bar_columns(req.bars, getattr, ts=lambda b: epoch_ns(b.ts))
            atr = sizing_atr(cols)
            last_seq = None
        else:
            w = self.bars.windows.get(sym)
            if not w:
                raise ApiError(503, "no data yet", f"no bars for {sym} have arrived from the feeds yet; "
                               "retry shortly or send bars in the request", ["symbol"])
            cols, atr = self.bars.columns(sym, w)
            last_seq = w[-1].get("seq")
        last_close, last_ts = float(cols["close"][-1]), int(cols["ts"][-1])
        ens_req = {"symbol": sym, "bars": cols}
        stale = None if req.bars is not None else self._stale(sym)
        if stale is not None:  # no order on stale data: HOLD with its age, no ensemble pass
            sig = stale_signal(stale)
        else:
            try:
                sig = await self._predict(ens_req, last_seq)
            except Exception as e:  # noqa: BLE001 - the ensemble is down: HOLD, with the reason
                log.warning("ensemble call failed: %s", e)
                sig = unavailable_signal(e)
        ext = self.external.get(sym)
        if ext is not None and ext["expires"] < time.time():
            self.external.pop(sym, None)
            ext = None
        target, confidence = blend(sig, ext, self.settings.serve.external_weight)
        if req.account not in self.settings.accounts:
            raise ApiError(422, "unknown account", f"no account named {req.account!r}; accounts: "
                           f"{', '.join(account_names(self.settings))}", ["account"])
        snap = await self.risk.get(req.account)
        current = self.risk.position_units(req.account, sym, last_close, snap)
        action = action_for(target, current, hold=bool(sig.get("hold")))
        decision_id = req.decision_id or uuid.uuid4().hex
        order_req = {
            "account": req.account, "symbol": sym, "side": action if action != "HOLD" else None,
            "target_position": target, "confidence": confidence,
            "price": last_close, "atr": atr, "decision_id": decision_id,
            "members": {n: m.get("contribution", 0.0) for n, m in (sig.get("members") or {}).items()},
        }
        order = None
        executed = False
        if action == "HOLD":
            verdict = hold_verdict(sig.get("reason"), target, current)
        elif execute:
            res = await self.risk.call(req.account, "submit", order_req)
            verdict, order = res["verdict"], res.get("order")
            executed = order is not None
            self.risk.drop(req.account)
        else:
            verdict = self.risk.preview_verdict(req.account, order_req, snap)
        if action != "HOLD" and not verdict.get("approved"):
            self.rejected(req.account)
        self.counts[action] += 1
        self.metrics.decision(action)
        ms = (time.perf_counter() - t0) * 1000
        self.latencies.append(ms)
        d = Decision(
            decision_id=decision_id, symbol=sym, account=req.account, action=action, target_position=target,
            current_position=current, quantity=float(verdict.get("quantity") or 0.0), confidence=confidence,
            reason=sig.get("reason"), regime=sig.get("regime"),
            members={n: MemberContribution(**{k: m.get(k) for k in ("position", "contribution", "weight", "version")
                                              if m.get(k) is not None})
                     for n, m in (sig.get("members") or {}).items()},
            failed_members=sig.get("failed") or {}, model_versions=sig.get("model_versions") or {},
            external=None if ext is None else {k: ext[k] for k in ("source", "position", "confidence")},
            risk=RiskVerdict(approved=bool(verdict.get("approved")), reasons=list(verdict.get("reasons") or []),
                             quantity=float(verdict.get("quantity") or 0.0), checks=verdict.get("checks") or {},
                             preview=bool(verdict.get("preview")), state_age_ms=verdict.get("state_age_ms")),
            last_bar=LastBar(seq=last_seq, ts=_ts(last_ts), close=last_close),
            executed=executed, order=order, latency_ms=round(ms, 3),
        )
        self.recent.appendleft(d)
        return d
