"""Data at rest is verified: checksummed parts, reads that refuse bad ones by path, `data verify`, bad indexes.

Real files and real pyarrow, a local S3 server for the S3 cases, and the CLI
in its own process as a user runs it.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from minio import Minio

from actors.registry import get_or_create_registry
from core.bars import BAR_SCHEMA, first_bad_row, normalise, to_table, validate_bars
from core.models.errors import RegistryError
from core.models.index import INDEX
from core.models.registry import ModelRegistry
from core.store import MANIFEST_DIR, BarStore, CorruptPartError, open_filesystem
from core.synthetic import generate_bars
from raytrade.cli.models import _Remote

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if not k.startswith("RAYTRADE_") and k != "RAY_ADDRESS"}
    e.update(env or {})
    e["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "raytrade", *args], capture_output=True, text=True, env=e,
                          cwd=cwd, timeout=180)


def _local(tmp_path: Path) -> BarStore:
    fs, root = open_filesystem(str(tmp_path / "store"))
    return BarStore(fs, root)


def _bucket(server: dict, bucket: str) -> Minio:
    mc = Minio(server["endpoint"].split("://")[1], server["access_key"], server["secret_key"], secure=False)
    if not mc.bucket_exists(bucket):
        mc.make_bucket(bucket)
    return mc


def _s3(server: dict, bucket: str) -> BarStore:
    _bucket(server, bucket)
    fs, root = open_filesystem(f"s3://{bucket}/raytrade", server["endpoint"], server["access_key"], server["secret_key"])
    return BarStore(fs, root, uri=f"s3://{bucket}/raytrade")


def _s3_env(server: dict, bucket: str) -> dict[str, str]:
    return {"RAYTRADE_STORE__URI": f"s3://{bucket}/raytrade", "RAYTRADE_STORE__ENDPOINT": server["endpoint"],
            "RAYTRADE_STORE__ACCESS_KEY": server["access_key"], "RAYTRADE_STORE__SECRET_KEY": server["secret_key"],
            "RAYTRADE_RESILIENCE__RETRY_ATTEMPTS": "1"}


def _three_parts(store: BarStore) -> list[str]:
    """SPY in three parts of 300 bars, QQQ in one; returns SPY's part paths in time order."""
    df = generate_bars(["SPY", "QQQ"], 900, seed=5)
    spy = df[df.symbol == "SPY"]
    paths = []
    for i in range(3):
        paths += store.append(spy.iloc[i * 300:(i + 1) * 300]).files
    store.append(df[df.symbol == "QQQ"])
    return paths


def _scribble(data: bytes, seed: int = 0) -> bytes:
    """2 KiB of random bytes written into the middle: the size stays the same."""
    noise = np.random.default_rng(seed).bytes(2048)
    mid = len(data) // 2 - 1024
    assert mid > 0, "the part is too small to scribble 2 KiB into its middle"
    return data[:mid] + noise + data[mid + 2048:]


# -- the bar rules on read ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(20))
def test_first_bad_row_agrees_with_validate_bars(seed):
    """validate_bars is the oracle: its first rejected row and reason are first_bad_row's answer."""
    rng = np.random.default_rng(seed)
    df = normalise(generate_bars(["SPY"], 200, seed=seed))
    for _ in range(int(rng.integers(0, 4))):
        row, col = int(rng.integers(0, 200)), str(rng.choice(["open", "high", "low", "close", "volume", "ts"]))
        breakage = rng.integers(0, 4)
        if col == "ts":
            df.loc[row, "ts"] = df["ts"].iloc[max(row - int(rng.integers(0, 3)), 0)]  # duplicate or back in time
        else:
            df.loc[row, col] = [np.nan, np.inf, -1.0, 0.0][breakage] if col != "volume" else [np.nan, -1.0, np.inf, 5.0][breakage]
        if col == "high" and breakage == 3:
            df.loc[row, "high"] = df.loc[row, "low"] * 0.999  # positive, finite, below open/close
    _, rejected = validate_bars(df)
    want = (rejected[0].row, rejected[0].reason) if rejected else None
    assert first_bad_row(df) == want


