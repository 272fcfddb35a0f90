"""The operator dashboard's server side: the page, the one call it polls, and backtest reports.

The page (``serve/static/dashboard.html``, one file, no build step, nothing
fetched from the internet) is served at ``GET /ui`` without a key; with no
key it shows only health (``/health/detailed``, ``/health/alerts``), which
without a key is each component's status and when and where an alert was
raised, nothing about the accounts. With a key it polls ``GET /v1/ui/state`` about once a second, which gathers in one
call what the page shows: feeds and their failovers, the ensemble and the
registry, decisions, positions, orders, equity, risk, the scheduler and the
latest backtest reports. Its controls use the ordinary admin routes
(``/v1/risk/halt|resume``, ``/v1/models/{name}/promote|rollback``), so the
page can do nothing a key could not do with curl.

Two numbers exist only here, both from this ingress replica's memory:

- the equity curve is sampled from the accounts' equity when the state is
  read (at most once a second), so it covers the time a page was open;
- a member's recent accuracy is the share of this replica's recent decisions
  where the member's direction matched the next bar's return.

What the page shows of health is ``serve.health``'s component view, the
same the health routes read; the rest (the live windows, recent decisions,
counts) is passed in by the ingress.

Not here: the routes themselves (``serve.app``), risk rules, the registry.
"""

from __future__ import annotations

import asyncio
import base64
import html
import re
import time
from collections import deque
from pathlib import Path
from typing import Any, Mapping, Sequence

from cluster import names
from cluster.runtime import REPO_ROOT
from serve.health import HealthView, account_names, overall_status, safe

PAGE = Path(__file__).with_name("static") / "dashboard.html"
# Where `raytrade backtest` writes by default (``reports/<name>/index.html``).
REPORTS_DIR = REPO_ROOT / "reports"
REPORT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=:+,-]{0,199}$")
# The page loads nothing but itself and talks to this origin only; the browser enforces it.
UI_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "img-src data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}
ORDER_FIELDS = ("client_order_id", "symbol", "side", "qty", "status", "reason", "created_at", "filled_at", "fill_price",
                "stop_loss", "take_profit")
EQUITY_POINTS = 3600
EQUITY_EVERY_S = 1.0


def page_html() -> str:
    return PAGE.read_text(encoding="utf-8")


class EquityHistory:
    """Equity per account, sampled when the dashboard reads the state."""

    def __init__(self, maxlen: int = EQUITY_POINTS, every_s: float = EQUITY_EVERY_S):
        self.every_s = every_s
        self.maxlen = maxlen
        self._points: dict[str, deque] = {}

    def sample(self, account: str, equity: Any, now: float | None = None) -> None:
        if not isinstance(equity, (int, float)):
            return
        now = time.time() if now is None else now
        pts = self._points.setdefault(account, deque(maxlen=self.maxlen))
        if pts and now - pts[-1][0] < self.every_s:
            return
        pts.append((round(now, 3), float(equity)))

    def series(self, account: str) -> list[list[float]]:
        return [list(p) for p in self._points.get(account, ())]


