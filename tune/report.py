"""Reports a person can read at a glance: one HTML page with PNG charts beside it.

::

    from tune.report import write_report
    path = write_report("reports/spy-sma", title="SPY sma_crossover", backtest=result,
                        walk_forward=wf, monte_carlo=mc)

Any of the three parts may be given. The directory gets ``index.html`` and
the PNGs it references (relative paths, so the folder can be copied or
served as is):

- ``equity.png``: equity and drawdown of a backtest (two panels, shared time axis);
- ``oos_equity.png``: the stitched out-of-sample equity, each fold's test window shaded
  and its start marked;
- ``params.png``: parameter stability: one heatmap row per parameter, one column per fold,
  coloured by where the chosen value sits in the searched range, the value written in;
- ``mc_fan.png``: per Monte Carlo method, equity percentiles (5-95, 25-75, median) over time;
- ``mc_hist.png``: histograms of terminal wealth, Sharpe, max drawdown and CVaR, one colour per method.

Charts are drawn with matplotlib's Agg backend (no display needed). Numbers in
the tables come from the results as computed; nothing is recomputed here.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from core.metrics import drawdown  # noqa: E402

_COLORS = {"trades": "#1f77b4", "blocks": "#ff7f0e", "synthetic": "#2ca02c"}
_DPI = 110


def _x(times, n: int):
    if times is not None and len(times) == n:
        return pd.to_datetime(times)
    return np.arange(n)


def plot_equity(equity: np.ndarray, times, path: Path, title: str = "Equity and drawdown") -> Path:
    equity = np.asarray(equity, dtype=np.float64)
    x = _x(times, len(equity))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax1.plot(x, equity, color="#1f77b4", lw=1.2)
    ax1.set_ylabel("equity")
    ax1.set_title(title)
    ax1.grid(alpha=0.3)
    dd = -100 * drawdown(equity)
    ax2.fill_between(x, dd, 0, color="#d62728", alpha=0.4, lw=0)
    ax2.set_ylabel("drawdown %")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_oos(wf, path: Path) -> Path:
    x = _x(wf.oos_times, len(wf.oos_equity))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(x, wf.oos_equity, color="#1f77b4", lw=1.2, label="stitched out-of-sample equity")
    bounds = wf.fold_boundaries + [len(wf.oos_equity)]
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], min(bounds[k + 1], len(x)) - 1
        if k % 2 == 0:
            ax.axvspan(x[lo], x[hi], color="#888888", alpha=0.12, lw=0)
        ax.axvline(x[lo], color="#555555", lw=0.8, ls="--")
        ax.text(x[lo], 1.0, f" fold {k}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="#333333")
    ax.axhline(wf.costs.cash, color="black", lw=0.6, alpha=0.5)
    ax.set_ylabel("equity")
    ax.set_title(f"Walk-forward {wf.strategy}: out-of-sample equity, folds marked (efficiency "
                 f"{_fmt(wf.efficiency)})")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_params(wf, path: Path) -> Path:
    names = list(wf.params.columns)
    folds = list(wf.params.index)
    fig, ax = plt.subplots(figsize=(max(5, 1.0 + 0.8 * len(folds)), 1.2 + 0.7 * max(1, len(names))))
    if not names:
        ax.text(0.5, 0.5, "no parameters searched", ha="center", va="center")
        ax.axis("off")
    else:
        z = np.zeros((len(names), len(folds)))
        for i, n in enumerate(names):
            searched = np.asarray(wf.table[n], dtype=np.float64)
            lo, hi = np.nanmin(searched), np.nanmax(searched)
            z[i] = (wf.params[n].to_numpy(dtype=np.float64) - lo) / (hi - lo) if hi > lo else 0.5
        im = ax.imshow(z, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        for i, n in enumerate(names):
            for j, f in enumerate(folds):
                ax.text(j, i, f"{wf.params.loc[f, n]:g}", ha="center", va="center", fontsize=9,
                        color="white" if z[i, j] < 0.6 else "black")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(folds)), [f"fold {f}" for f in folds])
        cb = fig.colorbar(im, ax=ax, fraction=0.04)
        cb.set_label("position in searched range")
    ax.set_title("Parameters chosen per fold")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_fan(mc, path: Path) -> Path:
    methods = list(mc.methods.values())
    fig, axes = plt.subplots(1, len(methods), figsize=(4.2 * len(methods), 4), squeeze=False)
    for ax, m in zip(axes[0], methods):
        c = _COLORS.get(m.method, "#1f77b4")
        p5, p25, p50, p75, p95 = m.fan
        ax.fill_between(m.fan_x, p5, p95, color=c, alpha=0.18, lw=0, label="5-95%")
        ax.fill_between(m.fan_x, p25, p75, color=c, alpha=0.35, lw=0, label="25-75%")
        ax.plot(m.fan_x, p50, color=c, lw=1.5, label="median")
        ax.axhline(1.0, color="black", lw=0.6, alpha=0.6)
        ax.axhline(mc.ruin, color="#d62728", lw=0.8, ls=":", label=f"ruin ({mc.ruin:g})")
        ax.set_title(f"{m.method}: P(loss) {m.prob_loss:.0%}, P(ruin) {m.prob_ruin:.1%}", fontsize=10)
        ax.set_xlabel(f"{m.step_unit}s")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("wealth (x starting cash)")
    axes[0][0].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"Monte Carlo fan: {mc.strategy} {mc.params}")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


def plot_hist(mc, path: Path) -> Path:
    # The trade bootstrap's CVaR is of per-trade returns, the others' of per-bar returns: not one
    # axis, so that panel shows the bar-return methods only and says so.
    cvar_label = "CVaR of bar returns" + (" (trade bootstrap not shown)" if "trades" in mc.methods else "")
    panels = (("terminal_wealth", "terminal wealth (x cash)"), ("sharpe", "Sharpe"),
              ("max_drawdown", "max drawdown"), ("cvar", cvar_label))
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (key, label) in zip(axes.ravel(), panels):
        for m in mc.methods.values():
            if key == "cvar" and m.step_unit != "bar":
                continue
            v = m.stats[key]
            v = v[np.isfinite(v)]
            if v.size:
                ax.hist(v, bins=40, alpha=0.45, color=_COLORS.get(m.method), label=m.method)
        if key in mc.base_metrics:
            base = mc.base_metrics[key]
            ax.axvline(base, color="black", lw=1, ls="--", label="backtest (whole history)")
        elif key == "terminal_wealth":
            ax.axvline(1 + mc.base_metrics["total_return"], color="black", lw=1, ls="--", label="backtest (whole history)")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Monte Carlo distributions")
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    plt.close(fig)
    return path


# -- HTML -------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, pd.Timestamp):
        return v.strftime("%Y-%m-%d %H:%M")
    return str(v)


def _table(frame: pd.DataFrame, index: bool = False) -> str:
    cols = ([frame.index.name or ""] if index else []) + [str(c) for c in frame.columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = []
    for idx, row in frame.iterrows():
        cells = ([f"<th>{html.escape(_fmt(idx))}</th>"] if index else []) + [
            f"<td>{html.escape(_fmt(v))}</td>" for v in row.tolist()]
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _metrics_table(metrics: dict[str, float]) -> str:
    return _table(pd.DataFrame({"metric": list(metrics), "value": list(metrics.values())}))


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .85em; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; } th { background: #f4f4f4; }
img { max-width: 100%; border: 1px solid #eee; } .note { color: #666; font-size: .85em; }
"""