def test_a_part_whose_bars_break_the_rules_is_refused_by_path(tmp_path):
    store = _local(tmp_path)
    good = generate_bars(["SPY"], 50, seed=1)
    store.append(good)
    bad = generate_bars(["SPY"], 20, seed=2, start="2030-01-01")
    bad.loc[7, "high"] = bad.loc[7, "low"] * 0.5  # a high below its open and close
    (path,) = store.append(bad, validate=False).files  # its checksum is right: the bars are wrong
    with pytest.raises(CorruptPartError, match="row 8 .* high below open/close") as e:
        store.read("SPY")
    assert e.value.path == path and path in str(e.value)
    # A read that does not reach that part is not refused.
    assert len(store.read("SPY", end=good["ts"].iloc[-1])) == 50


def test_overlapping_parts_from_two_writers_are_refused(tmp_path):
    store = _local(tmp_path)
    df = normalise(generate_bars(["SPY"], 100, seed=3))
    first = store._write_file("SPY", df.iloc[:60])
    second = store._write_file("SPY", df.iloc[40:])  # what two writers appending at once could leave
    with pytest.raises(CorruptPartError, match="overlap part") as e:
        store.read("SPY")
    assert e.value.path == second and first in str(e.value)
    check = store.verify()
    assert [(b.path, "overlap" in b.reason) for b in check.bad] == [(second, True)]


# -- checksums: local ---------------------------------------------------------------------------
def test_corrupt_part_refused_by_path_on_read_verify_and_ls(tmp_path):
    store = _local(tmp_path)
    paths = _three_parts(store)
    env = {"RAYTRADE_STORE__URI": store.root}
    clean = run_cli("data", "verify", env=env, cwd=tmp_path)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert clean.stdout.strip().splitlines() == [f"all 4 part(s) (1800 bars) in {store.root} verified"]

    victim = Path(paths[1])
    victim.write_bytes(_scribble(victim.read_bytes()))
    with pytest.raises(CorruptPartError, match="sha256") as e:
        store.read("SPY")
    assert e.value.path == paths[1] and paths[1] in str(e.value) and "raytrade data verify" in str(e.value)
    assert len(store.read("QQQ")) == 900  # other symbols read as before
    assert len(store.read("SPY", end=store._files("SPY")[0].last)) == 300  # so do parts before it

    r = run_cli("data", "verify", env=env, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"bad part {paths[1]}: its sha256 is ")
    assert lines[1].startswith(f"1 bad part(s) of 4 in {store.root}")

    ls = run_cli("data", "ls", env=env, cwd=tmp_path)
    assert ls.returncode == 0 and "Traceback" not in ls.stderr
    rows = {ln.split()[0]: ln for ln in ls.stdout.splitlines()[1:]}
    assert rows["SPY"].endswith("BAD (1 part(s))") and rows["QQQ"].endswith("ok")
    assert "1 bad part(s) in SPY" in ls.stderr and "raytrade data verify" in ls.stderr


