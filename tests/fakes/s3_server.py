"""A fake S3-compatible object store (path-style, as MinIO serves it) for the real boto3 client.

It serves ``PUT``, ``GET``, ``HEAD`` and ``DELETE`` on ``/{bucket}/{key}`` at 127.0.0.1 (a free
port), with S3's XML errors (``NoSuchKey``, ``NoSuchBucket``, ``AccessDenied``), and decodes
``aws-chunked`` uploads (recent botocore sends checksummed bodies that way). Signatures are not
checked: the bot's own logic, not AWS's auth, is under test. It can be broken on purpose:
``outage()`` answers every request with ``503 ServiceUnavailable`` until ``restore()``, and
``deny()`` answers ``403 AccessDenied``. Every request is recorded.

Run it on the test's event loop (``async with FakeS3Server() as s3``): the store calls boto3 from
worker threads, so the loop stays free to serve them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from xml.sax.saxutils import escape

from aiohttp import web


@dataclass
class StoredObject:
    """One object: bytes and the content type it was uploaded with."""

    data: bytes
    content_type: str

    @property
    def etag(self) -> str:
        """S3's ETag of a single-part upload: the MD5 of the bytes, quoted."""
        return f'"{hashlib.md5(self.data, usedforsecurity=False).hexdigest()}"'


def decode_aws_chunked(body: bytes) -> bytes:
    """The payload of an ``aws-chunked`` body: ``<hex size>[;ext]\\r\\n<data>\\r\\n`` … ``0\\r\\n``."""
    out = bytearray()
    pos = 0
    while True:
        end = body.index(b"\r\n", pos)
        size = int(body[pos:end].split(b";", 1)[0], 16)
        pos = end + 2
        if size == 0:
            return bytes(out)  # trailers (checksums) follow; nothing else of ours
        out += body[pos : pos + size]
        pos += size + 2


class FakeS3Server:
    """The fake store. ``endpoint_url`` is what ``S3_ENDPOINT_URL`` should be set to."""

    def __init__(self, buckets: tuple[str, ...] = ("mirage",)) -> None:
        self.buckets: dict[str, dict[str, StoredObject]] = {name: {} for name in buckets}
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.failing: tuple[int, str] | None = None
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ breaking it

    def outage(self) -> None:
        """Answer everything with 503 ServiceUnavailable (S3's "try again") until ``restore()``."""
        self.failing = (503, "ServiceUnavailable")

    def deny(self) -> None:
        """Answer everything with 403 AccessDenied (wrong keys, a bucket policy) until ``restore()``."""
        self.failing = (403, "AccessDenied")

    def restore(self) -> None:
        """Serve normally again."""
        self.failing = None

    def objects(self, bucket: str = "mirage") -> dict[str, StoredObject]:
        """What the bucket holds, by key."""
        return self.buckets[bucket]

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> FakeS3Server:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{bucket}/{key:.+}", self._object)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ------------------------------------------------------------------ handlers

    @staticmethod
    def _error(status: int, code: str, resource: str) -> web.Response:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{code}</Message>"
            f"<Resource>{escape(resource)}</Resource><RequestId>fake</RequestId></Error>"
        )
        # A HEAD answer carries no body; boto3 then reports the status code as the error code.
        return web.Response(status=status, text=body, content_type="application/xml")

    async def _object(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, request.path))
        bucket_name, key = request.match_info["bucket"], request.match_info["key"]
        if self.failing is not None:
            status, code = self.failing
            await request.read()  # drain the upload so the client sees the answer, not a reset
            return self._error(status, code, request.path)
        bucket = self.buckets.get(bucket_name)
        if bucket is None:
            return self._error(404, "NoSuchBucket", request.path)
        if request.method == "PUT":
            body = await request.read()
            encoding = request.headers.get("Content-Encoding", "")
            sha = request.headers.get("x-amz-content-sha256", "")
            if "aws-chunked" in encoding or sha.startswith("STREAMING-"):
                body = decode_aws_chunked(body)
            stored = StoredObject(body, request.headers.get("Content-Type", "binary/octet-stream"))
            bucket[key] = stored
            return web.Response(status=200, headers={"ETag": stored.etag})
        stored = bucket.get(key)
        if request.method == "DELETE":
            bucket.pop(key, None)
            return web.Response(status=204)
        if stored is None:
            return self._error(404, "NoSuchKey", request.path)
        headers = {"ETag": stored.etag, "Content-Type": stored.content_type}
        if request.method == "HEAD":
            return web.Response(status=200, headers={**headers, "Content-Length": str(len(stored.data))})
        if request.method == "GET":
            return web.Response(status=200, body=stored.data, headers=headers)
        return self._error(405, "MethodNotAllowed", request.path)
