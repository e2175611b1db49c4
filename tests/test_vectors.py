"""The golden vectors in tests/vectors/, run through the SDK, and their generator.

Each case gets a fresh Verifier with the case's settings and a fixed clock;
its steps share that verifier's replay and use stores and revocation state.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from verifier_sdk import CODES, Request, TrustBundle, VerificationError, Verifier

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors"
GENERATOR = ROOT / "scripts" / "gen_vectors.py"
GROUPS = ("valid", "invalid", "pop", "uses", "revocation")


def _load(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))
    return data


def _cases(*names: str) -> list[Any]:
    return [pytest.param(case, id=f"{name}:{case['id']}")
            for name in names for case in _load(name)["cases"]]


def _verifier(case: dict[str, Any], clock: list[float]) -> Verifier:
    s = case["settings"]
    return Verifier(
        TrustBundle.from_jwks(case["bundle"]), audience=s["audience"], leeway=s["leeway"],
        pop_window=s["pop_window"], max_lifetime=s["max_lifetime"],
        clock=lambda: clock[0], require_revocations=s["require_revocations"],
    )


def _outcome(verifier: Verifier, step: dict[str, Any]) -> dict[str, Any]:
    """What the SDK does with one step, in the vector's ``expected`` shape."""
    try:
        if step["op"] == "update_revocations":
            return {"replaced": verifier.update_revocations(step["token"])}
        assert step["op"] == "verify"
        r = step["request"]
        try:
            request = Request(r["res"], r["act"], r.get("ctx"))
        except ValueError:
            return {"invalid_request": True}
        d = verifier.verify(step["chain"], request, pop=step["pop"])
    except VerificationError as exc:
        return {"error": {"code": exc.code, "link": exc.link}}
    return {"decision": {"principals": list(d.principals), "subject": d.subject,
                         "jtis": list(d.jtis), "kid": d.kid, "expires_at": d.expires_at}}


@pytest.mark.parametrize("case", _cases(*GROUPS))
def test_vector(case: dict[str, Any]) -> None:
    clock = [float(case["settings"]["now"])]
    verifier = _verifier(case, clock)
    for number, step in enumerate(case["steps"]):
        clock[0] = float(step.get("now", case["settings"]["now"]))
        assert _outcome(verifier, step) == step["expected"], f"step {number}"


@pytest.mark.parametrize("case", _cases("bundles"))
def test_bundle_vector(case: dict[str, Any]) -> None:
    if case["expected"]["valid"]:
        TrustBundle.from_jwks(case["bundle"])
    else:
        with pytest.raises(ValueError):  # noqa: PT011 - the spec names no narrower type
            TrustBundle.from_jwks(case["bundle"])


def test_every_code_has_a_vector() -> None:
    codes = {
        step["expected"]["error"]["code"]
        for name in GROUPS for case in _load(name)["cases"] for step in case["steps"]
        if "error" in step["expected"]
    }
    assert codes == CODES


def test_case_ids_are_unique() -> None:
    ids = [case["id"] for name in (*GROUPS, "bundles") for case in _load(name)["cases"]]
    assert len(ids) == len(set(ids))


def test_keys_file_matches_bundle() -> None:
    """keys.json holds the private halves of the bundle's public keys."""
    keys = _load("keys")
    bundle = _load("valid")["cases"][0]["bundle"]
    for entry in bundle["keys"]:
        private = keys["keys"][keys["bundle_kids"][entry["kid"]]]["private_jwk"]
        public = {k: v for k, v in private.items() if k != "d"}
        assert public == {k: v for k, v in entry.items() if k in public}


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_vectors", GENERATOR)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_vectors"] = module  # dataclasses look their module up here
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["gen_vectors"]
    return module


@pytest.mark.slow
def test_regenerating_gives_identical_files(tmp_path: Path) -> None:
    assert _generator().main(["--out", str(tmp_path)]) == 0
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in VECTORS.glob("*.json"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), name
