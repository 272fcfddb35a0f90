"""The CLI: help, one line and exit 2 for every user mistake, data in and out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from core.synthetic import generate_bars
from raytrade.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, env=None, cwd=None, timeout=120):
    e = {k: v for k, v in os.environ.items() if not k.startswith("RAYTRADE_")}
    e.update(env or {})
    e["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "raytrade", *args], capture_output=True, text=True, env=e, cwd=cwd or ROOT,
        timeout=timeout,
    )


def test_help_lists_the_commands():
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("up", "down", "status", "config", "data"):
        assert cmd in r.stdout


def test_help_and_a_bad_flag_load_no_heavy_library():
    # Each verb module imports Ray, pandas, the store, torch and tune/ only when its verb runs.
    probe = ("import sys\nfrom raytrade.cli import main\n"
             "def code(argv):\n    try:\n        return main(argv)\n    except SystemExit as e:  # --help exits\n"
             "        return e.code\n"
             "codes = [code(['--help']), code(['up', '--duration', 'soon']), code(['backtest', 'run', '--help'])]\n"
             "heavy = ('ray', 'pandas', 'pyarrow', 'torch', 'numba', 'core.store', 'actors', 'tune', 'serve')\n"
             "print(codes, sorted(m for m in sys.modules if m.split('.')[0] in heavy or m in heavy))")
    e = {k: v for k, v in os.environ.items() if not k.startswith("RAYTRADE_")}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**e, "PYTHONPATH": str(ROOT)},
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[0, 2, 0] []"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["up", "--duration", "soon"], "invalid float value: 'soon'"),
        (["data", "import"], "required: file"),
        (["data", "import", "x.csv"], "--symbol"),
        (["data", "generate", "--bars", "-5"], "--bars -5: must be between"),
        (["data", "generate", "--interval", "fortnightly"], "--interval 'fortnightly'"),
        (["data", "import", "/nonexistent/bars.csv", "--symbol", "SPY"], "no such file"),
        (["data", "import", "bars.csv", "--symbol", "S P Y"], "--symbol 'S P Y'"),
        (["config", "show", "--config", "x"], "unrecognized arguments"),
        (["--config", "/nonexistent.toml", "config", "show"], "does not exist"),
        (["config"], "choose an action: show"),
        (["data"], "choose an action"),
        (["trades"], "choose an action: stats, export"),
        (["trades", "stats", "--account", "nope"], "no account named 'nope'"),
        (["trades", "stats", "--days", "-1"], "--days -1: must be between"),
        (["trades", "export", "--out", "fills.xlsx"], "give a .csv path"),
        (["decide", "SPY", "--key", ""], "no API key"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("raytrade: error:")
    assert needle in err
    assert "Traceback" not in err


def test_bad_setting_in_environment_is_one_line_exit_2_in_a_real_process(tmp_path):
    r = run_cli("config", "show", env={"RAYTRADE_RISK__MAX_DAILY_LOSS_PCT": "-1"}, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "risk.max_daily_loss_pct" in r.stderr and "Traceback" not in r.stderr


def test_config_show_redacts_secrets(tmp_path):
    r = run_cli(
        "config", "show",
        env={"RAYTRADE_ALPACA__API_KEY": "PKLEAKME123", "RAYTRADE_ALPACA__SECRET_KEY": "shh-secret-456"},
        cwd=tmp_path,
    )
    assert r.returncode == 0
    assert "PKLEAKME123" not in r.stdout and "shh-secret-456" not in r.stdout
    assert '"api_key": "***"' in r.stdout and '"max_position_pct": 0.05' in r.stdout


def test_data_generate_import_ls(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYTRADE_STORE__URI", str(tmp_path / "store"))
    assert main(["data", "generate", "--symbols", "SPY", "--bars", "300"]) == 0
    # A user's CSV with their own column names and a date column.
    df = generate_bars(["X"], 50, seed=4, interval="1D", start="2020-01-01")
    csv = tmp_path / "mine.csv"
    pd.DataFrame({"Date": df["ts"].dt.strftime("%Y-%m-%d"), "Open": df["open"], "HIGH": df["high"],
                  "low": df["low"], "Close": df["close"], "Vol": df["volume"]}).to_csv(csv, index=False)
    assert main(["data", "import", str(csv), "--symbol", "goog"]) == 0
    capsys.readouterr()
    assert main(["data", "ls"]) == 0
    out = capsys.readouterr().out
    assert "GOOG" in out and "SPY" in out and " 300 " in out and " 50 " in out


def test_bad_file_refused_with_rows_and_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYTRADE_STORE__URI", str(tmp_path / "store"))
    csv = tmp_path / "bad.csv"
    csv.write_text(
        "timestamp,open,high,low,close,volume\n"
        "2024-01-02,10,11,9,10.5,100\n"
        "2024-01-03,10,9.5,9,10.5,100\n"    # high below close
        "2024-01-04,10,11,9,10.5,-3\n"      # negative volume
        "2024-01-04,10,11,9,10.5,100\n"     # ... this row is then good
        "2024-01-05,10,11,9,nan,100\n"      # non-finite close
    )
    assert main(["data", "import", str(csv), "--symbol", "SPY"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "3 bad row(s), nothing written" in err
    assert "row 2 (SPY): high below open/close" in err
    assert "row 3 (SPY): negative volume" in err
    assert "row 5 (SPY): non-finite price" in err
    assert main(["data", "ls"]) == 0
    assert "empty" in capsys.readouterr().out


def test_missing_columns_named(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    csv = tmp_path / "cols.csv"
    csv.write_text("when,open,high,low,close\n2024-01-02,10,11,9,10.5\n")
    assert main(["data", "import", str(csv), "--symbol", "SPY"]) == 2
    err = capsys.readouterr().err
    assert "missing column(s) ts, volume" in err


def test_status_without_a_cluster_is_one_line(tmp_path):
    r = run_cli("status", env={"RAY_ADDRESS": "127.0.0.1:1"}, cwd=tmp_path, timeout=180)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "raytrade up" in r.stderr
