"""Model artefacts in the store: bytes written once, read back only if their sha256 matches,
and the one conditional write that every shared file of the registry goes through.

Artefacts live beside the bars under the store's root: through the minio client
when the store is ``s3://`` (MinIO or S3), through the file system on a local
directory. Calls go through ``core.resilience`` (retry and circuit breaker); a
missing object or a refusal is an answer, not an outage.

Conditional writes (``put_if``) are how two writers never lose each other's
change. Every read of a shared file (``get_tagged``) comes with a *tag* that
names the exact bytes read; ``put_if(rel, data, tag)`` replaces the file only
if it still holds those bytes, and answers None otherwise (the caller re-reads,
re-applies its change and tries again; on success it answers the new tag). ``tag=None`` means "only if absent":
an artefact is created once and never overwritten.

- S3/MinIO: the tag is the object's ETag, and the write is one PUT with an
  ``If-Match: <etag>`` (or ``If-None-Match: *``) precondition; the server
  refuses a stale one with 412.
- Local: the tag is the sha256 of the file's bytes; the write takes an
  exclusive ``flock`` on ``<file>.lock``, checks the tag under the lock, writes
  a hidden temporary file, fsyncs it and renames it over the old one (create
  only: ``link(2)``, which fails if the name exists). A writer that dies
  mid-write leaves the old bytes and a hidden temporary, never a torn file.

Not here: which artefacts exist (``core.models.registry``), or loading them into
ONNX Runtime (``core.models.cache``).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import posixpath
import uuid
from typing import Any, Callable
from urllib.parse import urlparse

from core.models.errors import CorruptArtefact, RegistryError
from core.resilience import Resilient
from core.store_fs import HIDDEN, minio_client



def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Local:
    """A local directory: atomic renames, a lock file per shared file, tags are sha256s."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def _path(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/"))

    def get_tagged(self, rel: str) -> tuple[bytes | None, str | None]:
        try:
            with open(self._path(rel), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None, None
        return data, sha256(data)

    def tag(self, rel: str) -> str | None:
        return self.get_tagged(rel)[1]

    def _write_tmp(self, final: str, data: bytes) -> str:
        d = os.path.dirname(final)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f"{HIDDEN}{uuid.uuid4().hex[:8]}-{os.path.basename(final)}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def put(self, rel: str, data: bytes) -> None:
        final = self._path(rel)
        tmp = self._write_tmp(final, data)
        os.replace(tmp, final)  # rename(2): atomic on one file system

    def put_if(self, rel: str, data: bytes, tag: str | None) -> str | None:
        final = self._path(rel)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if tag is None:  # create only: link(2) fails if the name exists, whoever made it
            tmp = self._write_tmp(final, data)
            try:
                os.link(tmp, final)
                return sha256(data)
            except FileExistsError:
                return None
            finally:
                os.unlink(tmp)
        with open(final + ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.tag(rel) != tag:
                    return None
                tmp = self._write_tmp(final, data)
                os.replace(tmp, final)
                return sha256(data)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        out = []
        for d, _, files in os.walk(base):
            for f in files:
                if not f.startswith(HIDDEN) and not f.endswith(".lock"):
                    out.append(posixpath.relpath(os.path.join(d, f), self.root).replace(os.sep, "/"))
        return sorted(out)

    def delete(self, rel: str) -> None:
        try:
            os.unlink(self._path(rel))
        except FileNotFoundError:
            pass


class _S3:
    """A bucket (and key prefix) through the minio client; tags are ETags, conditions are HTTP preconditions."""

    def __init__(self, s: Any) -> None:
        # Imported here: minio takes over a second to import, and only an s3:// store needs it.
        from minio.error import S3Error

        self.S3Error = S3Error
        parsed = urlparse(s.uri)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.client = minio_client(s)

    def _key(self, rel: str) -> str:
        return posixpath.join(self.prefix, rel) if self.prefix else rel

    def _missing(self, e: Exception, rel: str) -> Exception | None:
        if isinstance(e, self.S3Error):
            if e.code in ("NoSuchKey", "NoSuchObject"):
                return FileNotFoundError(f"s3://{self.bucket}/{self._key(rel)}")
            if e.code == "NoSuchBucket":
                return FileNotFoundError(f"bucket {self.bucket} does not exist; create it first")
        return None

    def get_tagged(self, rel: str) -> tuple[bytes | None, str | None]:
        try:
            resp = self.client.get_object(self.bucket, self._key(rel))
        except self.S3Error as e:
            if self._missing(e, rel) is not None:
                return None, None
            raise
        try:
            return resp.read(), (resp.headers.get("ETag") or "").strip('"') or None
        finally:
            resp.close()
            resp.release_conn()

    def tag(self, rel: str) -> str | None:
        try:
            return (self.client.stat_object(self.bucket, self._key(rel)).etag or "").strip('"') or None
        except self.S3Error as e:
            if self._missing(e, rel) is not None:
                return None
            raise

    def put(self, rel: str, data: bytes) -> None:
        # An S3 object becomes visible only when its upload completes.
        self.client.put_object(self.bucket, self._key(rel), io.BytesIO(data), len(data),
                               content_type="application/octet-stream")

    def put_if(self, rel: str, data: bytes, tag: str | None) -> str | None:
        # minio's public put_object sends unknown headers as user metadata, so the precondition
        # goes through its one-request PUT (minio 7.2's _put_object; guarded below).
        headers = {"Content-Type": "application/octet-stream"}
        headers.update({"If-None-Match": "*"} if tag is None else {"If-Match": f'"{tag}"'})
        put = getattr(self.client, "_put_object", None)
        if put is None:  # pragma: no cover - a minio without it
            raise RegistryError("this minio client cannot send a conditional PUT; install minio>=7.2")
        try:
            return (put(self.bucket, self._key(rel), data, headers=headers).etag or "").strip('"') or "?"
        except self.S3Error as e:
            # 412: the object changed (or exists); 409: another conditional write is in flight.
            if e.code in ("PreconditionFailed", "ConditionalRequestConflict") or \
                    getattr(getattr(e, "response", None), "status", None) in (409, 412):
                return None
            if tag is not None and self._missing(e, rel) is not None:
                return None  # If-Match on an object deleted since it was read
            raise

    def list(self, prefix: str) -> list[str]:
        start = len(self.prefix) + 1 if self.prefix else 0
        objs = self.client.list_objects(self.bucket, prefix=self._key(prefix).rstrip("/") + "/", recursive=True)
        return sorted(o.object_name[start:] for o in objs)

    def delete(self, rel: str) -> None:
        self.client.remove_object(self.bucket, self._key(rel))


class ArtefactStore:
    """Bytes under the store's root, with tagged reads and conditional writes (see the module docstring)."""

    def __init__(self, backend: Any, uri: str, call: Callable[..., Any] | None = None) -> None:
        self.backend, self.uri = backend, uri
        self._call = call or (lambda fn, *a, **k: fn(*a, **k))

    @classmethod
    def from_settings(cls, settings: Any) -> "ArtefactStore":
        s = settings.store
        # A missing object or a refusal is an answer, not an outage: no retry, no breaker count.
        call = Resilient.from_settings(
            "store-artefacts", settings.resilience, non_retryable=(FileNotFoundError, KeyError, PermissionError)
        ).call
        backend = _S3(s) if s.uri.startswith("s3://") else _Local(s.uri)
        return cls(backend, s.uri, call)

    def put(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` whole (atomic on both backends); for files only one writer ever writes."""
        self._call(self.backend.put, rel, data)

    def get(self, rel: str) -> bytes:
        data, _ = self.get_tagged(rel)
        if data is None:
            raise FileNotFoundError(f"{rel} in {self.uri}")
        return data

    def get_tagged(self, rel: str) -> tuple[bytes | None, str | None]:
        """The bytes of ``rel`` and the tag that names them; ``(None, None)`` when it is absent."""
        return self._call(self.backend.get_tagged, rel)

    def tag(self, rel: str) -> str | None:
        """The tag of ``rel`` now (a HEAD on S3), None when absent: the cheap "has it changed?"."""
        return self._call(self.backend.tag, rel)

    def put_if(self, rel: str, data: bytes, tag: str | None) -> str | None:
        """Write ``rel`` only if it still has ``tag`` (``None``: only if absent): the new tag, or None
        when the file had changed (someone else wrote; re-read and try again)."""
        return self._call(self.backend.put_if, rel, data, tag)

    def list(self, prefix: str) -> list[str]:
        """Every file under ``prefix`` (relative paths), temporaries and locks left out."""
        return self._call(self.backend.list, prefix)

    def delete(self, rel: str) -> None:
        self._call(self.backend.delete, rel)

    def load_verified(self, record: dict[str, Any]) -> bytes:
        """The artefact of ``record``, refused unless its sha256 matches."""
        try:
            data = self.get(record["path"])
        except FileNotFoundError:
            raise CorruptArtefact(
                f"{record['name']} v{record['version']}: artefact {record['path']} is missing from {self.uri}"
            ) from None
        got = sha256(data)
        if got != record["sha256"]:
            raise CorruptArtefact(
                f"{record['name']} v{record['version']}: artefact {record['path']} has sha256 {got[:16]}..., "
                f"registered as {record['sha256'][:16]}... ({len(data)} bytes, registered {record['size']}); "
                "it is corrupted: refusing to load it. Roll back or register the model again."
            )
        return data


def check_onnx(data: bytes) -> None:
    """Refuse bytes that are not a well-formed ONNX model."""
    # Imported here: onnx takes about a second to import, and only registering checks a graph.
    import onnx

    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except Exception as e:  # noqa: BLE001 - onnx raises many kinds
        raise RegistryError(f"not a valid ONNX model: {str(e).splitlines()[0][:300]}") from None
