"""Strict base64url and JSON (spec §2).

Every decoder here raises ``ValueError`` with a short reason; the callers turn
that into the spec's error code for the token being read.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from typing import Any, Final

MAX_SAFE_INT: Final = 2**53 - 1
MAX_JSON_DEPTH: Final = 8

_B64_CHARS = re.compile(r"[A-Za-z0-9_-]*")
_B64_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64_INDEX: Final = {c: i for i, c in enumerate(_B64_ALPHABET)}
_TO_STANDARD: Final = bytes.maketrans(b"-_", b"+/")


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url, refusing every alternative spelling.

    Refused: padding, the standard alphabet's ``+`` and ``/``, whitespace,
    an impossible length, and non-zero trailing bits (which would give one
    byte string several encodings).
    """
    if not _B64_CHARS.fullmatch(text):
        raise ValueError("not unpadded base64url")
    rem = len(text) % 4
    if rem == 1:
        raise ValueError("impossible base64url length")
    raw = text.encode("ascii").translate(_TO_STANDARD)
    if rem:
        # The last character carries 4 (rem 2) or 2 (rem 3) unused low bits.
        unused_mask = 0x0F if rem == 2 else 0x03
        if _B64_INDEX[text[-1]] & unused_mask:
            raise ValueError("non-canonical base64url (trailing bits set)")
        raw += b"==" if rem == 2 else b"="
    return binascii.a2b_base64(raw, strict_mode=True)


def sha256_b64(data: bytes) -> str:
    """``H(x)`` of the spec: base64url(SHA-256(x))."""
    return b64url_encode(hashlib.sha256(data).digest())


# --- JSON -------------------------------------------------------------------

# Strings are removed before counting brackets, so "[" inside a string does
# not count towards depth. The pattern follows JSON's string grammar closely
# enough for counting: a quote, then non-quote/non-backslash or any escape,
# up to the closing quote or the end of the text. The possessive quantifier
# and the end-of-text alternative keep it linear on an unterminated string.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*+(?:"|\Z)', re.DOTALL)
_JSON_BRACKETS = re.compile(r"[\[\]{}]")


def _reject_float(text: str) -> Any:
    raise ValueError(f"number with a fraction or exponent: {text[:20]}")


def _reject_constant(text: str) -> Any:
    raise ValueError(f"non-finite number: {text}")


def _parse_int(text: str) -> int:
    # 2^53-1 has 16 digits: anything longer is out of range without the cost
    # (or the limit error) of converting thousands of digits.
    if len(text.lstrip("-")) > 16:
        raise ValueError("integer outside the safe range")
    value = int(text)
    if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
        raise ValueError("integer outside the safe range")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate member {key!r}")
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates,
    parse_float=_reject_float,
    parse_int=_parse_int,
    parse_constant=_reject_constant,
    strict=True,  # no raw control characters inside strings
)
# For schema-checked tokens: every int sits where the schema range-checks it.
_SCHEMA_DECODER = json.JSONDecoder(
    object_pairs_hook=_no_duplicates,
    parse_float=_reject_float,
    parse_constant=_reject_constant,
    strict=True,
)


def _check_depth(text: str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH before the parser recurses."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return
    depth = 0
    for match in _JSON_BRACKETS.finditer(_JSON_STRING.sub("", text)):
        if match.group() in "[{":
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH}")
        else:
            depth -= 1


def parse_json_object(data: bytes, *, schema_checked: bool = False) -> dict[str, Any]:
    """Parse spec-§2 JSON: UTF-8 without BOM, an object at the top, strict.

    ``schema_checked``: the caller checks the type of every member at every
    level and the range of every int, and its schema nests at most 6 deep; so
    depth and integer range are enforced there, and the bracket scan and the
    per-int hook (together about 10 us a payload) are skipped. The parser's
    recursion guard still turns absurd nesting into ValueError, and so does
    int()'s digit limit for absurd integers.
    """
    if data.startswith(b"\xef\xbb\xbf"):
        raise ValueError("JSON with a byte-order mark")
    try:
        text = data.decode("utf-8")  # strict: also refuses encoded surrogates
    except UnicodeDecodeError as exc:
        raise ValueError("JSON is not valid UTF-8") from exc
    if not schema_checked:
        _check_depth(text)
    try:
        obj = (_SCHEMA_DECODER if schema_checked else _DECODER).decode(text)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError and the hooks' refusals
        raise ValueError(f"bad JSON: {exc}") from exc
    if type(obj) is not dict:
        raise ValueError("JSON top level is not an object")
    if "\\u" in text:
        # Escapes are the only way to write a lone surrogate in valid UTF-8.
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError("JSON string with a lone surrogate") from exc
    return obj


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_json(obj: Any) -> bytes:
    """Members sorted at every level, no whitespace, non-ASCII written raw."""
    return _CANONICAL.encode(obj).encode("utf-8")
