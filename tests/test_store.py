"""The Parquet store on a local directory and on a local S3-compatible server."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pandas as pd
import pyarrow.fs as pafs
import pytest

from core.bars import normalise
from core.store import BarStore, open_filesystem
from core.synthetic import generate_bars


def _local(tmp_path):
    fs, root = open_filesystem(str(tmp_path / "store"))
    return BarStore(fs, root)


def _s3(server, bucket):
    fs, root = open_filesystem(
        f"s3://{bucket}/raytrade", server["endpoint"], server["access_key"], server["secret_key"]
    )
    # The bucket is made with the minio client, as an operator would on MinIO.
    from minio import Minio

    mc = Minio(server["endpoint"].split("://")[1], server["access_key"], server["secret_key"], secure=False)
    if not mc.bucket_exists(bucket):
        mc.make_bucket(bucket)
    return BarStore(fs, root, uri=f"s3://{bucket}/raytrade")


def _round_trip(store: BarStore):
    df = generate_bars(["SPY", "QQQ"], 400, seed=2)
    first, second = df.groupby("symbol").head(250), df.groupby("symbol").tail(150)
    assert store.append(first).written == 500
    assert store.append(second).written == 300
    assert store.symbols() == ["QQQ", "SPY"]
    spy = store.read("SPY")
    want = normalise(df[df.symbol == "SPY"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(spy, want, check_dtype=False)
    # A time-range read is inclusive at both ends.
    t0, t1 = want["ts"].iloc[100], want["ts"].iloc[299]
    part = store.read("SPY", t0, t1)
    assert len(part) == 200 and part["ts"].iloc[0] == t0 and part["ts"].iloc[-1] == t1
    (q,) = [r for r in store.ranges() if r.symbol == "QQQ"]
    assert (q.rows, q.files) == (400, 2)
    # Appending the same bars again writes nothing and says so.
    again = store.append(df)
    assert (again.written, again.skipped_existing) == (0, 800)


def test_round_trip_local(tmp_path):
    _round_trip(_local(tmp_path))


def test_round_trip_s3(s3_server):
    store = _s3(s3_server, "rt-roundtrip")
    assert isinstance(store.fs, pafs.S3FileSystem)
    _round_trip(store)


def test_invalid_rows_are_rejected_not_written(tmp_path):
    store = _local(tmp_path)
    df = generate_bars(["SPY"], 10, seed=1)
    df.loc[3, "close"] = -1.0
    res = store.append(df)
    assert res.written == 9 and [r.row for r in res.rejected] == [3]
    assert len(store.read("SPY")) == 9


def test_artefact_bytes_round_trip(tmp_path, s3_server):
    for store in (_local(tmp_path), _s3(s3_server, "rt-bytes")):
        store.put_bytes("models/m/1/model.onnx", b"\x00abc" * 1000)
        assert store.get_bytes("models/m/1/model.onnx") == b"\x00abc" * 1000
        assert store.exists("models/m/1/model.onnx") and not store.exists("models/m/2/model.onnx")


def _write_forever(root: str, ready) -> None:
    fs, r = open_filesystem(root)
    store = BarStore(fs, r)
    big = generate_bars(["SPY"], 200_000, seed=3, start="2030-01-01")
    ready.set()
    store.append(big)


def test_interrupted_write_leaves_store_readable(tmp_path):
    store = _local(tmp_path)
    store.append(generate_bars(["SPY"], 100, seed=3))
    before = store.read("SPY")
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=_write_forever, args=(store.root, ready))
    proc.start()
    assert ready.wait(60)
    # Kill it while it writes (or just before): either way no half file is seen.
    deadline = time.time() + 20
    sym_dir = os.path.join(store.root, "bars", "symbol=SPY")
    saw_partial = False
    while time.time() < deadline and not saw_partial:
        saw_partial = any(n.startswith(".tmp-") for n in os.listdir(sym_dir))
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    after = store.read("SPY")
    # Either the whole batch landed or none of it; the old bars are intact.
    assert len(after) in (100, 200_100)
    pd.testing.assert_frame_equal(after.iloc[:100].reset_index(drop=True), before)
    if saw_partial and len(after) == 100:
        # Killed mid-write: the partial file exists but no reader sees it.
        assert store.sweep() == 1
    assert saw_partial, "the write finished before it could be interrupted; make the batch bigger"
    assert not any(n.startswith(".tmp-") for n in os.listdir(sym_dir))
