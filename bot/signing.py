"""Signed links: HMAC-SHA256 tokens that open one job's private page or its Vary (Region) editor.

A token names what it is for (its purpose), the Discord user it was made for, the job and the
image index, and when it stops working; the MAC covers all of it, so changing any part, or using
a token for another purpose, makes it invalid. The gallery still checks that the job belongs to
that user when the link is used.

The key comes from ``WEB_SECRET``; when that is unset, a random secret is created once under the
data folder (``WEB_SECRET_FILE``) so links keep working across restarts. Bot and gallery processes
that share the data folder or the setting sign and verify with the same key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from bot.settings import BotSettings

PURPOSE_REGION = "region"  # the Vary (Region) editor of one image
PURPOSE_JOB = "job"  # a private (stealth) job's page
PURPOSES = frozenset({PURPOSE_REGION, PURPOSE_JOB})

REGION_TTL = timedelta(minutes=30)
PRIVATE_JOB_TTL = timedelta(days=7)
MIN_SECRET_CHARS = 16
MAX_TOKEN_CHARS = 300

_VERSION = "v1"
_JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
_TOKEN_RE = re.compile(r"v1\.[A-Za-z0-9_-]{1,200}\.[A-Za-z0-9_-]{43}")
_PAYLOAD_RE = re.compile(r"(region|job):([0-9]{1,20}):([A-Za-z0-9_-]{1,32}):([0-9]{1,2}):([0-9]{1,12})")


class BadToken(ValueError):
    """A token that is malformed, forged, expired or made for another purpose."""


@dataclass(frozen=True, slots=True)
class Claims:
    """What a valid token grants: ``purpose`` on image ``index`` of ``job_id``, for ``user_id``."""

    purpose: str
    user_id: int
    job_id: str
    index: int
    expires_at: int  # seconds since the epoch


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Makes and checks link tokens with one server secret."""

    def __init__(self, secret: bytes, *, clock: Callable[[], float] = time.time) -> None:
        if len(secret) < MIN_SECRET_CHARS:
            raise ValueError(f"the link secret must have at least {MIN_SECRET_CHARS} bytes")
        # A key derived for this one use: the configured secret itself never keys a MAC directly.
        self._key = hmac.new(secret, b"mirage signed links v1", hashlib.sha256).digest()
        self._clock = clock

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    def sign(self, purpose: str, user_id: int, job_id: str, index: int, ttl: timedelta) -> str:
        """A token granting ``purpose`` on image ``index`` of ``job_id`` to ``user_id`` for ``ttl``."""
        if purpose not in PURPOSES:
            raise ValueError(f"unknown link purpose {purpose!r}")
        if not _JOB_ID_RE.fullmatch(job_id):
            raise ValueError("invalid job id")
        if not 0 <= index <= 99 or user_id < 0 or ttl.total_seconds() <= 0:
            raise ValueError("invalid index, user id or lifetime")
        expires_at = int(self._clock() + ttl.total_seconds())
        payload = f"{purpose}:{int(user_id)}:{job_id}:{int(index)}:{expires_at}".encode("ascii")
        return f"{_VERSION}.{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(self, token: str, purpose: str) -> Claims:
        """The claims of a valid, unexpired ``purpose`` token; raises ``BadToken`` otherwise."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS or not _TOKEN_RE.fullmatch(token):
            raise BadToken("malformed token")
        _, payload_b64, mac_b64 = token.split(".")
        try:
            payload, mac = _unb64(payload_b64), _unb64(mac_b64)
        except ValueError:
            raise BadToken("malformed token") from None
        # Base64 leaves spare bits in the last character; only the canonical spelling is
        # accepted, so each grant has exactly one token text.
        if _b64(payload) != payload_b64 or _b64(mac) != mac_b64:
            raise BadToken("malformed token")
        # The MAC is checked before the payload is trusted at all, in constant time.
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise BadToken("bad signature")
        match = _PAYLOAD_RE.fullmatch(payload.decode("ascii", errors="replace"))
        if match is None:
            raise BadToken("malformed token")
        claims = Claims(
            purpose=match.group(1),
            user_id=int(match.group(2)),
            job_id=match.group(3),
            index=int(match.group(4)),
            expires_at=int(match.group(5)),
        )
        if claims.purpose != purpose:
            raise BadToken("token made for another purpose")
        if self._clock() >= claims.expires_at:
            raise BadToken("token expired")
        return claims


def load_or_create_secret(path: Path) -> bytes:
    """The secret kept in ``path``, created (random, 256 bits, mode 0600) when there is none.

    Creation is atomic and first-writer-wins, so two processes starting together agree on it.
    """
    path = Path(path)
    with contextlib.suppress(FileNotFoundError):
        return _read_secret(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-secret-")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        # link() refuses to replace an existing file, unlike rename(): whoever links first wins
        # and everyone then reads the complete file that won.
        with contextlib.suppress(FileExistsError):
            os.link(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
    return _read_secret(path)


def _read_secret(path: Path) -> bytes:
    secret = path.read_text(encoding="ascii").strip().encode("ascii")
    if len(secret) < MIN_SECRET_CHARS:
        raise ValueError(f"{path} holds no usable secret (at least {MIN_SECRET_CHARS} characters)")
    return secret


def link_secret(settings: BotSettings) -> bytes:
    """``WEB_SECRET`` when set, else the persisted random secret of ``WEB_SECRET_FILE``."""
    configured = settings.web_secret.get_secret_value()
    if configured:
        if len(configured) < MIN_SECRET_CHARS:
            raise ValueError(f"WEB_SECRET must have at least {MIN_SECRET_CHARS} characters")
        return configured.encode("utf-8")
    return load_or_create_secret(settings.web_secret_file)


def signer_from_settings(settings: BotSettings) -> Signer:
    """The signer every process of one deployment shares (same settings, same key)."""
    return Signer(link_secret(settings))


def _absolute(public_url: str, path: str) -> str:
    return public_url.rstrip("/") + path


def region_editor_url(signer: Signer, public_url: str, user_id: int, job_id: str, index: int) -> str:
    """The Vary (Region) editor link for image ``index`` of ``job_id``, for ``user_id``, 30 minutes."""
    token = signer.sign(PURPOSE_REGION, user_id, job_id, index, REGION_TTL)
    return _absolute(public_url, f"/edit/{quote(token, safe='')}")


def private_job_url(signer: Signer, public_url: str, user_id: int, job_id: str) -> str:
    """A link to a job's page, stealth ones included, made for its owner ``user_id``; 7 days."""
    token = signer.sign(PURPOSE_JOB, user_id, job_id, 0, PRIVATE_JOB_TTL)
    return _absolute(public_url, f"/p/{quote(token, safe='')}")
