"""Spec §2 encoding rules: strict base64url, strict JSON, canonical JSON and H(x)."""

from __future__ import annotations

import base64
import binascii
import json
import os
import time

import pytest

from verifier_sdk._encoding import (
    b64url_decode,
    b64url_encode,
    canonical_json,
    parse_json_object,
    sha256_b64,
)

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

# parse_json_object's two modes: the full §2 check, and the one for tokens whose
# schema checks depth and int ranges itself. Every other rule holds in both.
BOTH_MODES = pytest.mark.parametrize(
    "schema_checked", [False, True], ids=["strict", "schema-checked"]
)


def _reference_canonical(text: str) -> bool:
    """Independent oracle: the standard library decodes it and re-encodes to the same text."""
    try:
        raw = base64.b64decode(
            text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4), validate=True
        )
    except (binascii.Error, ValueError):
        return False
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode() == text


# --- base64url -------------------------------------------------------------------


@pytest.mark.parametrize("length", range(41), ids=lambda n: f"{n}-bytes")
def test_b64url_round_trip_every_length(length: int) -> None:
    data = os.urandom(length)
    text = b64url_encode(data)
    assert "=" not in text
    assert b64url_decode(text) == data
    assert b64url_encode(b64url_decode(text)) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", b""),
        ("QQ", b"A"),
        ("QUI", b"AB"),
        ("QUJD", b"ABC"),
        ("-_-_", b"\xfb\xff\xbf"),
        ("AAAA", b"\x00\x00\x00"),
    ],
    ids=["empty", "one-byte", "two-bytes", "three-bytes", "url-alphabet", "zeros"],
)
def test_b64url_known_values(text: str, expected: bytes) -> None:
    assert b64url_decode(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "QQ==",
        "QQ=",
        "QUI=",
        "=",
        "QQ=A",
        "+/+/",
        "ab+c",
        "ab/c",
        " QQ",
        "QQ ",
        "QQ\n",
        "Q Q",
        "QQ\t",
        "QUJD\r\n",
        "A",
        "AAAAA",
        "QUJDR",
        "QR",
        "QUF",
        "Q.Q",
        "QQ~",
        "QQ\u00e9",
        "\u0661\u0662",
        "\uff21\uff21",
        "QQ\x00",
    ],
    ids=[
        "padding-2", "padding-1", "padding-after-3", "only-padding", "padding-inside",
        "std-alphabet", "plus", "slash", "leading-space", "trailing-space",
        "trailing-newline", "inner-space", "trailing-tab", "crlf",
        "len-1", "len-5", "len-mod4-1", "trailing-bits-len2", "trailing-bits-len3",
        "dot", "tilde", "non-ascii-letter", "arabic-indic-digits", "fullwidth-letters",
        "nul",
    ],
)
def test_b64url_rejects(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the SDK's one error type for bad input
        b64url_decode(text)


@pytest.mark.parametrize(
    "prefix", ["Q", "QU", "QUJDQ", "QUJDQU"], ids=["rem2", "rem3", "rem2-long", "rem3-long"]
)
def test_b64url_last_character_canonical_iff_trailing_bits_zero(prefix: str) -> None:
    """Every possible last character: accepted exactly when the encoding is canonical."""
    accepted, expected = [], []
    for char in ALPHABET:
        text = prefix + char
        if _reference_canonical(text):
            expected.append(char)
        try:
            b64url_decode(text)
        except ValueError:
            continue
        accepted.append(char)
    assert accepted == expected
    # rem 2 leaves 4 unused bits (4 canonical last chars), rem 3 leaves 2 (16 of them).
    assert len(expected) == (4 if len(prefix) % 4 == 1 else 16)


def test_b64url_twin_of_real_encoding_is_rejected() -> None:
    text = b64url_encode(b"\x00" * 32)  # 43 characters: the last carries 2 unused bits
    assert text.endswith("A")
    for twin_last in "BCD":
        with pytest.raises(ValueError, match="trailing bits"):
            b64url_decode(text[:-1] + twin_last)


# --- JSON: accepted documents ----------------------------------------------------


def _nest(depth: int, *, objects: bool = False) -> bytes:
    """A document whose top-level object is depth 1 and whose innermost container is ``depth``."""
    opener, closer = (b'{"k":', b"}") if objects else (b"[", b"]")
    return b'{"a":' + opener * (depth - 1) + b"1" + closer * (depth - 1) + b"}"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"{}", {}),
        (b' { "a" : 1 } ', {"a": 1}),
        (b'{"a":9007199254740991}', {"a": 2**53 - 1}),
        (b'{"a":-9007199254740991}', {"a": -(2**53 - 1)}),
        (b'{"a":0,"b":-0}', {"a": 0, "b": 0}),
        (b'{"a":"\\ud83d\\ude00"}', {"a": "\U0001f600"}),
        ('{"a":"\U0001f600é"}'.encode(), {"a": "\U0001f600é"}),
        (b'{"a":"\\u00e9\\n\\"\\\\"}', {"a": 'é\n"\\'}),
        (b'{"a":{"a":1},"b":[{"a":1},{"a":2}]}', {"a": {"a": 1}, "b": [{"a": 1}, {"a": 2}]}),
        (b'{"a":true,"b":false,"c":null}', {"a": True, "b": False, "c": None}),
    ],
    ids=[
        "empty-object", "whitespace", "max-safe-int", "min-safe-int", "minus-zero-int",
        "escaped-surrogate-pair", "raw-astral", "escapes", "same-name-in-sibling-objects",
        "literals",
    ],
)
@BOTH_MODES
def test_json_accepts(data: bytes, expected: dict[str, object], schema_checked: bool) -> None:
    assert parse_json_object(data, schema_checked=schema_checked) == expected