def write_report(out_dir: str | Path, *, title: str = "raytrade backtest report", backtest=None, bars_times=None,
                 walk_forward=None, monte_carlo=None, notes: list[str] | None = None) -> Path:
    """Write ``index.html`` and its PNGs into ``out_dir``; returns the HTML file's path.

    ``backtest`` is a ``core.engine.BacktestResult`` (its ``times`` or
    ``bars_times`` label the x axis); ``walk_forward`` a
    ``tune.walk_forward.WalkForwardResult``; ``monte_carlo`` a
    ``tune.monte_carlo.MonteCarloResult``.
    """
    if backtest is None and walk_forward is None and monte_carlo is None:
        raise ValueError("nothing to report: give a backtest, a walk-forward or a Monte Carlo result")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for n in notes or []:
        parts.append(f"<p class='note'>{html.escape(n)}</p>")

    def img(name: str, alt: str) -> str:
        return f"<p><img src='{html.escape(name)}' alt='{html.escape(alt)}'></p>"

    if backtest is not None:
        plot_equity(backtest.equity, backtest.times if backtest.times is not None else bars_times, out / "equity.png")
        parts += ["<h2>Backtest</h2>", img("equity.png", "equity and drawdown"), _metrics_table(backtest.metrics)]
        if len(backtest.trades):
            parts += [f"<p>{len(backtest.trades)} trades; the last 20:</p>", _table(backtest.trades.tail(20))]
    if walk_forward is not None:
        wf = walk_forward
        plot_oos(wf, out / "oos_equity.png")
        plot_params(wf, out / "params.png")
        parts += [
            "<h2>Walk-forward</h2>",
            f"<p>{len(wf.folds)} folds, {len(next(iter(wf.table.values()), [0]))} parameter sets per fold, "
            f"objective <b>{html.escape(wf.objective)}</b>, walk-forward efficiency <b>{_fmt(wf.efficiency)}</b> "
            f"(out-of-sample over in-sample annualised log growth). {wf.n_trials} Tune trials, "
            f"{wf.work_s:.1f} s of backtesting in {wf.wall_s:.1f} s wall; results in "
            f"<code>{html.escape(str(wf.experiment_path))}</code>.</p>",
            img("oos_equity.png", "stitched out-of-sample equity"), _metrics_table(wf.oos_metrics),
            img("params.png", "parameter stability across folds"), _table(wf.folds),
        ]
    if monte_carlo is not None:
        mc = monte_carlo
        plot_fan(mc, out / "mc_fan.png")
        plot_hist(mc, out / "mc_hist.png")
        parts += [
            "<h2>Monte Carlo</h2>",
            f"<p>{html.escape(mc.strategy)} with {html.escape(str(mc.params))}; ruin means equity at or below "
            f"{mc.ruin:g} x the starting cash. {mc.n_trials} Tune trials in {mc.wall_s:.1f} s; results in "
            f"<code>{html.escape(str(mc.experiment_path))}</code>.</p>",
            _table(mc.table()), img("mc_fan.png", "Monte Carlo fan chart"), img("mc_hist.png", "Monte Carlo histograms"),
        ]
        for m in mc.methods.values():
            parts += [f"<p>{html.escape(m.method)}: percentiles</p>", _table(m.percentiles(), index=True)]
        for m, why in mc.skipped.items():
            parts.append(f"<p class='note'>{html.escape(m)} skipped: {html.escape(why)}</p>")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def reason_counts(differences: pd.DataFrame) -> dict[str, int]:
    """How many differing bars each kind of reason explains: ``size``, ``slippage``, ``direction``,
    ``timing``, ``paper only``, ``backtest only`` (a bar can have several; ``slippage +3.1 bps``
    and ``slippage -0.4 bps`` are one kind)."""
    counts: dict[str, int] = {}
    for why in differences.get("why", []):
        for kind in dict.fromkeys(part.split(":")[0].split(" +")[0].split(" -")[0].strip()
                                  for part in str(why).split("; ")):
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


