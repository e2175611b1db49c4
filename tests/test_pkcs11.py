"""The PKCS#11 key backend against a real SoftHSM2 token: key generation and
protection, signing for JWS, start-up errors, concurrency and session faults.

Faults SoftHSM2 can show (a session closed or all sessions dropped under the
backend, a PIN the token refuses) are real; only a reopen that fails is
injected, at the one seam where the backend opens its session.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from helpers import AUD, REFUND, REFUND_CAP, run_together
from hsm_fixtures import SoftHsm

from signer._errors import ConfigError, Unavailable
from signer._keys import KeySigner
from signer._pkcs11 import (
    _LOST_SESSION,
    Pkcs11KeySigner,
    Pkcs11Token,
    pin_from_env,
    pin_from_file,
)
from verifier_sdk import Holder, TrustBundle, VerificationError, Verifier, issue_root
from verifier_sdk._encoding import b64url_encode
from verifier_sdk._keys import public_key_from_jwk

ALGS = ["EdDSA", "ES256"]
NOW = 1_800_000_000


@pytest.fixture(scope="module")
def token(hsm: SoftHsm) -> Iterator[Pkcs11Token]:
    with hsm.open("mandate-main") as tok:
        yield tok


@pytest.fixture(scope="module")
def signers(token: Pkcs11Token) -> dict[str, Pkcs11KeySigner]:
    return {alg: token.signer(token.generate_key(f"root-{alg.lower()}", alg).label)
            for alg in ALGS}


def verifies(signer: KeySigner, data: bytes, signature: bytes) -> bool:
    return public_key_from_jwk(signer.public_jwk).verify(data, signature)


# --- keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_generated_private_key_is_sensitive_non_extractable_sign_only(
    token: Pkcs11Token, signers: dict[str, Pkcs11KeySigner], alg: str
) -> None:
    # Read back from the token, not from what generate_key returned.
    (info,) = [k for k in token.list_keys() if k.label == signers[alg].kid]
    assert info.alg == alg
    assert dict(info.flags) == {
        "token": True, "private": True, "local": True,
        "sensitive": True, "always_sensitive": True,
        "extractable": False, "never_extractable": True,
        "sign": True, "decrypt": False, "unwrap": False, "derive": False,
    }


def test_list_keys_gives_labels_ids_and_valid_public_jwks(
    token: Pkcs11Token, signers: dict[str, Pkcs11KeySigner]
) -> None:
    keys = {k.label: k for k in token.list_keys()}
    assert set(keys) == {"root-eddsa", "root-es256"}
    for signer in signers.values():
        info = keys[signer.kid]
        assert info.kid == signer.kid
        assert info.alg == signer.alg
        assert len(bytes.fromhex(info.key_id)) == 16
        assert dict(info.public_jwk) == signer.public_jwk
        public_key_from_jwk(dict(info.public_jwk))
    assert keys["root-eddsa"].public_jwk.keys() == {"kty", "crv", "x"}
    assert keys["root-es256"].public_jwk.keys() == {"kty", "crv", "x", "y"}
    assert keys["root-eddsa"].key_id != keys["root-es256"].key_id


def test_generate_refuses_a_label_already_in_the_token(
    token: Pkcs11Token, signers: dict[str, Pkcs11KeySigner]
) -> None:
    with pytest.raises(ConfigError, match="already holds objects labelled 'root-eddsa'"):
        token.generate_key("root-eddsa", "ES256")
    assert len(token.list_keys()) == 2


@pytest.mark.parametrize(
    "label", ["", "has space", "x" * 129, "slash/es", "ünïcode"],
    ids=["empty", "space", "too-long", "slash", "non-ascii"],
)
def test_generate_refuses_a_label_that_is_not_a_kid(token: Pkcs11Token, label: str) -> None:
    with pytest.raises(ConfigError, match="the label is the kid"):
        token.generate_key(label)


def test_generate_refuses_an_unsupported_algorithm(token: Pkcs11Token) -> None:
    with pytest.raises(ConfigError, match="unsupported algorithm 'RS256'"):
        token.generate_key("rsa-key", "RS256")


def test_signer_for_a_missing_key_is_a_config_error(token: Pkcs11Token) -> None:
    with pytest.raises(ConfigError, match="no private key labelled 'no-such-key'"):
        token.signer("no-such-key")


def test_imported_keys_are_read_as_they_are_and_rsa_is_skipped(hsm: SoftHsm) -> None:
    """Keys made outside the token: JWKs and signatures checked with cryptography alone."""
    ed_key, ec_key = hsm.imported["imported-ed"], hsm.imported["imported-es"]
    with hsm.open("mandate-import") as tok:
        keys = {k.label: k for k in tok.list_keys()}
        assert set(keys) == {"imported-ed", "imported-es"}  # RSA is not a Mandate key
        with pytest.raises(ConfigError, match="'imported-rsa': not an elliptic-curve key"):
            tok.signer("imported-rsa")

        raw = ed_key.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
        assert dict(keys["imported-ed"].public_jwk) == {
            "crv": "Ed25519", "kty": "OKP", "x": b64url_encode(raw)}
        numbers = ec_key.public_key().public_numbers()
        assert dict(keys["imported-es"].public_jwk) == {
            "crv": "P-256", "kty": "EC", "x": b64url_encode(numbers.x.to_bytes(32, "big")),
            "y": b64url_encode(numbers.y.to_bytes(32, "big"))}
        for info in keys.values():
            assert info.key_id in {"0a", "0b"}
            assert info.flags["sensitive"]
            assert not info.flags["local"]  # made outside: not generated in the token
            assert not info.flags["never_extractable"]

        data = b"signed in the token, checked outside it"
        ed_key.public_key().verify(tok.signer("imported-ed").sign(data), data)
        sig = tok.signer("imported-es").sign(data)
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        ec_key.public_key().verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))


# --- signing -----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_signature_is_jws_form_and_verifies(signers: dict[str, Pkcs11KeySigner],
                                            alg: str) -> None:
    signer = signers[alg]
    assert isinstance(signer, KeySigner)
    data = b"header.payload"
    signature = signer.sign(data)
    assert len(signature) == 64
    assert verifies(signer, data, signature)
    # Tampered twins: another message, a flipped signature byte.
    assert not verifies(signer, b"header.payloaD", signature)
    assert not verifies(signer, data, bytes([signature[0] ^ 1]) + signature[1:])


@pytest.mark.parametrize("alg", ALGS)
def test_root_link_signed_in_the_token_verifies(signers: dict[str, Pkcs11KeySigner],
                                               alg: str) -> None:
    signer, holder = signers[alg], Holder.generate()
    chain = issue_root(
        alg=signer.alg, kid=signer.kid, sign=signer.sign, iss="spiffe://acme.example/orch",
        sub="agent:support", holder_jwk=holder.public_jwk, cap=[REFUND_CAP], ttl=600,
        now=NOW - 10,
    )
    pop = holder.prove(chain, REFUND, aud=AUD, now=NOW)

    def verifier(jwk: dict[str, Any]) -> Verifier:
        bundle = TrustBundle.from_jwks({"keys": [{**jwk, "kid": signer.kid, "alg": signer.alg}]})
        return Verifier(bundle, audience=AUD, clock=lambda: NOW)

    decision = verifier(signer.public_jwk).verify(chain, REFUND, pop=pop)
    assert decision.kid == signer.kid
    # Twin: the same kid bound to another key of the same algorithm.
    with pytest.raises(VerificationError):
        verifier(Holder.generate(alg).public_jwk).verify(chain, REFUND, pop=pop)


@pytest.mark.parametrize("alg", ALGS)
def test_sixteen_threads_sign_at_once_on_two_tokens(
    hsm: SoftHsm, token: Pkcs11Token, signers: dict[str, Pkcs11KeySigner], alg: str
) -> None:
    """Two sessions on one module, 16 threads: without the module lock SoftHSM2 crashes."""
    threads_n, per_thread = 16, 50
    with hsm.open("mandate-second") as second:
        label = f"second-{alg.lower()}"
        if label not in {k.label for k in second.list_keys()}:
            second.generate_key(label, alg)
        pool = [signers[alg], second.signer(label)]
        results: list[tuple[Pkcs11KeySigner, bytes, bytes]] = []

        def work(n: int) -> None:
            signer = pool[n % 2]
            for i in range(per_thread):
                data = f"thread {n} message {i}".encode()
                results.append((signer, data, signer.sign(data)))

        errors, running = run_together(work, threads_n, join_s=30)
        assert running == 0
    assert errors == []
    assert len(results) == threads_n * per_thread
    assert len({data for _, data, _ in results}) == threads_n * per_thread
    assert all(verifies(signer, data, sig) for signer, data, sig in results)


# --- start-up errors and PINs -----------------------------------------------------------


def test_wrong_pin_is_a_clear_config_error_that_names_no_pin(hsm: SoftHsm) -> None:
    wrong = "9182736450"
    with pytest.raises(ConfigError) as caught:
        hsm.open("mandate-wrong-pin", pin=wrong)
    message = str(caught.value)
    assert "'mandate-wrong-pin'" in message
    assert "PIN is incorrect (CKR_PIN_INCORRECT)" in message
    assert "not retried" in message
    assert wrong not in message
    assert hsm.user_pin not in message
    # One failure did not lock the token: the right PIN still opens it.
    with hsm.open("mandate-wrong-pin") as tok:
        assert tok.healthy


def test_second_handle_with_another_pin_is_refused_without_asking_the_token(
    hsm: SoftHsm, token: Pkcs11Token
) -> None:
    with pytest.raises(ConfigError, match="PIN differs") as caught:
        hsm.open("mandate-main", pin="0000-other")
    assert "0000-other" not in str(caught.value)
    assert token.healthy


def test_handles_on_one_token_share_a_session_and_close_independently(
    hsm: SoftHsm, token: Pkcs11Token, signers: dict[str, Pkcs11KeySigner]
) -> None:
    with hsm.open("mandate-main") as other:
        assert other._conn is token._conn
        other_signer = other.signer("root-eddsa")
    assert not other.healthy
    with pytest.raises(Unavailable, match="closed"):
        other_signer.sign(b"x")
    assert verifies(signers["EdDSA"], b"x", signers["EdDSA"].sign(b"x"))


def test_missing_token_lists_the_tokens_present(hsm: SoftHsm) -> None:
    with pytest.raises(ConfigError, match="no such token") as caught:
        Pkcs11Token(hsm.module, token_label="mandate-absent", pin=hsm.user_pin)
    assert "'mandate-main'" in str(caught.value)
    assert "'mandate-faults'" in str(caught.value)


def test_missing_module_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        Pkcs11Token(str(tmp_path / "libnothing.so"), token_label="t", pin="1234")


def test_a_file_that_is_not_a_module_is_a_config_error(tmp_path: Path) -> None:
    fake = tmp_path / "libfake.so"
    fake.write_bytes(b"not an ELF file")
    with pytest.raises(ConfigError, match="cannot load the PKCS#11 module"):
        Pkcs11Token(str(fake), token_label="t", pin="1234")


def test_repr_shows_no_pin(hsm: SoftHsm, token: Pkcs11Token,
                           signers: dict[str, Pkcs11KeySigner]) -> None:
    for text in (repr(token), repr(signers["EdDSA"]), repr(token._conn.pin)):
        assert hsm.user_pin not in text
    assert "mandate-main" in repr(token)


def test_pin_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MANDATE_TEST_PIN", "4321-env")
    assert pin_from_env("MANDATE_TEST_PIN") == "4321-env"
    monkeypatch.setenv("MANDATE_TEST_PIN", "")
    with pytest.raises(ConfigError, match="MANDATE_TEST_PIN is not set or is empty"):
        pin_from_env("MANDATE_TEST_PIN")
    monkeypatch.delenv("MANDATE_TEST_PIN")
    with pytest.raises(ConfigError, match="MANDATE_TEST_PIN"):
        pin_from_env("MANDATE_TEST_PIN")


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"4321-file\n", "4321-file"), (b"4321-file\r\n", "4321-file"), (b"4321 file", "4321 file")],
    ids=["newline", "crlf", "no-newline"],
)
def test_pin_from_file(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "pin"
    path.write_bytes(content)
    path.chmod(0o600)
    assert pin_from_file(path) == expected


@pytest.mark.parametrize(
    ("content", "match"),
    [(None, "cannot read the PIN file"), (b"\n", "is empty"), (b"12\xff34", "is not UTF-8")],
    ids=["missing", "empty", "not-utf8"],
)
def test_pin_file_errors_name_the_file_not_the_pin(tmp_path: Path, content: bytes | None,
                                                   match: str) -> None:
    path = tmp_path / "pin"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as caught:
        pin_from_file(path)
    assert "pin" in str(caught.value)
    assert "12" not in str(caught.value).replace(str(tmp_path), "")


# --- session faults ---------------------------------------------------------------------


@pytest.fixture
def faulty(hsm: SoftHsm) -> Iterator[tuple[Pkcs11Token, Pkcs11KeySigner, list[bool]]]:
    """A fresh handle on the faults token, its signer, and the health changes it saw."""
    changes: list[bool] = []
    with hsm.open("mandate-faults", on_health_change=changes.append) as tok:
        if not tok.list_keys():
            tok.generate_key("fault-key")
        yield tok, tok.signer("fault-key"), changes


def spy_open(monkeypatch: pytest.MonkeyPatch, tok: Pkcs11Token,
             fault: Callable[[Any], Any] | None = None) -> list[int]:
    """Count the backend's session opens; ``fault(session)`` may replace the result."""
    conn = tok._conn
    real = conn._open_session
    calls: list[int] = []

    def wrapped(pkcs11_token: Any) -> Any:
        calls.append(1)
        session = real(pkcs11_token)
        return fault(session) if fault is not None else session

    monkeypatch.setattr(conn, "_open_session", wrapped)
    return calls


