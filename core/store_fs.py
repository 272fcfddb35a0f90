"""The filesystem under the bar store: opening it, and files under its root written whole.

``open_filesystem`` turns a store URI (a local directory, or
``s3://bucket/prefix`` on MinIO or S3) into a pyarrow filesystem and the root
inside it; ``minio_client`` is a minio client on the same endpoint and keys,
for what pyarrow does not offer (the registry's conditional writes,
``core.models.artefacts``). ``StoreRoot`` is a root on such a filesystem, with every
operation going through one ``call`` (retry and breaker, ``core.resilience``)
and files that appear only whole: written under a ``HIDDEN`` name and
renamed locally, one PUT on S3. Its ``put_bytes``, ``get_bytes`` and
``exists`` keep the bytes that sit beside the bars (model artefacts, learner
runs).

Not here: bars, their parts, manifests and checks (``core.store.BarStore``,
built on ``StoreRoot``); which keys and endpoint to use (``cluster.settings``).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any, Callable
from urllib.parse import urlparse

import pyarrow.fs as pafs

# A file whose name starts with this is a write in progress (or one a crash cut short): readers skip
# names that start with "." (pyarrow's rule), so it is invisible until renamed.
HIDDEN = ".tmp-"


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
    return pafs.LocalFileSystem(), os.path.abspath(uri)


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


class StoreRoot:
    """Files under one root on a pyarrow filesystem. Cheap to construct; holds no open files."""

    def __init__(self, fs: pafs.FileSystem, root: str, call: Callable[..., Any] | None = None, uri: str | None = None):
        self.fs = fs
        self.root = root.rstrip("/")
        self.is_local = isinstance(fs, pafs.LocalFileSystem)
        self.uri = uri or self.root
        # Every filesystem operation goes through ``call`` (retry + breaker).
        self._call = call or (lambda fn, *a, **k: fn(*a, **k))

    # -- paths -----------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _ensure_dir(self, path: str) -> None:
        self._call(self.fs.create_dir, path, recursive=True)

    # -- writing -----------------------------------------------------------------
    def _write_bytes(self, path: str, data: Any) -> None:
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def _write_whole(self, final: str, data: Any) -> None:
        """Write ``final`` so that it appears only whole: hidden name then rename locally, one PUT on S3."""
        if self.is_local:
            tmp = posixpath.join(posixpath.dirname(final), f"{HIDDEN}{uuid.uuid4().hex[:8]}-{posixpath.basename(final)}")

            def write_and_rename() -> None:
                self._write_bytes(tmp, data)
                self.fs.move(tmp, final)  # rename(2): atomic on one filesystem

            self._call(write_and_rename)
        else:
            # An S3 object becomes visible only when its upload completes.
            self._call(self._write_bytes, final, data)

    # -- artefacts (bytes beside the bars) -------------------------------------------
    def put_bytes(self, relpath: str, data: bytes) -> str:
        final = self.path(relpath)
        self._ensure_dir(posixpath.dirname(final))
        self._write_whole(final, data)
        return final

    def get_bytes(self, relpath: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path(relpath)) as f:
                return f.read()

        return self._call(read)

    def exists(self, relpath: str) -> bool:
        info = self._call(self.fs.get_file_info, self.path(relpath))
        return info.type != pafs.FileType.NotFound