# -- live (paper) against backtest ---------------------------------------------------------
# The comparison reads a plain fills file (ts, symbol, side, qty, price): what
# `raytrade trades export` writes from the paper broker's ledger, or any broker's fills.
FILL_COLUMNS = ("ts", "symbol", "side", "qty", "price")
TIMING_WINDOW = 3  # bars within which a same-direction fill counts as the same order, early or late


def read_fills(path: str | Path, symbol: str) -> pd.DataFrame:
    """A fills file (CSV or Parquet) -> ts (UTC), signed qty (+ buy), price, for ``symbol`` only."""
    path = Path(path)
    if not path.is_file():
        raise ValueError("no such file")
    df = pd.read_parquet(path) if path.suffix.lower() in (".parquet", ".pq") else pd.read_csv(path)
    df.columns = [str(c).strip().lower() for c in df.columns]
    missing = [c for c in FILL_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"missing column(s) {', '.join(missing)}; a fills file has {', '.join(FILL_COLUMNS)}")
    df = df[df["symbol"].astype(str).str.upper() == symbol.upper()].copy()
    if df.empty:
        raise ValueError(f"no fills of {symbol}")
    side = df["side"].astype(str).str.lower()
    bad = ~side.isin(["buy", "sell"]) | ~(pd.to_numeric(df["qty"], errors="coerce") > 0) | ~(
        pd.to_numeric(df["price"], errors="coerce") > 0)
    if bad.any():
        raise ValueError(f"rows {', '.join(str(i + 2) for i in np.flatnonzero(bad.to_numpy())[:5])}: side must be "
                         "buy or sell, qty and price positive")
    ts = pd.to_datetime(df["ts"], utc=True)
    qty = pd.to_numeric(df["qty"]).to_numpy(dtype=np.float64) * np.where(side == "buy", 1.0, -1.0)
    return pd.DataFrame({"ts": ts.to_numpy(), "qty": qty, "price": pd.to_numeric(df["price"]).to_numpy(dtype=np.float64)}
                        ).sort_values("ts", kind="stable").reset_index(drop=True)


