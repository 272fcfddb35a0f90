"""The bar store: Parquet files partitioned by symbol on a pyarrow filesystem.

Layout under the store's root (a local directory, or ``s3://bucket/prefix`` on
MinIO or S3)::

    bars/symbol=SPY/part-<first_ns>-<last_ns>-<rows>-<uuid>.parquet
    models/...        (model artefacts, written by the registry)

Each append writes new files, never rewrites old ones, and a file becomes
visible only whole: locally it is written under a hidden ``.tmp-`` name and
renamed (an atomic rename on POSIX); on S3 an object appears only when its
upload completes. A reader therefore never sees half a file, and a crash
mid-write loses at most the batch being written. Readers skip names that
start with ``.`` or ``_`` (pyarrow's rule), so leftovers of a crash are
ignored; ``sweep()`` deletes them.

File names carry each file's time range and row count, so listing a symbol
(``ranges()``) and pruning a time-range read need no file to be opened.

Not here: validation rules (``core.bars``), or which bars to keep when two
feeds disagree (the feed router).
"""

from __future__ import annotations

import posixpath
import uuid
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.bars import BAR_SCHEMA, Rejection, empty_bars, from_table, normalise, to_table, validate_bars

BARS_DIR = "bars"
MODELS_DIR = "models"


class StoreError(RuntimeError):
    """The store could not be read or written; the message says where."""


@dataclass(frozen=True)
class FileInfo:
    path: str
    first: pd.Timestamp
    last: pd.Timestamp
    rows: int


@dataclass(frozen=True)
class AppendResult:
    written: int
    skipped_existing: int
    rejected: list[Rejection]
    files: list[str]


@dataclass(frozen=True)
class SymbolRange:
    symbol: str
    first: pd.Timestamp
    last: pd.Timestamp
    rows: int
    files: int


