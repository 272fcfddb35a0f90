"""The decision rule (core.decision), on numbers worked by hand."""

from __future__ import annotations

import pytest

from core.decision import MIN_POSITION_CHANGE, action_for, blend, hold_verdict, unavailable_signal


def test_blend_weighs_the_outside_signal_and_clips():
    assert blend({"position": 0.4, "confidence": 0.8}) == (0.4, 0.8)
    # 0.75 * 0.4 + 0.25 * (-1.0) = 0.05; 0.75 * 0.8 + 0.25 * 0.4 = 0.7
    t, c = blend({"position": 0.4, "confidence": 0.8}, {"position": -1.0, "confidence": 0.4}, 0.25)
    assert t == pytest.approx(0.05) and c == pytest.approx(0.7)
    assert blend({"position": 1.5, "confidence": 1.0}) == (1.0, 1.0)  # clipped to the limit
    assert blend({"position": None, "confidence": None}) == (0.0, 0.0)  # no signal: flat, no confidence


@pytest.mark.parametrize("target, current, hold, action", [
    (0.5, 0.0, False, "BUY"),
    (-0.5, 0.0, False, "SELL"),
    (0.0, 0.5, False, "SELL"),
    (0.5, 0.5 - MIN_POSITION_CHANGE / 2, False, "HOLD"),  # under the minimum change
    (0.5, 0.5 - 2 * MIN_POSITION_CHANGE, False, "BUY"),
    (1.0, 0.0, True, "HOLD"),  # the signal says hold
])
def test_action_for(target, current, hold, action):
    assert action_for(target, current, hold) == action


def test_hold_verdicts_say_why_and_approve_nothing():
    v = hold_verdict(None, 0.52, 0.5)
    assert v["approved"] is False and v["quantity"] == 0.0
    assert v["reasons"] == [f"target +0.52 is within {MIN_POSITION_CHANGE} of the current position +0.50"]
    assert hold_verdict("stale data", 1.0, 0.0)["reasons"] == ["stale data"]
    s = unavailable_signal(TimeoutError())
    assert s["hold"] and s["position"] == 0.0 and "TimeoutError" in s["reason"]
    assert action_for(*blend(s), hold=s["hold"]) == "HOLD"


def test_stale_data_is_a_hold_that_gives_the_bars_age():
    from core.decision import stale_limit_s, stale_signal

    assert stale_limit_s(3, 60.0, 5.0) == 180.0  # three one-minute bars
    assert stale_limit_s(3, 0.2, 5.0) == 5.0  # a fast replay: never sooner than min_stale_s
    s = stale_signal(10.24)
    assert s["reason"] == "stale data: last bar 10.2 s ago" and s["hold"]
    assert action_for(*blend(s), hold=s["hold"]) == "HOLD"