def dead_on_arrival(session: Any) -> Any:
    """A real session that is gone before the retry uses it."""
    session.close()
    return session


def lost(name: str) -> type[Exception]:
    return next(e for e in _LOST_SESSION if e.__name__ == name)


def test_session_closed_under_the_backend_is_reopened_transparently(
    faulty: tuple[Pkcs11Token, Pkcs11KeySigner, list[bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tok, signer, changes = faulty
    assert verifies(signer, b"before", signer.sign(b"before"))
    opens = spy_open(monkeypatch, tok)
    old = tok._conn.session
    old.close()  # C_Logout + C_CloseSession: handle and key handles now invalid
    assert verifies(signer, b"after", signer.sign(b"after"))
    assert opens == [1]
    assert tok._conn.session is not old
    assert tok.healthy
    assert changes == []


def test_a_search_on_a_lost_session_is_finished_at_once_and_prints_nothing(
    faulty: tuple[Pkcs11Token, Pkcs11KeySigner, list[bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """python-pkcs11 leaves a search that C_FindObjectsInit refused marked active;
    its finaliser would call C_FindObjectsFinal on the dead session and print the
    error. The backend finishes every search itself."""
    tok, _signer, changes = faulty
    ignored: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    opens = spy_open(monkeypatch, tok)
    tok._conn.session.close()  # the next search starts on a dead session
    assert "fault-key" in {k.label for k in tok.list_keys()}  # reopened, searched again
    gc.collect()
    assert [(type(u.exc_value).__name__, repr(u.object)) for u in ignored] == []
    assert opens == [1]
    assert changes == []


def test_all_sessions_closed_by_the_module_are_reopened_transparently(
    faulty: tuple[Pkcs11Token, Pkcs11KeySigner, list[bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tok, signer, changes = faulty
    signer.sign(b"warm the key handle cache")
    opens = spy_open(monkeypatch, tok)
    module = ctypes.CDLL(tok.module)  # the already-loaded module, a second handle on it
    slot_id = tok._conn.session.token.slot.slot_id
    assert module.C_CloseAllSessions(ctypes.c_ulong(slot_id)) == 0  # CKR_OK; logs out too
    assert verifies(signer, b"after", signer.sign(b"after"))
    assert opens == [1]
    assert tok.healthy
    assert changes == []


def test_reopen_that_fails_again_goes_down_after_one_retry(
    faulty: tuple[Pkcs11Token, Pkcs11KeySigner, list[bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tok, signer, changes = faulty
    opens = spy_open(monkeypatch, tok, dead_on_arrival)
    tok._conn.session.close()
    with pytest.raises(Unavailable, match="cannot be reopened"):
        signer.sign(b"x")
    assert opens == [1]  # one reopen, one retry, no loop
    assert not tok.healthy
    assert changes == [False]
    monkeypatch.undo()
    assert tok.probe()
    assert verifies(signer, b"y", signer.sign(b"y"))
    assert changes == [False, True]


def test_token_down_fails_fast_until_a_probe_reopens_it(
    faulty: tuple[Pkcs11Token, Pkcs11KeySigner, list[bool]], monkeypatch: pytest.MonkeyPatch
) -> None:
    tok, signer, changes = faulty
    removed = lost("DeviceRemoved")
    conn = tok._conn

    def unplugged(session: Any) -> Any:
        session.close()
        raise removed("injected: the device is gone")

    opens = spy_open(monkeypatch, tok, unplugged)
    conn.session.close()
    with pytest.raises(Unavailable, match=r"cannot be reopened \(DeviceRemoved\)"):
        signer.sign(b"x")
    assert not tok.healthy
    assert changes == [False]
    assert "DeviceRemoved" in (tok.down_reason or "")

    # Fast: no HSM call, not even the module lock (held here by another party).
    outcome: list[BaseException] = []
    with conn.module.lock:
        worker = threading.Thread(target=lambda: _catch(outcome, signer.sign, b"x"))
        began = time.monotonic()
        worker.start()
        worker.join(timeout=5)
        elapsed = time.monotonic() - began
    assert not worker.is_alive()
    assert len(outcome) == 1
    assert isinstance(outcome[0], Unavailable)
    assert elapsed < 1.0
    with pytest.raises(Unavailable):
        tok.list_keys()
    assert opens == [1]

    assert not tok.probe()  # still unplugged: one try per probe
    assert opens == [1, 1]
    assert changes == [False]
    monkeypatch.undo()
    assert tok.probe()
    assert tok.healthy
    assert changes == [False, True]
    assert verifies(signer, b"back", signer.sign(b"back"))


def _catch(into: list[BaseException], fn: Callable[[bytes], Any], arg: bytes) -> None:
    try:
        fn(arg)
    except BaseException as exc:
        into.append(exc)


def test_pin_refused_on_reopen_stays_down_and_is_never_retried(
    hsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    changes: list[bool] = []
    with hsm.open("mandate-pin-change", on_health_change=changes.append) as tok:
        signer = tok.signer(tok.generate_key("pin-key", "ES256").label)
        conn = tok._conn
        opens = spy_open(monkeypatch, tok)
        # The token's PIN "changed" while the daemon ran: its re-login is refused for real.
        monkeypatch.setattr(conn.pin, "_value", "4444-stale")
        conn.session.close()
        with pytest.raises(Unavailable, match=r"PIN is incorrect \(CKR_PIN_INCORRECT\)") as caught:
            signer.sign(b"x")
        assert "4444-stale" not in str(caught.value)
        assert opens == [1]
        assert changes == [False]
        assert "restart with the right PIN" in (tok.down_reason or "")
        for _ in range(3):
            assert not tok.probe()
        with pytest.raises(Unavailable):
            signer.sign(b"x")
        assert opens == [1]  # the refused PIN was tried exactly once
        monkeypatch.setattr(conn.pin, "_value", hsm.user_pin)
        assert not tok.probe()
        assert opens == [1]
    with hsm.open("mandate-pin-change") as fresh:
        again = fresh.signer("pin-key")
        assert verifies(again, b"restart", again.sign(b"restart"))


def test_a_failing_health_callback_does_not_break_signing(
    hsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_healthy: bool) -> None:
        raise RuntimeError("listener bug")

    with hsm.open("mandate-faults", on_health_change=broken) as tok:
        if not tok.list_keys():
            tok.generate_key("fault-key")
        signer = tok.signer("fault-key")
        spy_open(monkeypatch, tok, dead_on_arrival)
        tok._conn.session.close()
        with pytest.raises(Unavailable):
            signer.sign(b"x")
        monkeypatch.undo()
        assert tok.probe()
        assert verifies(signer, b"ok", signer.sign(b"ok"))


def test_closed_handle_is_unavailable_and_unhealthy(hsm: SoftHsm) -> None:
    tok = hsm.open("mandate-faults")
    if not tok.list_keys():
        tok.generate_key("fault-key")
    signer = tok.signer("fault-key")
    tok.close()
    tok.close()  # idempotent
    assert not tok.healthy
    assert not tok.probe()
    with pytest.raises(Unavailable, match="closed"):
        signer.sign(b"x")
    assert "closed" in repr(tok)


def test_softhsm_helper_writes_a_config_for_its_directory(tmp_path: Path) -> None:
    import softhsm

    conf = softhsm.write_config(tmp_path, log_level="WARNING")
    text = conf.read_text()
    assert f"directories.tokendir = {tmp_path.resolve() / 'tokens'}\n" in text
    assert "objectstore.backend = file\n" in text
    assert "log.level = WARNING\n" in text
    assert (tmp_path / "tokens").is_dir()
    assert os.path.isfile(softhsm.find_module())
