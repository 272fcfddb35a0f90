"""Model artefacts in the store: bytes written once, read back only if their sha256 matches.

Artefacts live beside the bars under the store's root: through the minio client
when the store is ``s3://`` (MinIO or S3), through ``BarStore.put_bytes`` (write,
then rename) on a local directory. Calls go through ``core.resilience`` (retry
and circuit breaker); a missing object or a refusal is an answer, not an outage.

Not here: which artefacts exist (``core.models.registry``), or loading them into
ONNX Runtime (``core.models.cache``).
"""

from __future__ import annotations

import hashlib
import io
import posixpath
from typing import Any, Callable
from urllib.parse import urlparse

from core.models.errors import CorruptArtefact, RegistryError
from core.resilience import Resilient
from core.store import BarStore, minio_client


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ArtefactStore:
    """Bytes under the store's root: minio client for s3://, BarStore for a local directory."""

    def __init__(self, put: Callable[[str, bytes], None], get: Callable[[str], bytes], uri: str):
        self._put, self._get, self.uri = put, get, uri

    @classmethod
    def from_settings(cls, settings: Any) -> "ArtefactStore":
        s = settings.store
        # A missing object or a refusal is an answer, not an outage: no retry, no breaker count.
        call = Resilient.from_settings(
            "store-artefacts", settings.resilience, non_retryable=(FileNotFoundError, KeyError, PermissionError)
        ).call
        if s.uri.startswith("s3://"):
            return cls._minio(s, call)
        store = BarStore.from_settings(s)  # its own call is a plain call; ours wraps it

        return cls(lambda rel, data: call(store.put_bytes, rel, data), lambda rel: call(store.get_bytes, rel), s.uri)

    @classmethod
    def _minio(cls, s: Any, call: Callable[..., Any]) -> "ArtefactStore":
        # Imported here: minio takes over a second to import, and only an s3:// store needs it.
        from minio.error import S3Error

        parsed = urlparse(s.uri)
        bucket, prefix = parsed.netloc, parsed.path.strip("/")
        client = minio_client(s)

        def key(rel: str) -> str:
            return posixpath.join(prefix, rel) if prefix else rel

        def put(rel: str, data: bytes) -> None:
            # An S3 object becomes visible only when its upload completes.
            client.put_object(bucket, key(rel), io.BytesIO(data), len(data), content_type="application/octet-stream")

        def get(rel: str) -> bytes:
            try:
                resp = client.get_object(bucket, key(rel))
            except S3Error as e:
                if e.code in ("NoSuchKey", "NoSuchObject"):
                    raise FileNotFoundError(f"s3://{bucket}/{key(rel)}") from None
                if e.code == "NoSuchBucket":
                    raise FileNotFoundError(f"bucket {bucket} does not exist; create it first") from None
                raise
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return cls(lambda rel, data: call(put, rel, data), lambda rel: call(get, rel), s.uri)

    def put(self, rel: str, data: bytes) -> None:
        self._put(rel, data)

    def get(self, rel: str) -> bytes:
        return self._get(rel)

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
