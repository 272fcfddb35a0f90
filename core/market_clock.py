"""The market clock: which trading day a bar belongs to, by an exchange calendar. No Ray.

The risk "day" (day P&L, the daily loss halt, the daily report) follows the
bars' own exchange time, never the machine's wall clock, so a replay of
2024-01-02 behaves as that day's market would, and a wall-clock midnight in
the middle of a session changes nothing.

``trading_day(ts_ns, calendar)`` is the ISO date of the exchange session the
bar at ``ts_ns`` falls in; a bar outside every session (after the close, at
the weekend, on a holiday) counts for the last session before it, so an
after-hours bar never starts a new day. Calendars are ``exchange_calendars``'
(``"XNYS"``: the New York Stock Exchange, ``"XLON"``, ...; its holidays and
early closes included). ``"24/7"`` (crypto, synthetic markets that never
close) is the bar's UTC date. A bar outside the calendar's range (about 20
years back to one ahead) falls back to its UTC date, and so does no bar at
all (``ts_ns`` None: the wall clock's date).

Not here: the limits that use the day (``core.risk``), where the bar time
comes from (the broker's ledger, ``actors.broker``).
"""

from __future__ import annotations

import functools
from datetime import datetime, timezone
from typing import Any

import pandas as pd

ALWAYS_OPEN = "24/7"


@functools.lru_cache(maxsize=8)
def calendar(name: str) -> Any:
    """The ``exchange_calendars`` calendar ``name``; ``ValueError`` naming the known ones if there is none."""
    # Imported here: exchange_calendars takes about 2 s to import, and only a running risk manager needs it.
    import exchange_calendars as xc

    try:
        return xc.get_calendar(name)
    except xc.errors.InvalidCalendarName:
        known = ", ".join(sorted(n for n in xc.get_calendar_names(include_aliases=False) if n.startswith("X"))[:12])
        raise ValueError(f"market calendar {name!r} is not known; use {ALWAYS_OPEN!r} or an exchange code "
                         f"such as {known}, ...") from None


def trading_day(ts_ns: int | None, calendar_name: str) -> str:
    """The ISO date of the trading day the bar at ``ts_ns`` (epoch ns, UTC) belongs to (see the module)."""
    if ts_ns is None or ts_ns <= 0:
        return datetime.now(timezone.utc).date().isoformat()
    ts = pd.Timestamp(int(ts_ns), tz="UTC")
    if calendar_name == ALWAYS_OPEN:
        return ts.date().isoformat()
    cal = calendar(calendar_name)
    minute = ts.floor("min")
    if not cal.first_minute <= minute <= cal.last_minute:
        return ts.date().isoformat()
    return cal.minute_to_session(minute, direction="previous").date().isoformat()