def member_accuracy(recent: list[dict[str, Any]], windows: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per member: how often its direction matched the return of the bar after the decision.

    Only decisions whose next bar has arrived, and members with a non-zero
    position, count; a flat bar counts for nobody.
    """
    out: dict[str, dict[str, Any]] = {}
    for d in recent:
        w = windows.get(d.get("symbol"))
        lb = d.get("last_bar") or {}
        seq = lb.get("seq")
        if not w or seq is None or not d.get("members"):
            continue
        nxt = next((b for b in w if b.get("seq") is not None and b["seq"] > seq and b["symbol"] == d["symbol"]), None)
        if nxt is None or not lb.get("close"):
            continue
        realised = float(nxt["close"]) / float(lb["close"]) - 1.0
        if realised == 0:
            continue
        for name, m in d["members"].items():
            p = m.get("position") or 0.0
            if p == 0:
                continue
            o = out.setdefault(name, {"hits": 0, "n": 0})
            o["n"] += 1
            o["hits"] += int((p > 0) == (realised > 0))
    for o in out.values():
        o["accuracy"] = round(o["hits"] / o["n"], 4)
    return out


def latest_reports(root: Path = REPORTS_DIR, limit: int = 10) -> list[dict[str, Any]]:
    """The newest backtest reports (folders holding ``index.html``), newest first."""
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        index = d / "index.html"
        if d.is_dir() and REPORT_NAME.match(d.name) and index.is_file():
            found.append((index.stat().st_mtime, d.name, index))
    out = []
    for mtime, name, index in sorted(found, reverse=True)[:limit]:
        head = index.read_text(encoding="utf-8", errors="replace")[:4000]
        m = re.search(r"<title>(.*?)</title>", head, re.S)
        out.append({"name": name, "title": _unescape(m.group(1)) if m else name, "modified": mtime})
    return out


def _unescape(s: str) -> str:
    return html.unescape(s.strip())


def report_page(name: str, root: Path = REPORTS_DIR) -> str | None:
    """A report's ``index.html`` with its PNGs inlined, so it opens from one authenticated fetch.

    None when there is no such report; ``name`` is one folder name, never a path.
    """
    if not REPORT_NAME.match(name) or ".." in name:
        return None
    d = (root / name).resolve()
    index = d / "index.html"
    if d.parent != root.resolve() or not index.is_file():
        return None
    page = index.read_text(encoding="utf-8", errors="replace")

    def inline(m: re.Match) -> str:
        png = d / m.group(2)
        if not png.is_file():
            return m.group(0)
        data = base64.b64encode(png.read_bytes()).decode()
        return f"src={m.group(1)}data:image/png;base64,{data}{m.group(1)}"

    return re.sub(r"src=(['\"])([A-Za-z0-9_.-]+\.png)\1", inline, page)


async def _none() -> None:
    return None


def _registry_rows(records: Any) -> Any:
    if not isinstance(records, list):
        return records
    keep = ("kind", "window", "parent_version", "holdout_hit_rate", "tags")
    return [{**{k: r.get(k) for k in ("name", "version", "task", "kind", "stage", "created_at", "metrics", "flags",
                                      "size")},
             "metadata": {k: v for k, v in (r.get("metadata") or {}).items() if k in keep}} for r in records]


async def ui_state(health: HealthView, equity: EquityHistory, windows: Mapping[str, Sequence[dict[str, Any]]],
                   recent: list[dict[str, Any]], counts: dict[str, Any], role: str) -> dict[str, Any]:
    """Everything the page shows, in one answer.

    ``health``: the replica's component view (and its actor handles and
    alerts); ``equity``: the curve this replica samples; ``windows``: the live
    bar windows; ``recent``: the replica's recent decisions, newest first;
    ``counts``: its decision and rejection counts.
    """
    comps = await health.components()
    handles = health.handles
    router = handles.get(names.router())
    reg = handles.get(names.REGISTRY)
    sched = handles.get(names.SCHEDULER)
    accounts = account_names(health.settings)
    risks = {a: handles.get(names.risk(a)) for a in accounts}
    router_h, registry, scheduler, *per_acct = await asyncio.gather(
        safe(router.health.remote()) if router else _none(),
        safe(reg.list.remote()) if reg else _none(),
        safe(sched.status.remote(10)) if sched else _none(),
        *[safe(r.positions.remote()) if r else _none() for r in risks.values()],
        *[safe(r.orders.remote(20)) if r else _none() for r in risks.values()],
    )
    positions = dict(zip(accounts, per_acct[:len(accounts)]))
    orders = {a: [{k: o.get(k) for k in ORDER_FIELDS} for o in os] if isinstance(os, list) else os
              for a, os in zip(accounts, per_acct[len(accounts):])}
    now = time.time()
    curves = {}
    for a in accounts:
        rs = comps.get(names.risk(a)) or {}
        equity.sample(a, rs.get("equity"), now)
        curves[a] = equity.series(a)
    symbols = {}
    for s, w in sorted(windows.items()):
        if w:
            b = w[-1]
            symbols[s] = {"source": b.get("source"), "seq": b.get("seq"), "ts": b.get("ts"), "close": b.get("close"),
                          "bars": len(w)}
    reports = await asyncio.to_thread(latest_reports)
    return {
        "role": role,
        "at": now,
        "health": {"status": overall_status(comps), "components": {n: c.get("status") for n, c in comps.items()}},
        "alerts": health.alerts.recent(30),
        "feeds": {"symbols": symbols, "router": router_h},
        "ensemble": comps.get("ensemble"),
        "accuracy": member_accuracy(recent, windows),
        "registry": _registry_rows(registry),
        "decisions": recent[:25],
        "counts": counts,
        "accounts": {a: {"risk": comps.get(names.risk(a)), "broker": comps.get(names.broker(a)),
                         "positions": positions[a], "orders": orders[a], "equity": curves[a]} for a in accounts},
        "scheduler": scheduler,
        "reports": reports,
    }