@dataclass
class FillComparison:
    differences: pd.DataFrame  # one row per bar where the fills differ, with why
    positions: pd.DataFrame  # per bar of the window: paper and backtest position
    paper_position: float
    backtest_position: float
    paper_pnl: float
    backtest_pnl: float


def compare_fills(bars: pd.DataFrame, result, fills: pd.DataFrame, costs) -> FillComparison:
    """Where a paper account's fills differ from the backtest's over the bars it traded, and why.

    Fills map to the bar whose time span holds them. Per bar, both sides' fills
    are netted (a reversal is one net quantity) at their volume-weighted price.
    Reasons: ``size`` (same direction, other quantity: sizing or equity
    differs), ``slippage`` (same bar, other price; in basis points),
    ``direction``, ``timing`` (the same direction filled up to 3 bars earlier
    or later: a late signal or a missed bar), ``paper only`` and ``backtest
    only``. P&L is gross of commission on both sides (fills files carry none),
    marked at the window's last close; the paper account is taken to start flat.
    """
    ts = pd.to_datetime(bars["ts"], utc=True).to_numpy()
    bar = np.searchsorted(ts, pd.to_datetime(fills["ts"], utc=True).to_numpy(), side="right") - 1
    if (bar < 0).any():
        raise ValueError("fills before the first bar: load bars from before the first fill (--start)")
    lo, hi = int(bar.min()), int(bar.max())
    f = fills.assign(bar=bar)
    f["value"] = f["qty"].abs() * f["price"]
    paper = f.groupby("bar").agg(qty=("qty", "sum"), gross=("qty", lambda q: q.abs().sum()), value=("value", "sum"))
    paper["price"] = paper["value"] / paper["gross"]
    units = np.asarray(result.units, dtype=np.float64)
    delta = np.diff(np.concatenate([[0.0], units]))
    ref = bars["open" if costs.fill == "open" else "close"].to_numpy(dtype=np.float64)
    bt_bars = [t for t in np.flatnonzero(delta != 0) if lo <= t <= hi]
    bt = pd.DataFrame({"qty": delta[bt_bars],
                       "price": ref[bt_bars] * np.where(delta[bt_bars] > 0, 1 + costs.slippage, 1 - costs.slippage)},
                      index=pd.Index(bt_bars, name="bar"))
    rows, used_p, used_b = [], set(), set()
    for t in sorted(set(paper.index) & set(bt.index)):
        p, b = paper.loc[t], bt.loc[t]
        why = []
        if np.sign(p.qty) != np.sign(b.qty):
            why.append("direction")
        elif not np.isclose(p.qty, b.qty, rtol=1e-9, atol=1e-9):
            why.append("size")
        if not np.isclose(p.price, b.price, rtol=1e-9):
            why.append(f"slippage {1e4 * (p.price / b.price - 1) * np.sign(b.qty):+.1f} bps")
        used_p.add(t), used_b.add(t)
        if why:
            rows.append((t, p.qty, b.qty, p.price, b.price, "; ".join(why)))
    for t in sorted(set(bt.index) - used_b):
        b = bt.loc[t]
        near = [u for u in paper.index if u not in used_p and 0 < abs(u - t) <= TIMING_WINDOW
                and np.sign(paper.loc[u].qty) == np.sign(b.qty)]
        if near:
            u = min(near, key=lambda u: abs(u - t))
            used_p.add(u)
            lag = u - t
            rows.append((t, paper.loc[u].qty, b.qty, paper.loc[u].price, b.price,
                         f"timing: paper filled {abs(lag)} bar(s) {'later' if lag > 0 else 'earlier'}"
                         + (" (a missed or late bar)" if lag > 0 else "")))
        else:
            rows.append((t, 0.0, b.qty, np.nan, b.price, "backtest only: the paper account did not trade"))
    for t in sorted(set(paper.index) - used_p):
        p = paper.loc[t]
        rows.append((t, p.qty, 0.0, p.price, np.nan, "paper only: the backtest did not trade"))
    diff = pd.DataFrame(rows, columns=["bar", "paper_qty", "backtest_qty", "paper_price", "backtest_price", "why"])
    diff = diff.sort_values("bar", kind="stable").reset_index(drop=True)
    diff.insert(1, "bar_ts", pd.to_datetime(ts[diff["bar"].to_numpy()]) if len(diff) else [])
    window = np.arange(lo, hi + 1)
    paper_pos = np.cumsum(paper["qty"].reindex(window, fill_value=0.0).to_numpy())
    close = bars["close"].to_numpy(dtype=np.float64)
    last = close[hi]
    before = units[lo - 1] if lo > 0 else 0.0
    close_before = close[lo - 1] if lo > 0 else ref[lo]
    paper_pnl = float((f["qty"] * (last - f["price"])).sum())
    bt_pnl = float((bt["qty"] * (last - bt["price"])).sum() + before * (last - close_before))
    positions = pd.DataFrame({"bar": window, "ts": pd.to_datetime(ts[window]), "paper": paper_pos,
                              "backtest": units[window]})
    return FillComparison(diff, positions, float(paper_pos[-1]), float(units[hi]), paper_pnl, bt_pnl)


def write_compare_report(out_dir: str | Path, title: str, diff: FillComparison) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.step(diff.positions["ts"], diff.positions["paper"], where="post", label="paper", lw=1.4)
    ax.step(diff.positions["ts"], diff.positions["backtest"], where="post", label="backtest", lw=1.0, ls="--")
    ax.set_ylabel("position (units)")
    ax.set_title("Position: paper account against backtest")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "positions.png", dpi=_DPI)
    plt.close(fig)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>Final position: paper {_fmt(diff.paper_position)}, backtest {_fmt(diff.backtest_position)}. "
            f"Gross P&amp;L over the window: paper {_fmt(diff.paper_pnl)}, backtest {_fmt(diff.backtest_pnl)}.</p>"
            f"<p><img src='positions.png' alt='positions'></p><h2>Where the fills differ</h2>"
            f"{_table(diff.differences) if len(diff.differences) else '<p>nowhere</p>'}</body></html>")
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
