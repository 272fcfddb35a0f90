"""Reports: written, non-empty, every image they reference exists and is a real PNG of sensible size."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import numpy as np
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
