"""Signed links: round trips, forgery, expiry, purpose binding and the persisted secret."""

from __future__ import annotations

import base64
import multiprocessing
import os
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr

from bot.settings import BotSettings
from bot.signing import (
    PRIVATE_JOB_TTL,
    PURPOSE_JOB,
    PURPOSE_REGION,
    REGION_TTL,
    BadToken,
    Signer,
    link_secret,
    load_or_create_secret,
    private_job_url,
    region_editor_url,
    signer_from_settings,
)

SECRET = b"0123456789abcdef0123456789abcdef"
JOB = "AbCdEfGhIjKlMnOpQrStUv"


class Clock:
    """A settable clock for expiry tests."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_round_trip_carries_the_claims() -> None:
    clock = Clock()
    signer = Signer(SECRET, clock=clock)
    token = signer.sign(PURPOSE_REGION, 123456789012345678, JOB, 3, REGION_TTL)
    claims = signer.verify(token, PURPOSE_REGION)
    assert (claims.purpose, claims.user_id, claims.job_id, claims.index) == (
        PURPOSE_REGION,
        123456789012345678,
        JOB,
        3,
    )
    assert claims.expires_at == int(clock.now + REGION_TTL.total_seconds())


def test_expired_tokens_are_refused() -> None:
    clock = Clock()
    signer = Signer(SECRET, clock=clock)
    token = signer.sign(PURPOSE_REGION, 1, JOB, 1, REGION_TTL)
    clock.now += REGION_TTL.total_seconds() - 1
    signer.verify(token, PURPOSE_REGION)
    clock.now += 1
    with pytest.raises(BadToken, match="expired"):
        signer.verify(token, PURPOSE_REGION)


def test_private_job_links_outlive_editor_links() -> None:
    clock = Clock()
    signer = Signer(SECRET, clock=clock)
    token = signer.sign(PURPOSE_JOB, 1, JOB, 0, PRIVATE_JOB_TTL)
    clock.now += timedelta(days=6).total_seconds()
    assert signer.verify(token, PURPOSE_JOB).job_id == JOB
    assert PRIVATE_JOB_TTL >= timedelta(days=7) > REGION_TTL == timedelta(minutes=30)


def test_a_token_for_one_purpose_opens_nothing_else() -> None:
    signer = Signer(SECRET)
    token = signer.sign(PURPOSE_JOB, 1, JOB, 0, PRIVATE_JOB_TTL)
    with pytest.raises(BadToken, match="another purpose"):
        signer.verify(token, PURPOSE_REGION)


def test_another_secret_does_not_verify() -> None:
    token = Signer(SECRET).sign(PURPOSE_REGION, 1, JOB, 1, REGION_TTL)
    with pytest.raises(BadToken, match="signature"):
        Signer(b"another secret, just as long....").verify(token, PURPOSE_REGION)


def _tamper(token: str, field: int, old: bytes, new: bytes) -> str:
    parts = token.split(".")
    payload = base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4))
    assert old in payload
    parts[field] = base64.urlsafe_b64encode(payload.replace(old, new)).rstrip(b"=").decode()
    return ".".join(parts)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (b"region:", b"job:"),  # another purpose
        (b":42:", b":43:"),  # another member
        (JOB.encode(), b"ZZZZZZZZZZZZZZZZZZZZZZ"),  # another job
        (b":2:", b":3:"),  # another image
    ],
)
def test_changing_any_claim_breaks_the_signature(old: bytes, new: bytes) -> None:
    signer = Signer(SECRET)
    token = signer.sign(PURPOSE_REGION, 42, JOB, 2, REGION_TTL)
    forged = _tamper(token, 1, old, new)
    with pytest.raises(BadToken, match="signature"):
        signer.verify(forged, PURPOSE_REGION)


def test_a_later_expiry_breaks_the_signature() -> None:
    signer = Signer(SECRET, clock=Clock())
    token = signer.sign(PURPOSE_REGION, 42, JOB, 2, REGION_TTL)
    expires = str(int(1_800_000_000 + REGION_TTL.total_seconds())).encode()
    forged = _tamper(token, 1, expires, b"9999999999")
    with pytest.raises(BadToken, match="signature"):
        signer.verify(forged, PURPOSE_REGION)


@pytest.mark.parametrize(
    "token",
    ["", "v1", "v1..", "v2.abc.def", "x" * 400, "v1.%00.abc", "v1.abc." + "A" * 42, "../../etc/passwd"],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    with pytest.raises(BadToken):
        Signer(SECRET).verify(token, PURPOSE_REGION)


def test_signing_refuses_bad_input() -> None:
    signer = Signer(SECRET)
    with pytest.raises(ValueError):
        signer.sign("admin", 1, JOB, 0, REGION_TTL)
    with pytest.raises(ValueError):
        signer.sign(PURPOSE_JOB, 1, "../x", 0, REGION_TTL)
    with pytest.raises(ValueError):
        signer.sign(PURPOSE_JOB, 1, JOB, 0, timedelta(0))
    with pytest.raises(ValueError):
        Signer(b"short")


def test_urls_are_absolute_and_verify() -> None:
    signer = Signer(SECRET)
    edit = region_editor_url(signer, "https://gallery.example/", 7, JOB, 4)
    assert edit.startswith("https://gallery.example/edit/v1.")
    assert signer.verify(edit.rsplit("/", 1)[1], PURPOSE_REGION).index == 4
    private = private_job_url(signer, "https://gallery.example", 7, JOB)
    assert private.startswith("https://gallery.example/p/v1.")
    assert signer.verify(private.rsplit("/", 1)[1], PURPOSE_JOB).user_id == 7


def test_configured_secret_is_used(tmp_path: Path) -> None:
    settings = BotSettings(_env_file=None, web_secret=SecretStr("s" * 40), web_secret_file=tmp_path / "f")
    assert link_secret(settings) == b"s" * 40
    assert not (tmp_path / "f").exists()
    with pytest.raises(ValueError, match="WEB_SECRET"):
        link_secret(BotSettings(_env_file=None, web_secret=SecretStr("short")))


def test_unset_secret_is_created_once_and_survives_restarts(tmp_path: Path) -> None:
    path = tmp_path / "data" / "web_secret"
    settings = BotSettings(_env_file=None, web_secret_file=path)
    token = signer_from_settings(settings).sign(PURPOSE_JOB, 1, JOB, 0, PRIVATE_JOB_TTL)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # A "restarted" process reads the same secret, so the old link still works.
    assert signer_from_settings(BotSettings(_env_file=None, web_secret_file=path)).verify(token, PURPOSE_JOB)
    assert [p.name for p in path.parent.iterdir()] == ["web_secret"]


def _create(path: str, queue: multiprocessing.Queue[bytes]) -> None:
    queue.put(load_or_create_secret(Path(path)))


def test_concurrent_creation_agrees_on_one_secret(tmp_path: Path) -> None:
    path = tmp_path / "web_secret"
    ctx = multiprocessing.get_context("spawn")
    queue: multiprocessing.Queue[bytes] = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(str(path), queue)) for _ in range(4)]
    for proc in procs:
        proc.start()
    secrets = {queue.get(timeout=30) for _ in procs}
    for proc in procs:
        proc.join(30)
    assert secrets == {path.read_text().strip().encode()}


def test_only_the_canonical_spelling_verifies() -> None:
    """The last base64 character carries spare bits; other spellings of the same MAC are refused."""
    signer = Signer(SECRET)
    token = signer.sign(PURPOSE_REGION, 1, JOB, 1, REGION_TTL)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    # A 32-byte MAC is 43 characters: the final one holds 4 bits and 2 spare ones.
    twin = token[:-1] + alphabet[last ^ 1]
    assert base64.urlsafe_b64decode(twin.rsplit(".", 1)[1] + "=") == base64.urlsafe_b64decode(
        token.rsplit(".", 1)[1] + "="
    )
    with pytest.raises(BadToken, match="malformed"):
        signer.verify(twin, PURPOSE_REGION)
