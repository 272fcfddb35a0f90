"""The bar store: Parquet files partitioned by symbol on a pyarrow filesystem.

Layout under the store's root (a local directory, or ``s3://bucket/prefix`` on
MinIO or S3)::

    bars/symbol=SPY/part-<first_ns>-<last_ns>-<rows>-<uuid>.parquet
    bars/symbol=SPY/_manifest/part-<...>.parquet.json   that part's sha256, size, rows, range
    models/...        (model artefacts, written by the registry)

Each append writes new files, never rewrites old ones, and a file becomes
visible only whole. A part is written in three steps: (1) its bytes under a
hidden ``.tmp-`` name; (2) its manifest entry (sha256 and size of those
bytes), whole: written then renamed locally, one PUT on S3; (3) the bytes
renamed to the visible name (an atomic rename on POSIX; on S3 a server-side
copy, which appears only whole, then the hidden object is deleted). So every
visible part has its entry, and a crash leaves only hidden leftovers (a
``.tmp-`` part, with or without its entry) that no reader sees; ``sweep()``
deletes them and ``verify()`` counts them. Readers skip names that start with
``.`` or ``_`` (pyarrow's rule).

Every part has its own entry file, named after the part, written once by the
one writer of that part: two writers appending at once never touch the same
object, so no entry can be lost to a concurrent write and no compare-and-swap
is needed (unlike the registry's single index).

Every read verifies what it reads: the part's bytes against its entry, then
its bars against the bar rules (``core.bars.first_bad_row``), its name's row
count and range against its content, and parts in time order never overlap.
A part that fails is refused with ``CorruptPartError`` naming its path; no read
returns a bar that breaks the rules. Parts written before manifests existed
(no entry) still read, with the bar rules but no checksum; ``verify(adopt=True)``
(``raytrade data verify --adopt``) records their checksums once they pass.
What it costs, measured on a shared, loaded 2-core box reading 400,000 bars
in 4 parts (24 MB; medians of 15 interleaved runs, two runs): sha256 of the
bytes took 0.24-0.26 of the time of the read before checksums (Parquet decode
and all), the bar rules 0.12-0.15, and the verified read as a whole 1.33-1.55
times as long. Decoding uses both cores and hashing one, so on an idle or
wider machine the share is smaller.

File names carry each file's time range and row count, so listing a symbol
(``ranges()``) and pruning a time-range read need no file to be opened.

Not here: validation rules (``core.bars``), which bars to keep when two
feeds disagree (the feed router), or opening the filesystem, whole-file writes
and the bytes beside the bars (``core.store_fs``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from core.bars import BAR_SCHEMA, Rejection, empty_bars, first_bad_row, from_table, normalise, to_table, validate_bars
# The filesystem under the store; open_filesystem and minio_client stay importable from here.
from core.store_fs import HIDDEN, StoreRoot, minio_client, open_filesystem  # noqa: F401

BARS_DIR = "bars"
MODELS_DIR = "models"
MANIFEST_DIR = "_manifest"
MANIFEST_FORMAT = 1


class StoreError(RuntimeError):
    """The store could not be read or written; the message says where."""


class CorruptPartError(ValueError):
    """A stored part fails its checksum, cannot be decoded, or holds bars that break the bar rules."""

    def __init__(self, path: str, reason: str):
        self.path, self.reason = path, reason
        super().__init__(
            f"corrupt store part {path}: {reason}. Restore that file from a backup, or delete it (and its entry "
            f"under {MANIFEST_DIR}/) and write its bars again; `raytrade data verify` lists every bad part"
        )


@dataclass(frozen=True)
class FileInfo:
    path: str
    first: pd.Timestamp
    last: pd.Timestamp
    rows: int
    size: int = -1  # bytes, as listed


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


@dataclass(frozen=True)
class BadPart:
    symbol: str
    path: str
    reason: str


@dataclass(frozen=True)
class StoreCheck:
    """What ``verify()`` found."""

    parts: int = 0  # visible parts checked
    bars: int = 0  # bars in the good ones
    unchecked: int = 0  # good parts with no manifest entry (written before manifests): bar rules only
    adopted: int = 0  # of those, entries written now (``adopt=True``)
    interrupted: int = 0  # hidden leftovers of interrupted writes, invisible to reads; ``sweep()`` removes them
    bad: list[BadPart] = field(default_factory=list)


@dataclass(frozen=True)
class _Listing:
    """One listing of a symbol's directory, its manifest included."""

    parts: list[FileInfo]  # visible parts, in time order
    entries: dict[str, str]  # part name -> its manifest entry's path
    hidden_parts: dict[str, str]  # part name -> its hidden bytes (a write not yet, or never, finished)
    hidden_entries: dict[str, str]  # part name -> a half-written entry


