"""The media stores: local files and S3-compatible buckets, and which keys they accept."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from bot.settings import BotSettings
from bot.storage import (
    LocalMediaStore,
    MediaNotFound,
    MediaStoreError,
    S3MediaStore,
    make_store,
)
from tests.fakes.s3_server import FakeS3Server

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


# --- S3MediaStore: the real boto3 client against a fake S3 server ----------------------------------


@pytest.fixture
async def s3() -> AsyncIterator[FakeS3Server]:
    pytest.importorskip("boto3")
    async with FakeS3Server() as server:
        yield server


def s3_store(server: FakeS3Server, **kwargs: Any) -> S3MediaStore:
    return S3MediaStore(
        "mirage",
        endpoint_url=server.endpoint_url,
        region="us-east-1",
        access_key="test-access-key",
        secret_key="test-secret-key",
        **kwargs,
    )


async def test_s3_store_round_trip_with_prefix(s3: FakeS3Server) -> None:
    store = s3_store(s3, prefix="/mirage/")
    assert not await store.exists("jobs/a/0.png")
    with pytest.raises(MediaNotFound):
        await store.get("jobs/a/0.png")
    await store.put("jobs/a/0.png", b"data" * 1000, "image/png")
    stored = s3.objects()["mirage/jobs/a/0.png"]
    assert (stored.data, stored.content_type) == (b"data" * 1000, "image/png")
    assert await store.exists("jobs/a/0.png")
    assert await store.get("jobs/a/0.png") == b"data" * 1000
    await store.delete("jobs/a/0.png")
    assert not await store.exists("jobs/a/0.png")
    with pytest.raises(ValueError):
        await store.put("../x", b"x", "image/png")


async def test_s3_failures_are_media_store_errors_without_secrets(s3: FakeS3Server) -> None:
    # One exception type for every backend, so the bot retries or waits instead of crashing.
    store = s3_store(s3)
    await store.put("jobs/a/0.png", b"data", "image/png")
    for breakage in (s3.deny, s3.outage):
        breakage()
        for call in (
            store.get("jobs/a/0.png"),
            store.exists("jobs/a/0.png"),
            store.put("k/1.png", b"x", "image/png"),
        ):
            with pytest.raises(MediaStoreError) as caught:
                await call
            assert "test-secret-key" not in str(caught.value) and "test-access-key" not in str(caught.value)
    s3.restore()
    assert await store.get("jobs/a/0.png") == b"data"


async def test_an_unreachable_s3_fails_fast_as_a_media_store_error() -> None:
    pytest.importorskip("boto3")
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = S3MediaStore(
        "mirage", endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1", access_key="a", secret_key="b"
    )
    with pytest.raises(MediaStoreError, match="upload"):
        await store.put("jobs/a/0.png", b"x", "image/png")


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
