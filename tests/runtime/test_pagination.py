"""Page tokens and page sizes: tokens round-trip, and every altered, foreign, truncated or
garbage token fails INVALID_ARGUMENT on `page_token` instead of reaching the store."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import string

import pytest
from maas_runtime.errors import InvalidArgument
from maas_runtime.pagination import PageTokenCodec, clamp_page_size, query_fingerprint

SECRET = b"0123456789abcdef0123456789abcdef"
FINGERPRINT = query_fingerprint("models/digits", 'labels.task = "digits"', "create_time desc")
CURSOR = {"create_time": "2026-01-02T03:04:05.123456Z", "id": 1234, "name": "ünïcode ✓"}
URLSAFE_ALPHABET = string.ascii_letters + string.digits + "-_"


@pytest.fixture
def codec() -> PageTokenCodec:
    return PageTokenCodec(SECRET)


def assert_rejected(codec: PageTokenCodec, token: str, fingerprint: str = FINGERPRINT) -> str:
    """Decode must fail INVALID_ARGUMENT naming page_token; returns the description."""
    with pytest.raises(InvalidArgument) as raised:
        codec.decode(token, fingerprint)
    assert raised.value.code == "INVALID_ARGUMENT"
    [violation] = raised.value.field_violations
    assert violation.field == "page_token"
    return violation.description


@pytest.mark.parametrize(
    "cursor",
    [CURSOR, {}, {"offset": 0}, {"keys": [1, 2.5, None, True, "x"], "nested": {"a": {"b": []}}}],
)
def test_encode_then_decode_returns_the_cursor(codec: PageTokenCodec, cursor: dict) -> None:
    token = codec.encode(cursor, FINGERPRINT)
    assert set(token) <= set(URLSAFE_ALPHABET)
    assert codec.decode(token, FINGERPRINT) == cursor


def test_a_second_codec_with_the_same_secret_accepts_the_token(codec: PageTokenCodec) -> None:
    # Replicas share the secret, so a token from one must be accepted by another.
    token = codec.encode(CURSOR, FINGERPRINT)
    assert PageTokenCodec(bytes(SECRET)).decode(token, FINGERPRINT) == CURSOR


def test_changing_any_character_is_rejected(codec: PageTokenCodec) -> None:
    token = codec.encode(CURSOR, FINGERPRINT)
    for index, original in enumerate(token):
        replacement = URLSAFE_ALPHABET[(URLSAFE_ALPHABET.index(original) + 1) % 64]
        assert_rejected(codec, token[:index] + replacement + token[index + 1 :])


def test_flipping_any_bit_of_the_decoded_bytes_is_rejected(codec: PageTokenCodec) -> None:
    token = codec.encode({"id": 7}, FINGERPRINT)
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for index in range(len(raw)):
        for bit in range(8):
            altered = bytearray(raw)
            altered[index] ^= 1 << bit
            forged = base64.urlsafe_b64encode(bytes(altered)).rstrip(b"=").decode()
            assert "issued by this service" in assert_rejected(codec, forged)


def test_non_canonical_spelling_of_the_same_bytes_is_rejected(codec: PageTokenCodec) -> None:
    # With 1 or 2 trailing bytes the last base64 character has unused low bits; a token that
    # differs only there decodes to the same bytes and must still not be accepted.
    cursor = {"id": 0}
    while len(token := codec.encode(cursor, FINGERPRINT)) % 4 == 0:
        cursor["id"] += 1
    last = URLSAFE_ALPHABET.index(token[-1])
    twin = token[:-1] + URLSAFE_ALPHABET[last | 1 if last % 2 == 0 else last & ~1]
    assert base64.urlsafe_b64decode(twin + "=" * (-len(twin) % 4)) == base64.urlsafe_b64decode(
        token + "=" * (-len(token) % 4)
    )
    assert_rejected(codec, twin)
    assert codec.decode(token, FINGERPRINT) == cursor


def test_truncated_or_extended_tokens_are_rejected(codec: PageTokenCodec) -> None:
    token = codec.encode(CURSOR, FINGERPRINT)
    for length in range(len(token)):
        assert_rejected(codec, token[:length])
    assert_rejected(codec, token + "A")
    assert_rejected(codec, token + "==")
    assert_rejected(codec, token + token)


def test_token_for_another_query_is_rejected(codec: PageTokenCodec) -> None:
    token = codec.encode(CURSOR, FINGERPRINT)
    other_filters = [
        query_fingerprint("models/digits", 'labels.task = "faces"', "create_time desc"),
        query_fingerprint("models/faces", 'labels.task = "digits"', "create_time desc"),
        query_fingerprint("models/digits", 'labels.task = "digits"', "create_time"),
    ]
    for other in other_filters:
        assert "different query" in assert_rejected(codec, token, other)


def test_token_signed_with_another_secret_is_rejected(codec: PageTokenCodec) -> None:
    foreign = PageTokenCodec(b"another secret, sixteen bytes or more").encode(CURSOR, FINGERPRINT)
    assert "issued by this service" in assert_rejected(codec, foreign)


def test_forged_token_with_a_guessed_key_is_rejected(codec: PageTokenCodec) -> None:
    genuine = codec.encode({"id": 1}, FINGERPRINT)
    raw = base64.urlsafe_b64decode(genuine + "=" * (-len(genuine) % 4))
    payload = json.loads(raw[:-32])
    payload["c"] = {"id": 999999}
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    for guessed_key in (b"", SECRET[:16], b"secret"):
        mac = hmac.new(guessed_key, body, hashlib.sha256).digest()
        forged = base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode()
        assert_rejected(codec, forged)


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "x",
        "abc",
        "!!!!",
        "page 2",
        "eyJpZCI6IDF9",  # base64 of unsigned JSON {"id": 1}
        "AAAA" * 20,
        "A" * 5000,
        "a+b/c=",
        "\u00e9t\u00e9",
        "\x00\x01\x02",
    ],
)
def test_garbage_tokens_are_rejected(codec: PageTokenCodec, garbage: str) -> None:
    assert_rejected(codec, garbage)


def test_random_tokens_are_rejected(codec: PageTokenCodec) -> None:
    generator = random.Random(20260102)
    for _ in range(300):
        length = generator.randint(1, 120)
        if generator.random() < 0.5:
            candidate = "".join(generator.choice(URLSAFE_ALPHABET) for _ in range(length))
        else:
            raw = bytes(generator.getrandbits(8) for _ in range(length))
            candidate = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
        assert_rejected(codec, candidate)


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        PageTokenCodec(b"too short")


def test_query_fingerprint_separates_its_parts() -> None:
    assert query_fingerprint("a", "bc") != query_fingerprint("ab", "c")
    assert query_fingerprint("a", "") != query_fingerprint("a")
    assert query_fingerprint("p", "f", "o") == query_fingerprint("p", "f", "o")


@pytest.mark.parametrize(
    ("requested", "expected"), [(0, 50), (1, 1), (50, 50), (999, 999), (1000, 1000), (10**9, 1000)]
)
def test_clamp_page_size_defaults_and_caps(requested: int, expected: int) -> None:
    assert clamp_page_size(requested) == expected


def test_clamp_page_size_with_custom_limits() -> None:
    assert clamp_page_size(0, default=10, maximum=20) == 10
    assert clamp_page_size(25, default=10, maximum=20) == 20
    with pytest.raises(ValueError):
        clamp_page_size(5, default=30, maximum=20)


@pytest.mark.parametrize("negative", [-1, -50, -(2**31)])
def test_negative_page_size_is_invalid_argument(negative: int) -> None:
    with pytest.raises(InvalidArgument) as raised:
        clamp_page_size(negative)
    [violation] = raised.value.field_violations
    assert violation.field == "page_size"
    assert str(negative) in violation.description