@pytest.mark.parametrize(
    "data",
    [
        _nest(8),
        _nest(8, objects=True),
        b'{"a":[{"b":[{"c":[{"d":[1]}]}]}]}',
        b'{"a":"[[[[[[[[[[[[{{{{{{{{{{{{","b":[[[[[[1]]]]]]}',
        b'{"a":"\\"[[[[[[[[[[[[\\"","b":[[[[[[1]]]]]]}',
        b'{"[[[[[[[[[[":"]]]]]]]]]{{{{{{{{{{{"}',
    ],
    ids=[
        "arrays-depth-8", "objects-depth-8", "mixed-depth-8", "brackets-in-string",
        "brackets-after-escaped-quote", "brackets-in-member-name",
    ],
)
@BOTH_MODES
def test_json_depth_8_accepted(data: bytes, schema_checked: bool) -> None:
    assert isinstance(parse_json_object(data, schema_checked=schema_checked), dict)


# --- JSON: rejected documents ----------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        # byte level
        b'\xef\xbb\xbf{"a":1}',
        b'{"a":"\xff"}',
        b'{"a":"\xc0\xaf"}',
        b'{"a":"\xe2\x82"}',
        b'{"a":"\xed\xa0\x80"}',
        b'{"a":"\xed\xb0\x80"}',
        b'{"a":"\xed\xa0\xbd\xed\xb8\x80"}',
        b'{"a":"\xf4\x90\x80\x80"}',
        # lone surrogates written as escapes
        b'{"a":"\\ud800"}',
        b'{"a":"\\udc00"}',
        b'{"a":"x\\ud83dy"}',
        b'{"a":"\\ude00\\ud83d"}',
        b'{"\\ud800":1}',
        b'{"a":[{"b":"\\udfff"}]}',
        # duplicates at every level
        b'{"a":1,"a":1}',
        b'{"a":1,"b":2,"a":3}',
        b'{"o":{"x":1,"x":2}}',
        b'{"l":[1,{"x":1,"x":2}]}',
        b'{"a":{"b":{"c":{"d":{"e":1,"e":1}}}}}',
        b'{"a":1,"\\u0061":2}',
        # numbers
        b'{"a":1.0}',
        b'{"a":1.5}',
        b'{"a":-0.0}',
        b'{"a":1e1}',
        b'{"a":1E1}',
        b'{"a":1e-1}',
        b'{"a":1e+2}',
        b'{"a":[0.1]}',
        b'{"a":NaN}',
        b'{"a":Infinity}',
        b'{"a":-Infinity}',
        b'{"a":01}',
        b'{"a":-}',
        b'{"a":+1}',
        # top level
        b"[]",
        b'[{"a":1}]',
        b'"a"',
        b"1",
        b"null",
        b"true",
        b"",
        b" ",
        # raw control characters inside strings
        b'{"a":"\x00"}',
        b'{"a":"\x01"}',
        b'{"a":"\t"}',
        b'{"a":"\n"}',
        b'{"a\x1f":1}',
        # syntax
        b'{"a":1}x',
        b'{"a":1}{"b":2}',
        b'{"a":1,}',
        b"{'a':1}",
        b'{"a":undefined}',
    ],
    ids=[
        "bom", "invalid-byte", "overlong", "truncated-sequence", "encoded-high-surrogate",
        "encoded-low-surrogate", "cesu8-pair", "above-u10ffff",
        "escaped-lone-high", "escaped-lone-low", "high-without-low", "reversed-pair",
        "lone-surrogate-in-name", "lone-surrogate-nested",
        "dup-top", "dup-top-apart", "dup-nested", "dup-in-array", "dup-depth-5",
        "dup-via-escape",
        "float-1.0", "float-1.5", "float-minus-zero", "exp-lower", "exp-upper",
        "exp-negative", "exp-plus", "float-in-array", "nan", "infinity", "minus-infinity",
        "leading-zero", "bare-minus", "plus-sign",
        "top-empty-array", "top-array", "top-string", "top-number", "top-null", "top-true",
        "empty-input", "only-whitespace",
        "raw-nul", "raw-0x01", "raw-tab", "raw-newline", "raw-0x1f-in-name",
        "trailing-garbage", "two-objects", "trailing-comma", "single-quotes", "undefined",
    ],
)
@BOTH_MODES
def test_json_rejects(data: bytes, schema_checked: bool) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the SDK's one error type for bad input
        parse_json_object(data, schema_checked=schema_checked)


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":9007199254740992}',
        b'{"a":-9007199254740992}',
        b'{"a":[1,{"b":9007199254740992}]}',
        b'{"a":99999999999999999}',
        b'{"a":18446744073709551616}',
    ],
    ids=["2^53", "-2^53", "2^53-nested", "17-digits", "2^64"],
)
def test_json_rejects_ints_outside_safe_range(data: bytes) -> None:
    with pytest.raises(ValueError, match="safe range"):
        parse_json_object(data)


