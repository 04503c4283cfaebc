"""The media store: where result images live (a local folder by default, or S3-compatible storage).

Images are kept by the bot rather than linked from Discord's CDN, whose URLs expire. Everything
that touches the disk or the network runs in a thread so the event loop never blocks on it.
What is stored under which key, and the image processing around it, is in ``bot.media``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from bot.settings import BotSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

THUMBNAIL_MAX_SIDE = 384
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 30.0
MAX_KEY_LENGTH = 255  # Image.key is a String(255)

# One path segment: starts with a letter, digit, "_" or "-" (so never "." / ".." / a hidden
# file), then the same plus dots. Job ids (token_urlsafe) and our own names all fit.
_SEGMENT = r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]*"
_KEY_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")

# Pillow format name → (file extension, content type) for the formats we accept and re-encode.
FORMATS: dict[str, tuple[str, str]] = {
    "PNG": ("png", "image/png"),
    "JPEG": ("jpg", "image/jpeg"),
    "MPO": ("jpg", "image/jpeg"),  # a JPEG with extra frames (some cameras); the first frame is kept
    "WEBP": ("webp", "image/webp"),
}


class MediaNotFound(LookupError):
    """No object is stored under the requested key."""


class MediaStoreError(OSError):
    """The media store could not take an object (disk full, read-only, S3 unreachable).

    Transient or not, the bot retries a few times with growing pauses (``STORE_RETRY_DELAYS_S``)
    and then fails the job with a refund; it never loops on a store that stays broken.
    """


# Pauses between attempts to store one result; after the last, the job fails and is refunded.
STORE_RETRY_DELAYS_S: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)


class RetrySchedule:
    """Failed attempts per key and when the next one is due, over a fixed list of pauses."""

    def __init__(
        self, delays: tuple[float, ...] = STORE_RETRY_DELAYS_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.delays = delays
        self.clock = clock
        self._state: dict[str, tuple[int, float]] = {}  # key → (failures, when the next try is due)

    def due(self, key: str) -> bool:
        """Whether ``key`` may be tried now (never failed, or its pause is over)."""
        state = self._state.get(key)
        return state is None or self.clock() >= state[1]

    def failed(self, key: str) -> float | None:
        """Record a failure: the pause before the next try, or None when the tries are used up."""
        failures = self._state.get(key, (0, 0.0))[0] + 1
        if failures > len(self.delays):
            self._state.pop(key, None)
            return None
        delay = self.delays[failures - 1]
        self._state[key] = (failures, self.clock() + delay)
        return delay

    def succeeded(self, key: str) -> None:
        """Forget ``key``'s failures."""
        self._state.pop(key, None)


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ``ValueError``.

    Keys end up as file paths in the local store, so anything that could climb out of the root
    (``..``, absolute paths, backslashes, NUL bytes, empty segments) is refused for every store.
    """
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"invalid media key: {key!r}")
    if ".." in key.split("/") or not _KEY_RE.fullmatch(key):
        raise ValueError(f"invalid media key: {key!r}")
    return key


class MediaStore(ABC):
    """Bytes by key. Keys are relative, slash-separated paths such as ``jobs/<id>/0.png``."""

    @abstractmethod
    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Store ``data`` under ``key``, replacing any previous object atomically."""

    @abstractmethod
    async def get(self, key: str) -> bytes:
        """The bytes under ``key``; raises ``MediaNotFound`` when there are none."""

    @abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove the object under ``key``; a missing object is not an error."""


class LocalMediaStore(MediaStore):
    """Objects as files under ``root``; writes go to a temporary file that is then renamed."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def path_for(self, key: str) -> Path:
        """The file for ``key``, refusing keys that would resolve outside the root."""
        path = (self.root / validate_key(key)).resolve()
        # The key check already forbids "..", but a symlink planted inside the root could still
        # point elsewhere; resolving and comparing catches that too.
        if not path.is_relative_to(self.root):
            raise ValueError(f"invalid media key: {key!r}")
        return path

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Write ``data`` to a temporary file beside the target, fsync it, then rename it over."""
        path = self.path_for(key)
        await asyncio.to_thread(_atomic_write, path, data)

    async def get(self, key: str) -> bytes:
        """Read the file for ``key``."""
        path = self.path_for(key)
        try:
            return await asyncio.to_thread(path.read_bytes)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise MediaNotFound(key) from None

    async def exists(self, key: str) -> bool:
        """Whether the file for ``key`` exists."""
        path = self.path_for(key)
        return await asyncio.to_thread(path.is_file)

    async def delete(self, key: str) -> None:
        """Remove the file for ``key`` if present."""
        path = self.path_for(key)
        await asyncio.to_thread(path.unlink, missing_ok=True)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file lives in the target's folder so the rename stays on one filesystem,
    # which is what makes os.replace atomic: readers see the old file or the new one, never half.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes 0600; a separate web server may need to read it
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


class S3MediaStore(MediaStore):
    """An S3-compatible bucket (AWS, MinIO, Cloudflare R2, Backblaze B2…) through boto3.

    boto3 is synchronous and optional (the ``s3`` extra), so it is imported on first use and
    every call runs in a worker thread. boto3 clients are thread-safe; one is shared.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key: str | None = None,
        secret_key: str | None = None,
        prefix: str = "",
        client: Any = None,
    ) -> None:
        if not bucket:
            raise ValueError("S3MediaStore needs a bucket name")
        self.bucket = bucket
        self.endpoint_url = endpoint_url or None
        self.region = region or None
        # Empty credentials mean "use boto3's own chain" (environment, instance role…).
        self._access_key = access_key or None
        self._secret_key = secret_key or None
        self.prefix = prefix.strip("/")
        self._client = client

    def _object_key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created on first use."""
        if self._client is None:
            try:
                import boto3
            except ImportError as exc:  # pragma: no cover - depends on the optional extra
                raise RuntimeError("the S3 media store needs boto3: pip install 'mirage-bot[s3]'") from exc
            from botocore.config import Config

            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=self._access_key,
                aws_secret_access_key=self._secret_key,
                # A store that hangs must not hold a delivery for minutes (botocore waits 60 s
                # per connect and per read by default): the bot's own paced retries take over.
                config=Config(
                    connect_timeout=S3_CONNECT_TIMEOUT_S,
                    read_timeout=S3_READ_TIMEOUT_S,
                    retries={"mode": "standard", "max_attempts": 3},
                ),
            )
        return self._client

    def _call(self, operation: str, key: str, call: Callable[[], T]) -> T:
        """Run one boto3 call; any failure but a missing object becomes ``MediaStoreError``."""
        try:
            return call()
        except Exception as exc:
            if self._is_missing(exc):
                raise MediaNotFound(key) from None
            # One exception type for every backend (botocore's are ClientError, EndpointConnectionError…).
            raise MediaStoreError(f"S3 {operation} of {key} failed: {type(exc).__name__}: {exc}") from exc

    @staticmethod
    def _is_missing(exc: Exception) -> bool:
        response = getattr(exc, "response", None)
        if not isinstance(response, dict):
            return False
        code = str(response.get("Error", {}).get("Code", ""))
        return code in {"404", "NoSuchKey", "NotFound"}

    async def put(self, key: str, data: bytes, content_type: str) -> None:
        """Upload ``data``; a single PUT replaces the object atomically on S3."""
        object_key = self._object_key(key)

        def _put() -> None:
            self.client.put_object(Bucket=self.bucket, Key=object_key, Body=data, ContentType=content_type)

        await asyncio.to_thread(self._call, "upload", key, _put)

    async def get(self, key: str) -> bytes:
        """Download the object for ``key``."""
        object_key = self._object_key(key)

        def _get() -> bytes:
            response = self.client.get_object(Bucket=self.bucket, Key=object_key)
            body = response["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        return await asyncio.to_thread(self._call, "download", key, _get)

    async def exists(self, key: str) -> bool:
        """Whether the object exists (a HEAD request)."""
        object_key = self._object_key(key)

        def _head() -> bool:
            self.client.head_object(Bucket=self.bucket, Key=object_key)
            return True

        try:
            return await asyncio.to_thread(self._call, "lookup", key, _head)
        except MediaNotFound:
            return False

    async def delete(self, key: str) -> None:
        """Delete the object; S3 treats a missing key as success already."""
        object_key = self._object_key(key)

        def _delete() -> None:
            self.client.delete_object(Bucket=self.bucket, Key=object_key)

        await asyncio.to_thread(self._call, "delete", key, _delete)


def _secret(value: Any) -> str:
    if value is None:
        return ""
    getter = getattr(value, "get_secret_value", None)
    return str(getter() if getter else value)


def make_store(settings: BotSettings) -> MediaStore:
    """The store the settings ask for: ``media_backend`` "local" (default, ``media_dir``) or "s3"."""
    backend = str(getattr(settings, "media_backend", "local") or "local").lower()
    if backend == "local":
        return LocalMediaStore(Path(settings.media_dir))
    if backend == "s3":
        bucket = str(getattr(settings, "s3_bucket", "") or "")
        if not bucket:
            raise ValueError("MEDIA_BACKEND=s3 needs S3_BUCKET")
        return S3MediaStore(
            bucket,
            endpoint_url=getattr(settings, "s3_endpoint_url", None) or None,
            region=getattr(settings, "s3_region", None) or None,
            access_key=_secret(getattr(settings, "s3_access_key", None)) or None,
            secret_key=_secret(getattr(settings, "s3_secret_key", None)) or None,
            prefix=str(getattr(settings, "s3_prefix", "") or ""),
        )
    raise ValueError(f"unknown media backend {backend!r} (expected 'local' or 's3')")


def job_image_key(job_id: str, index: int, ext: str = "png") -> str:
    """The store key of a job's image ``index`` (0 = grid or single image, 1-4 = tiles)."""
    return validate_key(f"jobs/{job_id}/{index}.{ext}")


def thumbnail_key(key: str, max_side: int = THUMBNAIL_MAX_SIDE) -> str:
    """The derived key under which the thumbnail of ``key`` is cached."""
    validate_key(key)
    stem = key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key
    return validate_key(f"thumbs/{max_side}/{stem}.webp")
