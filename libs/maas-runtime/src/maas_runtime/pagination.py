"""Pagination (AIP-158): opaque, tamper-proof page tokens and page-size limits.

A page token carries the store's cursor (e.g. the sort key and id of the last row returned)
as JSON, signed with HMAC-SHA256 under a server secret and bound to a fingerprint of the
query it was issued for. A client can neither forge a cursor nor carry a token over to a
request with a different parent, filter or order: both fail INVALID_ARGUMENT on `page_token`.
Tokens are not encrypted; the cursor must hold nothing a caller may not see.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

from maas_runtime.errors import InvalidArgument

PAGE_TOKEN_FIELD = "page_token"
PAGE_SIZE_FIELD = "page_size"
MIN_SECRET_BYTES = 16
MAX_PAGE_TOKEN_LENGTH = 4096
TOKEN_FORMAT_VERSION = 1

_MAC_BYTES = hashlib.sha256().digest_size
_FINGERPRINT_BYTES = 16
# Binds the MAC to this use of the secret, in case the same key ever signs something else.
_MAC_CONTEXT = b"maas.page_token.v1\x00"
_URLSAFE_BASE64 = re.compile(r"[A-Za-z0-9_-]+")


def query_fingerprint(*query_parts: str) -> str:
    """A stable digest of everything that defines a listing besides the position in it,
    e.g. `query_fingerprint(parent, filter_text, order_by)`; parts cannot run together."""
    encoded = json.dumps(list(query_parts), ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(encoded.encode()).hexdigest()


class PageTokenCodec:
    """Turns a cursor into a page token and back, verifying the signature and the query."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"page token secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = bytes(secret)

    @classmethod
    def from_secret_file(cls, path: Path) -> PageTokenCodec:
        """A codec keyed by `path`, created once with mode 0600 (replicas share the file)."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as handle:
                    handle.write(secrets.token_hex(32))
        return cls(bytes.fromhex(path.read_text().strip()))

    def encode(self, cursor: dict[str, Any], query_fingerprint: str) -> str:
        """A URL-safe token for `cursor` (JSON-serialisable values only)."""
        body = json.dumps(
            {
                "v": TOKEN_FORMAT_VERSION,
                "q": self._fingerprint_digest(query_fingerprint),
                "c": cursor,
            },
            separators=(",", ":"),
            sort_keys=True,
            allow_nan=False,
        ).encode()
        return _base64_encode(body + self._mac(body))

    def decode(self, token: str, query_fingerprint: str) -> dict[str, Any]:
        """The cursor inside `token`; INVALID_ARGUMENT when the token is malformed, was
        altered, or was issued for a different query. Callers skip this for an empty token."""
        if not token:
            raise _invalid_token("is empty")
        if len(token) > MAX_PAGE_TOKEN_LENGTH:
            raise _invalid_token(f"is longer than {MAX_PAGE_TOKEN_LENGTH} characters")
        raw = _base64_decode(token)
        if raw is None or len(raw) <= _MAC_BYTES:
            raise _invalid_token("is not a page token issued by this service")
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise _invalid_token("is not a page token issued by this service")
        # The signature is ours, so what follows only fails for tokens of another format.
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if (
            not isinstance(payload, dict)
            or payload.get("v") != TOKEN_FORMAT_VERSION
            or not isinstance(payload.get("c"), dict)
            or not isinstance(payload.get("q"), str)
        ):
            raise _invalid_token("has an unsupported format; restart the listing")
        if not hmac.compare_digest(payload["q"], self._fingerprint_digest(query_fingerprint)):
            raise _invalid_token(
                "was issued for a different query; keep parent, filter and order_by unchanged "
                "while paging, or start again without a page_token"
            )
        return payload["c"]

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._secret, _MAC_CONTEXT + body, hashlib.sha256).digest()

    def _fingerprint_digest(self, query_fingerprint: str) -> str:
        # Keyed, so the token does not reveal the query (a fingerprint may be the raw filter).
        digest = hmac.new(
            self._secret, b"query\x00" + query_fingerprint.encode(), hashlib.sha256
        ).digest()
        return _base64_encode(digest[:_FINGERPRINT_BYTES])


def clamp_page_size(page_size: int, default: int = 50, maximum: int = 1000) -> int:
    """AIP-158 page size: 0 means `default`, more than `maximum` is lowered to it,
    negative values are INVALID_ARGUMENT on `page_size`."""
    if not 0 < default <= maximum:
        raise ValueError(f"need 0 < default ({default}) <= maximum ({maximum})")
    if page_size < 0:
        raise InvalidArgument.for_field(
            PAGE_SIZE_FIELD, f"must not be negative, got {page_size}"
        )
    if page_size == 0:
        return default
    return min(page_size, maximum)


def _invalid_token(description: str) -> InvalidArgument:
    return InvalidArgument.for_field(PAGE_TOKEN_FIELD, description)


def _base64_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _base64_decode(token: str) -> bytes | None:
    """Strict decoding: only the URL-safe alphabet, no padding, and only the one canonical
    spelling of each byte string, so no two tokens decode to the same bytes."""
    if not _URLSAFE_BASE64.fullmatch(token):
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw if _base64_encode(raw) == token else None