@pytest.mark.parametrize(
    "data",
    [
        _nest(9),
        _nest(9, objects=True),
        b'{"a":[{"b":[{"c":[{"d":[{}]}]}]}]}',
        b'{"s":"\\\\","b":[[[[[[[[1]]]]]]]]}',
        b'{"s":"]]]]]]]]]]","b":[[[[[[[[1]]]]]]]]}',
        b'{"a":[[[[[[[[]]]]]]]]}',
    ],
    ids=[
        "arrays-depth-9", "objects-depth-9", "mixed-depth-9",
        "escaped-backslash-before-deep", "closing-brackets-in-string", "empty-array-depth-9",
    ],
)
def test_json_depth_9_rejected(data: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        parse_json_object(data)


@pytest.mark.parametrize(
    "data",
    [
        b'{"a":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        b'{"a":' + b"[" * 10_000 + b"}",
        b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
        b"[" * 10_000,
        b"{" * 10_000,
        b'{"a":"' + b"[" * 10_000 + b'","b":' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    ],
    ids=[
        "deep-arrays", "deep-unclosed", "deep-objects", "top-level-deep-array",
        "top-level-deep-object", "deep-after-bracket-string",
    ],
)
@BOTH_MODES
def test_json_very_deep_nesting_is_a_clean_value_error(data: bytes, schema_checked: bool) -> None:
    try:
        parse_json_object(data, schema_checked=schema_checked)
    except ValueError:
        pass
    except RecursionError:  # pragma: no cover - the failure this test exists to catch
        pytest.fail("RecursionError escaped parse_json_object")
    else:  # pragma: no cover
        pytest.fail("10,000-deep nesting was accepted")


@pytest.mark.parametrize(
    "digits", [17, 5000, 100_000], ids=["17-digits", "5000-digits", "100k-digits"]
)
@pytest.mark.parametrize("sign", ["", "-"], ids=["positive", "negative"])
def test_json_huge_integers_rejected_quickly(digits: int, sign: str) -> None:
    data = b'{"a":' + sign.encode() + b"9" * digits + b"}"
    start = time.perf_counter()
    with pytest.raises(ValueError, match="safe range"):
        parse_json_object(data)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("digits", [5000, 100_000], ids=["5000-digits", "100k-digits"])
def test_json_absurd_integers_rejected_quickly_when_schema_checked(digits: int) -> None:
    data = b'{"a":' + b"9" * digits + b"}"
    start = time.perf_counter()
    with pytest.raises(ValueError):  # noqa: PT011
        parse_json_object(data, schema_checked=True)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "body",
    [b'"' + b'\\"' * 8_000, b'"' + b'a\\"' * 5_300],
    ids=["quote-escaped-quotes", "letters-and-escaped-quotes"],
)
@BOTH_MODES
def test_json_unterminated_strings_rejected_in_linear_time(body: bytes,
                                                           schema_checked: bool) -> None:
    """About 16 KB of hostile text past the depth threshold: refused in
    milliseconds, not after a scan that restarts at every quote."""
    data = b"{" * 9 + body
    start = time.perf_counter()
    with pytest.raises(ValueError):  # noqa: PT011
        parse_json_object(data, schema_checked=schema_checked)
    assert time.perf_counter() - start < 0.25


# --- canonical JSON and H(x) -----------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({}, b"{}"),
        ({"b": 1, "a": 2}, b'{"a":2,"b":1}'),
        (
            {"z": {"y": [3, {"b": True, "a": None}], "x": "s"}, "a": -1},
            b'{"a":-1,"z":{"x":"s","y":[3,{"a":null,"b":true}]}}',
        ),
        ({"é": "ü\U0001f600"}, '{"é":"ü\U0001f600"}'.encode()),
        ({"a": 'q"\\\n'}, b'{"a":"q\\"\\\\\\n"}'),
        ({"B": 1, "a": 2, "_": 3}, b'{"B":1,"_":3,"a":2}'),
        (
            {"act": "post", "aud": "payments-api", "ctx": {"amount": 4999}, "res": "r/1"},
            b'{"act":"post","aud":"payments-api","ctx":{"amount":4999},"res":"r/1"}',
        ),
    ],
    ids=[
        "empty", "sorted", "sorted-at-every-level", "non-ascii-raw", "escapes",
        "byte-order-of-names", "canonical-request",
    ],
)
def test_canonical_json(obj: object, expected: bytes) -> None:
    assert canonical_json(obj) == expected


def test_canonical_json_round_trips_through_strict_parser() -> None:
    obj = {"b": [1, {"d": "é", "c": False}], "a": {"x": -(2**53 - 1)}}
    assert parse_json_object(canonical_json(obj)) == obj
    assert canonical_json(json.loads(json.dumps(obj, indent=3))) == canonical_json(obj)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"abc", "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"),
        (b"", "47DEQpj8HBSa-_TImW-5JCeuQeRkm5NMpJWZG3hSuFU"),
        (
            b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
            "JI1qYdIGOLjlwCaTDD5gOaM85Flk_yFn9uzt1BnbBsE",
        ),
    ],
    ids=["abc", "empty", "fips-448-bit"],
)
def test_sha256_b64_known_values(data: bytes, expected: str) -> None:
    assert sha256_b64(data) == expected
    assert len(expected) == 43