def test_a_backtest_over_a_corrupt_part_is_one_line_not_a_traceback(tmp_path):
    """Any command that reads the store (here `backtest run`) refuses a corrupt part in one line,
    exit 2, naming the part; before, only `data` commands did and a backtest printed a traceback."""
    store = _local(tmp_path)
    paths = _three_parts(store)
    victim = Path(paths[1])
    victim.write_bytes(_scribble(victim.read_bytes()))
    r = run_cli("backtest", "run", "--symbol", "SPY", "--strategy", "sma_crossover", env={"RAYTRADE_STORE__URI": store.root}, cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("raytrade: error: ") and paths[1] in r.stderr


def test_truncated_part_and_missing_part_are_bad(tmp_path):
    store = _local(tmp_path)
    paths = _three_parts(store)
    Path(paths[0]).write_bytes(Path(paths[0]).read_bytes()[:-100])
    Path(paths[2]).unlink()
    bad = {b.path: b.reason for b in store.verify().bad}
    assert bad[paths[0]].endswith("its manifest entry says " + str(len(Path(paths[0]).read_bytes()) + 100))
    assert bad[paths[2]].startswith("it is missing: the manifest lists it")
    assert len(bad) == 2


def test_parts_written_before_manifests_read_and_are_adopted(tmp_path):
    store = _local(tmp_path)
    df = normalise(generate_bars(["SPY"], 400, seed=4))
    d = Path(store.root) / "bars" / "symbol=SPY"
    d.mkdir(parents=True)
    # A part as the store wrote it before it kept a manifest.
    legacy = d / f"part-{df.ts.iloc[0].value}-{df.ts.iloc[-1].value}-400-0123456789ab.parquet"
    pq.write_table(to_table(df), str(legacy))
    pd.testing.assert_frame_equal(store.read("SPY"), df, check_dtype=False)
    env = {"RAYTRADE_STORE__URI": store.root}
    r = run_cli("data", "verify", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "1 written before the store kept checksums" in r.stdout
    assert not (d / MANIFEST_DIR).exists()  # verify alone writes nothing
    r = run_cli("data", "verify", "--adopt", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "checksums now recorded for 1" in r.stdout
    entry = json.loads((d / MANIFEST_DIR / (legacy.name + ".json")).read_text())
    assert entry["size"] == legacy.stat().st_size and entry["rows"] == 400
    # From now on a change inside it is caught by the checksum.
    legacy.write_bytes(_scribble(legacy.read_bytes(), seed=1))
    with pytest.raises(CorruptPartError, match="sha256"):
        store.read("SPY")


# -- a crash between the part and its manifest entry ------------------------------------------
@pytest.mark.parametrize("backend", ["local", "s3"])
@pytest.mark.parametrize("crash_at", ["_write_entry", "_publish"])
def test_crash_mid_write_leaves_the_store_readable_and_consistent(tmp_path, s3_server, monkeypatch, backend, crash_at):
    store = _local(tmp_path) if backend == "local" else _s3(s3_server, f"rt-crash-{crash_at.strip('_').replace('_', '-')}")
    df = generate_bars(["SPY"], 300, seed=6)
    store.append(df.iloc[:200])
    before = store.read("SPY")

    def crash(*a, **k):
        raise OSError("power lost")

    with monkeypatch.context() as m:
        m.setattr(BarStore, crash_at, crash)
        with pytest.raises(OSError, match="power lost"):
            store.append(df.iloc[200:])
    pd.testing.assert_frame_equal(store.read("SPY"), before)
    check = store.verify()
    assert (check.parts, check.bad, check.interrupted) == (1, [], 1)
    assert store.sweep() == 1
    check = store.verify()
    assert (check.parts, check.bad, check.interrupted) == (1, [], 0)
    # The batch that was lost is written again, whole.
    assert store.append(df).written == 100
    assert len(store.read("SPY")) == 300 and store.verify().parts == 2


# -- checksums: S3 -------------------------------------------------------------------------------
def test_corrupt_part_on_s3_is_refused_by_read_and_verify(tmp_path, s3_server):
    store = _s3(s3_server, "rt-integrity")
    paths = _three_parts(store)
    env = _s3_env(s3_server, "rt-integrity")
    r = run_cli("data", "verify", env=env, cwd=tmp_path)
    assert r.returncode == 0 and "all 4 part(s) (1800 bars)" in r.stdout, r.stdout + r.stderr
    mc = _bucket(s3_server, "rt-integrity")
    key = paths[2].split("/", 1)[1]  # the path is bucket/key
    resp = mc.get_object("rt-integrity", key)
    data = resp.read()
    resp.close()
    resp.release_conn()
    scribbled = _scribble(data, seed=2)
    mc.put_object("rt-integrity", key, io.BytesIO(scribbled), len(scribbled))
    with pytest.raises(CorruptPartError) as e:
        store.read("SPY")
    assert e.value.path == paths[2]
    r = run_cli("data", "verify", env=env, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    assert r.stdout.splitlines()[0].startswith(f"bad part {paths[2]}: its sha256 is ")


# -- a malformed registry index -------------------------------------------------------------------
_RECORD = {"name": "m", "version": 1, "task": "forecasting", "kind": "onnx", "path": "models/m/v1/model.onnx",
           "sha256": "0" * 64, "size": 10, "stage": "candidate", "created_at": 1.0, "metadata": {}, "metrics": {},
           "flags": []}


def _index_with(**record_changes) -> bytes:
    rec = {**_RECORD, **record_changes}
    rec = {k: v for k, v in rec.items() if v is not None}
    return json.dumps({"format": 1, "generation": 1, "models": {
        "m": {"task": "forecasting", "versions": {"1": rec}, "production": None, "history": []}}}).encode()


BAD_INDEXES = {
    "only format": (b'{"format": 1}', 'is malformed: "generation" must be'),
    "not json": (b'{"format": 1, "models": ', "is not valid JSON"),
    "not utf-8": (b"\xff\xfe\x00junk", "is not valid JSON"),
    "a list": (b"[1, 2]", "it is a JSON list, not an object"),
    "other format": (b'{"format": 7, "generation": 0, "models": {}}', "has format 7; this build reads format 1"),
    "models a list": (b'{"format": 1, "generation": 0, "models": []}', '"models" must be an object'),
    "generation a string": (b'{"format": 1, "generation": "3", "models": {}}', '"generation" must be a whole number'),
    "record without sha256": (_index_with(sha256=None), """models['m']["versions"]['1'] has no "sha256\""""),
    "size a string": (_index_with(size="10"), """["size"] = "10" is not valid"""),
    "production not a version": (
        b'{"format": 1, "generation": 1, "models": {"m": {"task": "forecasting", "versions": {}, '
        b'"production": 3, "history": []}}}', """models['m']["production"] must be null or one of its versions"""),
}


def test_a_well_formed_index_passes_the_check(make_settings):
    settings = make_settings()
    path = Path(settings.store.uri) / INDEX
    path.parent.mkdir(parents=True)
    path.write_bytes(_index_with())  # the shape the registry writes: the bad ones below differ by one thing
    assert [r["version"] for r in ModelRegistry(settings).list()] == [1]


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_malformed_index_is_refused_when_opened(make_settings, case):
    raw, needle = BAD_INDEXES[case]
    settings = make_settings()
    path = Path(settings.store.uri) / INDEX
    path.parent.mkdir(parents=True)
    path.write_bytes(raw)
    with pytest.raises(RegistryError) as e:
        ModelRegistry(settings)
    assert needle in str(e.value) and INDEX in str(e.value)


@pytest.mark.parametrize("case", ["only format", "not json", "record without sha256"])
def test_models_cli_on_a_malformed_index_is_one_line_exit_2(tmp_path, case):
    raw, needle = BAD_INDEXES[case]
    store = tmp_path / "store"
    (store / "models").mkdir(parents=True)
    (store / INDEX).write_bytes(raw)
    r = run_cli("models", "ls", env={"RAYTRADE_STORE__URI": str(store)}, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("raytrade: error: the registry index")
    assert needle in r.stderr


def test_registry_actor_on_a_malformed_index_is_one_line(ray_session, make_settings):
    """With a cluster up the CLI talks to the actor, which dies in __init__: the reason still comes as one line."""
    import ray

    settings = make_settings()
    settings.ray.namespace = "test-bad-index"
    path = Path(settings.store.uri) / INDEX
    path.parent.mkdir(parents=True)
    path.write_bytes(b'{"format": 1}')
    handle = get_or_create_registry(settings)
    try:
        with pytest.raises(RegistryError) as e:
            _Remote(handle).list()
        msg = str(e.value)
        assert msg.startswith("the model registry cannot start: the registry index models/index.json")
        assert '"generation" must be' in msg and "\n" not in msg and "Traceback" not in msg
    finally:
        ray.kill(handle, no_restart=True)
