"""Reports: written, non-empty, every image they reference exists and is a real PNG of sensible size."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from core.engine import backtest
from core.strategies import sma_crossover
from core.synthetic import generate_bars
from tune.monte_carlo import monte_carlo
from tune.report import write_report
from tune.walk_forward import Costs, walk_forward

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def referenced_images(page: str) -> list[str]:
    return re.findall(r"<img src='([^']+)'", page)


def assert_images_ok(out, names):
    for name in names:
        p = out / name
        assert p.is_file(), name
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, name  # a drawn chart, not an empty canvas
        h, w = plt.imread(p).shape[:2]
        assert w >= 500 and h >= 250, (name, w, h)


def test_backtest_report_without_ray(tmp_path):
    bars = generate_bars(["X"], 400, seed=1, interval="1D")
    r = backtest(bars, sma_crossover(bars, 10, 30), commission=0.001)
    path = write_report(tmp_path / "bt", title="X <sma>", backtest=r)
    page = path.read_text()
    assert referenced_images(page) == ["equity.png"]
    assert_images_ok(path.parent, ["equity.png"])
    assert "X &lt;sma&gt;" in page  # titles are escaped
    assert f"{r.metrics['final_equity']:,.4g}" in page
    with pytest.raises(ValueError, match="nothing to report"):
        write_report(tmp_path / "empty")


@pytest.mark.slow  # tens of seconds on 2 cores: left out of a bare `pytest`, run by `make test`
def test_full_report_references_only_images_that_exist(ray_session, tmp_path):
    bars = generate_bars(["X"], 900, seed=6, interval="1D")
    costs = Costs(commission=0.001)
    wf = walk_forward(bars, "sma_crossover", train=300, test=200, params={"fast": [5, 10, 20], "slow": [40, 80]},
                      costs=costs, storage_path=str(tmp_path / "tune"), name="report-wf")
    mc = monte_carlo(bars, "sma_crossover", {"fast": 10, "slow": 40}, n_paths=60, paths_per_trial=60,
                     horizon=200, costs=costs, storage_path=str(tmp_path / "tune"), name="report-mc")
    r = backtest(bars, sma_crossover(bars, 10, 40), commission=0.001)
    path = write_report(tmp_path / "report", title="X", backtest=r, walk_forward=wf, monte_carlo=mc)
    page = path.read_text()
    images = referenced_images(page)
    assert images == ["equity.png", "oos_equity.png", "params.png", "mc_fan.png", "mc_hist.png"]
    assert_images_ok(path.parent, images)
    # The fold table carries each fold's chosen parameters, the Monte Carlo table each method.
    for row in wf.folds.itertuples():
        assert f"<td>{row.param_fast:,}</td><td>{row.param_slow:,}</td>" in page
    for method in mc.methods:
        assert f"<td>{method}</td>" in page
    assert str(wf.experiment_path) in page and str(mc.experiment_path) in page
    assert np.isfinite(wf.oos_equity).all()


def test_compare_lists_where_paper_fills_differ_and_why(tmp_path):
    """Paper fills built from the backtest's own, then changed in known ways: each change is found,
    with its reason, and nothing else is reported."""
    from tune.report import compare_fills, read_fills
    from tune.walk_forward import Costs

    bars = generate_bars(["X"], 300, seed=1, interval="1D")
    costs = Costs(whole_units=True)
    r = backtest(bars, sma_crossover(bars, 5, 20), **costs.kwargs())
    delta = np.diff(np.concatenate([[0.0], r.units]))
    at = np.flatnonzero(delta)
    assert len(at) >= 6
    ts, opens = bars["ts"].to_numpy(), bars["open"].to_numpy()
    rows = [{"ts": ts[t] + np.timedelta64(1, "m"), "symbol": "X", "side": "buy" if delta[t] > 0 else "sell",
             "qty": abs(delta[t]), "price": opens[t]} for t in at]
    rows[1]["price"] *= 1.001                                    # 10 bps above the backtest's price
    rows[2]["qty"] += 1                                          # one unit more
    late = at[3] + 1
    rows[3]["ts"], rows[3]["price"] = ts[late], opens[late]      # filled a bar late
    fills_path = tmp_path / "fills.csv"
    pd.DataFrame(rows).to_csv(fills_path, index=False)
    diff = compare_fills(bars, r, read_fills(fills_path, "X"), costs)
    by_bar = dict(zip(diff.differences.bar, diff.differences.why))
    assert set(by_bar) == {at[1], at[2], at[3]}
    sign1 = 1 if delta[at[1]] > 0 else -1
    assert by_bar[at[1]] == f"slippage {sign1 * 10.0:+.1f} bps"
    assert by_bar[at[2]] == "size"
    assert by_bar[at[3]] == "timing: paper filled 1 bar(s) later (a missed or late bar)"
    from tune.report import reason_counts

    assert reason_counts(diff.differences) == {"size": 1, "slippage": 1, "timing": 1}
    two = pd.DataFrame({"why": ["slippage +3.0 bps", "slippage -1.5 bps; size", "paper only: the backtest did not trade"]})
    assert reason_counts(two) == {"slippage": 2, "paper only": 1, "size": 1}
    # The extra unit stays in the paper position to the end; the late fill has caught up by then.
    assert diff.backtest_position == r.units[-1]
    assert diff.paper_position == r.units[-1] + (1 if delta[at[2]] > 0 else -1)
    with pytest.raises(ValueError, match="missing column"):
        bad = tmp_path / "bad.csv"
        pd.DataFrame({"ts": [ts[0]], "symbol": ["X"]}).to_csv(bad, index=False)
        read_fills(bad, "X")


def test_cli_backtest_run_and_bad_input(tmp_path, monkeypatch, capsys):
    from core.store import BarStore
    from raytrade.cli import main

    store = tmp_path / "store"
    BarStore.from_settings(type("S", (), {"uri": str(store), "endpoint": None, "access_key": None,
                                          "secret_key": None, "region": "us-east-1"})())
    monkeypatch.setenv("RAYTRADE_STORE__URI", str(store))
    monkeypatch.chdir(tmp_path)
    assert main(["data", "generate", "--symbols", "X", "--bars", "300", "--interval", "1D"]) == 0
    capsys.readouterr()
    out = tmp_path / "rep"
    assert main(["backtest", "run", "--symbol", "X", "--strategy", "sma_crossover", "--params", "fast=10", "slow=30",
                 "--commission", "0.001", "--out", str(out), "--json"]) == 0
    import json

    summary = json.loads(capsys.readouterr().out)
    assert summary["params"] == {"fast": 10, "slow": 30} and (out / "index.html").is_file()
    assert "_text" not in summary  # the table is for people; --json carries the numbers only
    assert (out / "equity.png").is_file()
    for args, needle in [
        (["backtest", "run", "--symbol", "X", "--strategy", "nope"], "unknown strategy 'nope'"),
        (["backtest", "run", "--symbol", "X", "--strategy", "sma_crossover", "--params", "fast"], "NAME=VALUE"),
        (["backtest", "run", "--symbol", "X", "--strategy", "sma_crossover", "--params", "speed=3"], "no parameter speed"),
        (["backtest", "run", "--symbol", "X", "--strategy", "sma_crossover", "--params", "fast=10,slow=30"],
         "separate parameters with spaces"),
        (["backtest", "run", "--symbol", "X", "--strategy", "sma_crossover", "--params", "fast=nan"], "finite"),
        (["backtest", "run", "--symbol", "X", "--strategy", "sma_crossover", "--params", "fast=1.5"], "whole numbers"),
        (["backtest", "run", "--symbol", "X", "--strategy", "sma_crossover", "--params", "fast=30", "slow=10"],
         "needs fast < slow"),
        (["backtest", "run", "--symbol", "X", "--strategy", "sma_crossover", "--start", "notadate"],
         "--start 'notadate': not a time"),
        (["backtest", "run", "--symbol", "X", "--strategy", "sma_crossover", "--out", "/proc/raytrade-report"],
         "cannot write the report there"),
        (["backtest", "run", "--symbol", "NOPE", "--strategy", "sma_crossover"], "has 0 bars of NOPE"),
        (["backtest", "walk-forward", "--symbol", "X", "--strategy", "sma_crossover", "--train", "100", "--test", "50",
          "--objective", "profit"], "objective must be one of"),
        (["backtest", "compare", "--symbol", "X", "--strategy", "sma_crossover", "--fills", "/nonexistent.csv"],
         "no such file"),
    ]:
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("raytrade: error:") and needle in err, (args, err)