class BarStore(StoreRoot):
    """Append and read bars. Cheap to construct; holds no open files.

    The filesystem plumbing (``path``, ``put_bytes``, ``get_bytes``, ``exists``,
    the ``call`` every operation goes through) is ``StoreRoot``'s.
    """

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
    def _symbol_dir(self, symbol: str) -> str:
        return self.path(BARS_DIR, f"symbol={symbol.upper()}")

    # -- listing -----------------------------------------------------------------
    def _scan(self, symbol: str) -> _Listing:
        d = self._symbol_dir(symbol)
        mdir = posixpath.join(d, MANIFEST_DIR)
        try:
            infos = self._call(self.fs.get_file_info, pafs.FileSelector(d, recursive=True, allow_not_found=True))
        except FileNotFoundError:
            infos = []
        parts, entries, hidden_parts, hidden_entries = [], {}, {}, {}
        for info in infos:
            if info.type != pafs.FileType.File:
                continue
            where, name = posixpath.split(info.path)
            if where == mdir and name.endswith(".parquet.json"):
                if name.startswith(HIDDEN):
                    hidden_entries[name[len(HIDDEN) : -len(".json")]] = info.path
                else:
                    entries[name[: -len(".json")]] = info.path
                continue
            if where != d or not name.endswith(".parquet"):
                continue
            if name.startswith(HIDDEN):
                hidden_parts[name[len(HIDDEN) :]] = info.path
                continue
            if name.startswith((".", "_")):
                continue
            bits = name[: -len(".parquet")].split("-")
            if len(bits) < 5 or bits[0] != "part":
                continue
            first, last = pd.Timestamp(int(bits[1]), tz="UTC"), pd.Timestamp(int(bits[2]), tz="UTC")
            parts.append(FileInfo(info.path, first, last, int(bits[3]), info.size if info.size is not None else -1))
        parts.sort(key=lambda f: (f.first, f.last))
        return _Listing(parts, entries, hidden_parts, hidden_entries)

    def _files(self, symbol: str) -> list[FileInfo]:
        return self._scan(symbol).parts

    def _symbol_dirs(self) -> list[str]:
        d = self.path(BARS_DIR)
        infos = self._call(self.fs.get_file_info, pafs.FileSelector(d, allow_not_found=True))
        names = (posixpath.basename(i.path) for i in infos if i.type == pafs.FileType.Directory)
        return sorted(n[len("symbol=") :] for n in names if n.startswith("symbol="))

    def symbols(self) -> list[str]:
        return [sym for sym in self._symbol_dirs() if self._files(sym)]

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
        self._ensure_dir(posixpath.join(d, MANIFEST_DIR))
        name = f"part-{first}-{last}-{len(part)}-{uuid.uuid4().hex[:12]}.parquet"
        final = posixpath.join(d, name)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        data = sink.getvalue()
        entry = _entry(name, data, len(part), first, last)
        # The three steps of the module docstring; a crash between any two leaves only hidden files.
        self._call(self._write_bytes, posixpath.join(d, HIDDEN + name), data)
        self._write_entry(final, entry)
        self._publish(final)
        return final

    def _write_entry(self, part_path: str, entry: dict[str, Any]) -> None:
        d, name = posixpath.split(part_path)
        final = posixpath.join(d, MANIFEST_DIR, name + ".json")
        if self.is_local:
            # Hidden under the part's own name, so sweep() knows whose leftover it is.
            tmp = posixpath.join(d, MANIFEST_DIR, HIDDEN + name + ".json")

            def write_and_rename() -> None:
                self._write_bytes(tmp, json.dumps(entry).encode())
                self.fs.move(tmp, final)

            self._call(write_and_rename)
        else:
            self._call(self._write_bytes, final, json.dumps(entry).encode())

    def _publish(self, part_path: str) -> None:
        d, name = posixpath.split(part_path)
        # Local: rename(2). S3: copy (the new object appears whole), then delete the hidden one.
        self._call(self.fs.move, posixpath.join(d, HIDDEN + name), part_path)

    def sweep(self) -> int:
        """Delete leftovers of interrupted writes; returns how many writes they were.

        Run it when no writer is running: a write in progress looks like a leftover.
        """
        n = 0
        for sym in self._symbol_dirs():
            listing = self._scan(sym)
            visible = {posixpath.basename(f.path) for f in listing.parts}
            # An entry (of a part never made visible) is deleted before the hidden part: a sweep cut
            # short never leaves an entry with no part at all (which verify() reports as missing).
            for name in sorted(set(listing.hidden_parts) | set(listing.hidden_entries)):
                for path in (listing.hidden_entries.get(name),
                             None if name in visible else listing.entries.get(name),
                             listing.hidden_parts.get(name)):
                    if path is not None:
                        self._call(self.fs.delete_file, path)
                n += 1
        for info in self._call(self.fs.get_file_info, pafs.FileSelector(self.path(BARS_DIR), recursive=True,
                                                                          allow_not_found=True)):
            # Other hidden files (not a part's): none is written today; an older build's, if any.
            name = posixpath.basename(info.path)
            ours = name.endswith((".parquet", ".parquet.json"))  # parts' and entries': handled above
            if info.type == pafs.FileType.File and name.startswith(HIDDEN) and not ours:
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
        """A symbol's bars with ``start <= ts <= end``, in time order; every part read is verified.

        Raises ``CorruptPartError`` (naming the part's path) rather than
        return a bar from a part that fails its checksum or the bar rules.
        """
        t0 = _utc(start)
        t1 = _utc(end)
        listing = self._scan(symbol)
        files = [f for f in listing.parts if (t0 is None or f.last >= t0) and (t1 is None or f.first <= t1)]
        if not files:
            return empty_bars()
        frames, prev = [], None
        for f in files:
            if prev is not None and f.first <= prev.last:
                raise CorruptPartError(f.path, _overlap(prev))
            frames.append(self._read_part(symbol, f, listing.entries.get(posixpath.basename(f.path)))[0])
            prev = f
        # Each part is in time order and they do not overlap: the concatenation is in time order.
        df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        if t0 is not None:
            df = df[df["ts"] >= t0]
        if t1 is not None:
            df = df[df["ts"] <= t1]
        return df.reset_index(drop=True)

    def read_many(self, symbols: list[str], start: Any = None, end: Any = None) -> pd.DataFrame:
        parts = [self.read(s, start, end) for s in symbols]
        parts = [p for p in parts if len(p)]
        return pd.concat(parts, ignore_index=True) if parts else empty_bars()

    def _read_part(
        self, symbol: str, f: FileInfo, entry_path: str | None, adopt: bool = False
    ) -> tuple[pd.DataFrame, dict[str, Any] | None]:
        """One part's bars, refused unless its bytes match its entry and its bars keep the rules.

        Returns the bars and the part's entry: the manifest's, or for a part
        written before manifests the one it would have (only with ``adopt``).
        """

        def read_all() -> Any:
            with self.fs.open_input_file(f.path) as fh:
                return fh.read_buffer()

        data = self._call(read_all)
        name = posixpath.basename(f.path)
        if entry_path is None:
            # Written before manifests: there is no checksum to check (verify(adopt=True) records one);
            # the bar rules below still hold it to what a bar is.
            entry = _entry(name, data, f.rows, f.first.value, f.last.value) if adopt else None
        else:
            entry = self._read_entry(f.path, entry_path)
            if data.size != entry["size"]:
                raise CorruptPartError(f.path, f"it has {data.size} bytes; its manifest entry says {entry['size']}")
            digest = hashlib.sha256(data).hexdigest()
            if digest != entry["sha256"]:
                raise CorruptPartError(
                    f.path, f"its sha256 is {digest[:16]}..., its manifest entry says {entry['sha256'][:16]}... "
                    f"(same size: bytes inside it were changed)")
        try:
            df = from_table(pq.read_table(pa.BufferReader(data), schema=BAR_SCHEMA))
        except (pa.ArrowException, OSError, ValueError) as e:
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise CorruptPartError(f.path, f"it is not a readable Parquet file of bars ({why})") from None
        if len(df) != f.rows or (len(df) and (df["ts"].iloc[0] != f.first or df["ts"].iloc[-1] != f.last)):
            got = f"{len(df)} rows from {df['ts'].iloc[0]} to {df['ts'].iloc[-1]}" if len(df) else "no rows"
            raise CorruptPartError(f.path, f"its name says {f.rows} rows from {f.first} to {f.last}; it holds {got}")
        others = df["symbol"] != symbol.upper()
        if others.any():
            row = int(others.to_numpy().argmax())
            raise CorruptPartError(
                f.path, f"row {row + 1} is a bar of {df['symbol'].iloc[row]!r} in the {symbol.upper()} partition")
        bad = first_bad_row(df)
        if bad is not None:
            row, why = bad
            raise CorruptPartError(f.path, f"row {row + 1} (ts {df['ts'].iloc[row]}) breaks the bar rules: {why}")
        return df, entry

    def _read_entry(self, part_path: str, entry_path: str) -> dict[str, Any]:
        def read() -> bytes:
            with self.fs.open_input_stream(entry_path) as fh:
                return fh.read()

        try:
            entry = json.loads(self._call(read))
            ok = (
                isinstance(entry, dict)
                and entry.get("format") == MANIFEST_FORMAT
                and entry.get("part") == posixpath.basename(part_path)
                and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)
                and len(entry["sha256"]) == 64
            )
        except ValueError as e:
            raise CorruptPartError(part_path, f"its manifest entry {entry_path} is not valid JSON ({e})") from None
        if not ok:
            raise CorruptPartError(
                part_path, f"its manifest entry {entry_path} is not a format-{MANIFEST_FORMAT} entry for this part "
                "(needs format, part, size, sha256)")
        return entry

    # -- verification ------------------------------------------------------------
    def verify(self, adopt: bool = False) -> StoreCheck:
        """Check every part of every symbol as a read would; report every bad one instead of stopping.

        Also reports a manifest entry whose part is missing. With ``adopt``,
        a good part written before manifests gets its entry now.
        """
        bad: list[BadPart] = []
        counts = {"parts": 0, "bars": 0, "unchecked": 0, "adopted": 0, "interrupted": 0}
        for sym in self._symbol_dirs():
            listing = self._scan(sym)
            visible = set()
            prev = None
            for f in listing.parts:
                name = posixpath.basename(f.path)
                visible.add(name)
                counts["parts"] += 1
                if prev is not None and f.first <= prev.last:
                    bad.append(BadPart(sym, f.path, _overlap(prev)))
                    continue
                prev = f
                try:
                    df, entry = self._read_part(sym, f, listing.entries.get(name), adopt)
                except CorruptPartError as e:
                    bad.append(BadPart(sym, f.path, e.reason))
                    continue
                counts["bars"] += len(df)
                if name not in listing.entries:
                    counts["unchecked"] += 1
                    if entry is not None:
                        self._ensure_dir(posixpath.join(self._symbol_dir(sym), MANIFEST_DIR))
                        self._write_entry(f.path, entry)
                        counts["adopted"] += 1
            for name, entry_path in sorted(listing.entries.items()):
                if name not in visible and name not in listing.hidden_parts:
                    path = posixpath.join(self._symbol_dir(sym), name)
                    bad.append(BadPart(sym, path, f"it is missing: the manifest lists it ({entry_path})"))
            counts["interrupted"] += len((set(listing.hidden_parts) | set(listing.hidden_entries)) - visible)
        return StoreCheck(**counts, bad=bad)

def _entry(name: str, data: Any, rows: int, first_ns: int, last_ns: int) -> dict[str, Any]:
    """A part's manifest entry: what its bytes must hash to, and what its name claims."""
    return {"format": MANIFEST_FORMAT, "part": name, "sha256": hashlib.sha256(data).hexdigest(), "size": data.size,
            "rows": rows, "first_ns": int(first_ns), "last_ns": int(last_ns)}


def _overlap(prev: FileInfo) -> str:
    return (f"its bars overlap part {prev.path}, which ends at {prev.last}: ts must increase per symbol "
            "(two writers appended the same bars?); remove one of the two (and its manifest entry)")


def _utc(t: Any) -> pd.Timestamp | None:
    if t is None:
        return None
    ts = pd.Timestamp(t)
    return ts.tz_localize("UTC") if ts.tz is None else ts.tz_convert("UTC")
