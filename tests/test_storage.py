"""The media stores: local files and S3-compatible buckets, and which keys they accept."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from bot.settings import BotSettings
from bot.storage import (
    LocalMediaStore,
    MediaNotFound,
    S3MediaStore,
    make_store,
)

# --- LocalMediaStore -----------------------------------------------------------------------


async def test_local_put_get_exists_delete(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path)
    assert not await store.exists("jobs/abc/0.png")
    with pytest.raises(MediaNotFound):
        await store.get("jobs/abc/0.png")

    await store.put("jobs/abc/0.png", b"one", "image/png")
    assert await store.exists("jobs/abc/0.png")
    assert await store.get("jobs/abc/0.png") == b"one"
    assert (tmp_path / "jobs" / "abc" / "0.png").read_bytes() == b"one"

    await store.put("jobs/abc/0.png", b"two", "image/png")  # replaces
    assert await store.get("jobs/abc/0.png") == b"two"
    # The atomic write leaves no temporary file behind.
    assert sorted(os.listdir(tmp_path / "jobs" / "abc")) == ["0.png"]

    await store.delete("jobs/abc/0.png")
    assert not await store.exists("jobs/abc/0.png")
    await store.delete("jobs/abc/0.png")  # deleting again is fine
    with pytest.raises(MediaNotFound):
        await store.get("jobs/abc/0.png")


async def test_local_directory_is_not_an_object(tmp_path: Path) -> None:
    store = LocalMediaStore(tmp_path)
    await store.put("jobs/abc/0.png", b"x", "image/png")
    assert not await store.exists("jobs/abc")
    with pytest.raises(MediaNotFound):
        await store.get("jobs/abc")


@pytest.mark.parametrize(
    "key",
    [
        "",
        "../escape.png",
        "jobs/../../escape.png",
        "jobs/..",
        "/etc/passwd",
        "//server/share",
        "jobs//0.png",
        "jobs/./0.png",
        ".hidden",
        "jobs/abc/",
        "jobs\\..\\escape.png",
        "C:/Windows/x",
        "jobs/a\x00b.png",
        "jobs/ab c.png",
        "x" * 300,
    ],
)
async def test_local_rejects_unsafe_keys(tmp_path: Path, key: str) -> None:
    store = LocalMediaStore(tmp_path / "media")
    with pytest.raises(ValueError):
        await store.put(key, b"x", "image/png")
    with pytest.raises(ValueError):
        await store.get(key)
    with pytest.raises(ValueError):
        await store.exists(key)
    with pytest.raises(ValueError):
        await store.delete(key)
    assert not (tmp_path / "escape.png").exists()


async def test_local_rejects_symlink_escape(tmp_path: Path) -> None:
    root = tmp_path / "media"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    store = LocalMediaStore(root)
    with pytest.raises(ValueError):
        await store.put("link/x.png", b"x", "image/png")
    assert not (outside / "x.png").exists()


# --- S3MediaStore (against a fake client: the real one needs a server) ---------------------


class _ClientError(Exception):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.response = {"Error": {"Code": code}}


class _Body:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def read(self) -> bytes:
        return self._data

    def close(self) -> None:
        pass


class FakeS3:
    """Just enough of boto3's S3 client for the store."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], tuple[bytes, str]] = {}

    def put_object(self, *, Bucket: str, Key: str, Body: bytes, ContentType: str) -> None:
        self.objects[(Bucket, Key)] = (Body, ContentType)

    def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        if (Bucket, Key) not in self.objects:
            raise _ClientError("NoSuchKey")
        return {"Body": _Body(self.objects[(Bucket, Key)][0])}

    def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        if (Bucket, Key) not in self.objects:
            raise _ClientError("404")
        return {}

    def delete_object(self, *, Bucket: str, Key: str) -> None:
        self.objects.pop((Bucket, Key), None)


async def test_s3_store_round_trip_with_prefix() -> None:
    fake = FakeS3()
    store = S3MediaStore("bucket", prefix="/mirage/", client=fake)
    assert not await store.exists("jobs/a/0.png")
    with pytest.raises(MediaNotFound):
        await store.get("jobs/a/0.png")
    await store.put("jobs/a/0.png", b"data", "image/png")
    assert fake.objects[("bucket", "mirage/jobs/a/0.png")] == (b"data", "image/png")
    assert await store.exists("jobs/a/0.png")
    assert await store.get("jobs/a/0.png") == b"data"
    await store.delete("jobs/a/0.png")
    assert not await store.exists("jobs/a/0.png")
    with pytest.raises(ValueError):
        await store.put("../x", b"x", "image/png")


async def test_s3_store_passes_other_errors_through() -> None:
    class Denied(FakeS3):
        def head_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
            raise _ClientError("AccessDenied")

    with pytest.raises(_ClientError):
        await S3MediaStore("bucket", client=Denied()).exists("jobs/a/0.png")


def test_make_store(tmp_path: Path) -> None:
    local = make_store(BotSettings(media_dir=tmp_path / "m"))
    assert isinstance(local, LocalMediaStore)
    assert local.root == (tmp_path / "m").resolve()

    settings = SimpleNamespace(
        media_dir=tmp_path,
        media_backend="s3",
        s3_bucket="pics",
        s3_endpoint_url="http://minio:9000",
        s3_region="auto",
        s3_access_key="AK",
        s3_secret_key="SK",
        s3_prefix="mirage",
    )
    s3 = make_store(cast(BotSettings, settings))
    assert isinstance(s3, S3MediaStore)
    assert (s3.bucket, s3.endpoint_url, s3.prefix) == ("pics", "http://minio:9000", "mirage")

    with pytest.raises(ValueError):
        make_store(cast(BotSettings, SimpleNamespace(media_dir=tmp_path, media_backend="s3", s3_bucket="")))
    with pytest.raises(ValueError):
        make_store(cast(BotSettings, SimpleNamespace(media_dir=tmp_path, media_backend="ftp")))