def open_filesystem(
    uri: str,
    endpoint: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str = "us-east-1",
) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the root path inside it for a store URI."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        root = (parsed.netloc + parsed.path).rstrip("/")
        kw: dict[str, Any] = {"region": region}
        if endpoint:
            ep = urlparse(endpoint)
            kw["endpoint_override"] = ep.netloc or ep.path
            kw["scheme"] = ep.scheme or "https"
        if access_key:
            kw["access_key"] = access_key
            kw["secret_key"] = secret_key or ""
        # Retries are ours (core.resilience), so failures are counted by the breaker.
        kw["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=1)
        kw["connect_timeout"] = 5
        kw["request_timeout"] = 30
        return pafs.S3FileSystem(**kw), root
    local = pafs.LocalFileSystem()
    import os

    return local, os.path.abspath(uri)


def minio_client(store_settings: Any) -> Any:
    """A minio client for the store's endpoint and keys (AWS S3 when no endpoint is set)."""
    from minio import Minio

    s = store_settings
    ep = urlparse(s.endpoint) if s.endpoint else urlparse("https://s3.amazonaws.com")
    return Minio(
        ep.netloc or ep.path,
        access_key=s.access_key.get_secret_value() if s.access_key else None,
        secret_key=s.secret_key.get_secret_value() if s.secret_key else None,
        secure=ep.scheme == "https",
        region=s.region,
    )


class BarStore:
    """Append and read bars. Cheap to construct; holds no open files."""

    def __init__(self, fs: pafs.FileSystem, root: str, call: Callable[..., Any] | None = None, uri: str | None = None):
        self.fs = fs
        self.root = root.rstrip("/")
        self.is_local = isinstance(fs, pafs.LocalFileSystem)
        self.uri = uri or self.root
        # Every filesystem operation goes through ``call`` (retry + breaker).
        self._call = call or (lambda fn, *a, **k: fn(*a, **k))

    @classmethod
    def from_settings(cls, store_settings: Any, resilience: Any | None = None) -> "BarStore":
        s = store_settings
        fs, root = open_filesystem(
            s.uri,
            s.endpoint,
            s.access_key.get_secret_value() if s.access_key else None,
            s.secret_key.get_secret_value() if s.secret_key else None,
            s.region,
        )
        call = None
        if resilience is not None:
            from core.resilience import Resilient

            call = Resilient.from_settings("store", resilience, non_retryable=(FileNotFoundError, ValueError)).call
        return cls(fs, root, call, uri=s.uri)

    # -- paths -----------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _symbol_dir(self, symbol: str) -> str:
        return self.path(BARS_DIR, f"symbol={symbol.upper()}")

    def _ensure_dir(self, path: str) -> None:
        self._call(self.fs.create_dir, path, recursive=True)

    # -- listing -----------------------------------------------------------------
    def _files(self, symbol: str) -> list[FileInfo]:
        d = self._symbol_dir(symbol)
        try:
            infos = self._call(self.fs.get_file_info, pafs.FileSelector(d, allow_not_found=True))
        except FileNotFoundError:
            return []
        out = []
        for info in infos:
            name = posixpath.basename(info.path)
            if info.type != pafs.FileType.File or name.startswith((".", "_")) or not name.endswith(".parquet"):
                continue
            parts = name[: -len(".parquet")].split("-")
            if len(parts) < 5 or parts[0] != "part":
                continue
            out.append(
                FileInfo(info.path, pd.Timestamp(int(parts[1]), tz="UTC"), pd.Timestamp(int(parts[2]), tz="UTC"), int(parts[3]))
            )
        out.sort(key=lambda f: (f.first, f.last))
        return out

    def symbols(self) -> list[str]:
        d = self.path(BARS_DIR)
        infos = self._call(self.fs.get_file_info, pafs.FileSelector(d, allow_not_found=True))
        syms = []
        for info in infos:
            name = posixpath.basename(info.path)
            if info.type == pafs.FileType.Directory and name.startswith("symbol="):
                if self._files(name[len("symbol=") :]):
                    syms.append(name[len("symbol=") :])
        return sorted(syms)

    def ranges(self) -> list[SymbolRange]:
        out = []
        for sym in self.symbols():
            files = self._files(sym)
            out.append(SymbolRange(sym, files[0].first, files[-1].last, sum(f.rows for f in files), len(files)))
        return out

    def last_ts(self, symbol: str) -> pd.Timestamp | None:
        files = self._files(symbol)
        return max(f.last for f in files) if files else None

    # -- writing -----------------------------------------------------------------
    def append(self, bars: pd.DataFrame, validate: bool = True) -> AppendResult:
        """Append bars; rows at or before a symbol's stored end are skipped, not rewritten.

        Returns what was written, skipped and rejected. With ``validate`` (the
        default) invalid rows are rejected with reasons and nothing of them is
        written; callers that must write all or nothing (``data import``)
        validate first and refuse the whole file.
        """
        if len(bars) == 0:
            return AppendResult(0, 0, [], [])
        df = normalise(bars)
        written, skipped, files, rejected = 0, 0, [], []
        for sym, part in df.groupby("symbol", sort=True):
            if validate:
                part, rej = validate_bars(part.reset_index(drop=True))
                rejected.extend(rej)
            else:
                part = part.sort_values("ts", kind="stable")
            last = self.last_ts(str(sym))
            if last is not None:
                before = len(part)
                part = part[part["ts"] > last]
                skipped += before - len(part)
            if len(part) == 0:
                continue
            files.append(self._write_file(str(sym), part))
            written += len(part)
        return AppendResult(written, skipped, rejected, files)

    def _write_file(self, symbol: str, part: pd.DataFrame) -> str:
        table = to_table(part)
        first, last = int(part["ts"].iloc[0].value), int(part["ts"].iloc[-1].value)
        d = self._symbol_dir(symbol)
        self._ensure_dir(d)
        name = f"part-{first}-{last}-{len(part)}-{uuid.uuid4().hex[:12]}.parquet"
        final = posixpath.join(d, name)
        if self.is_local:
            tmp = posixpath.join(d, f".tmp-{name}")

            def write_and_rename() -> None:
                pq.write_table(table, tmp, filesystem=self.fs)
                self.fs.move(tmp, final)  # rename(2): atomic on one filesystem

            self._call(write_and_rename)
        else:
            # An S3 object becomes visible only when its upload completes.
            self._call(pq.write_table, table, final, filesystem=self.fs)
        return final

    def sweep(self) -> int:
        """Delete leftovers of interrupted writes. Returns how many."""
        n = 0
        base = self.path(BARS_DIR)
        infos = self._call(self.fs.get_file_info, pafs.FileSelector(base, recursive=True, allow_not_found=True))
        for info in infos:
            if info.type == pafs.FileType.File and posixpath.basename(info.path).startswith(".tmp-"):
                self._call(self.fs.delete_file, info.path)
                n += 1
        return n

    # -- reading -----------------------------------------------------------------
    def read(
        self,
        symbol: str,
        start: str | pd.Timestamp | None = None,
        end: str | pd.Timestamp | None = None,
    ) -> pd.DataFrame:
        """A symbol's bars with ``start <= ts <= end``, in time order."""
        t0 = _utc(start)
        t1 = _utc(end)
        files = [f for f in self._files(symbol) if (t0 is None or f.last >= t0) and (t1 is None or f.first <= t1)]
        if not files:
            return empty_bars()
        tables = [self._call(pq.read_table, f.path, filesystem=self.fs, schema=BAR_SCHEMA) for f in files]
        df = from_table(pa.concat_tables(tables))
        if t0 is not None:
            df = df[df["ts"] >= t0]
        if t1 is not None:
            df = df[df["ts"] <= t1]
        return df.sort_values("ts", kind="stable").reset_index(drop=True)

    def read_many(self, symbols: list[str], start: Any = None, end: Any = None) -> pd.DataFrame:
        parts = [self.read(s, start, end) for s in symbols]
        parts = [p for p in parts if len(p)]
        return pd.concat(parts, ignore_index=True) if parts else empty_bars()

    # -- artefacts (bytes beside the bars) -------------------------------------------
    def put_bytes(self, relpath: str, data: bytes) -> str:
        final = self.path(relpath)
        self._ensure_dir(posixpath.dirname(final))
        if self.is_local:
            tmp = posixpath.join(posixpath.dirname(final), f".tmp-{uuid.uuid4().hex[:8]}-{posixpath.basename(final)}")

            def write() -> None:
                with self.fs.open_output_stream(tmp) as f:
                    f.write(data)
                self.fs.move(tmp, final)

            self._call(write)
        else:

            def write_s3() -> None:
                with self.fs.open_output_stream(final) as f:
                    f.write(data)

            self._call(write_s3)
        return final

    def get_bytes(self, relpath: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path(relpath)) as f:
                return f.read()

        return self._call(read)

    def exists(self, relpath: str) -> bool:
        info = self._call(self.fs.get_file_info, self.path(relpath))
        return info.type != pafs.FileType.NotFound


def _utc(t: Any) -> pd.Timestamp | None:
    if t is None:
        return None
    ts = pd.Timestamp(t)
    return ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")
