"""The PKCS#11 key backend: root keys that never leave the token, for any module.

The only module of the project that imports ``pkcs11``; everything it raises
is a ``SignerError``. Ed25519 signs with CKM_EDDSA over the signing input;
ES256 with CKM_ECDSA over its SHA-256 digest, which PKCS#11 returns as
``r‖s`` — already the JWS form.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar

import pkcs11
import pkcs11._pkcs11 as _p11_native
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11e

from verifier_sdk._encoding import b64url_encode
from verifier_sdk._keys import public_key_from_jwk
from verifier_sdk._link import check_kid

from ._errors import ConfigError, SignerError, Unavailable

__all__ = [
    "ALGS",
    "KeyInfo",
    "Pkcs11KeySigner",
    "Pkcs11Token",
    "pin_from_env",
    "pin_from_file",
]

log = logging.getLogger("mandate.signer.pkcs11")

T = TypeVar("T")

ALGS = ("EdDSA", "ES256")


@dataclass(frozen=True)
class _Curve:
    alg: str
    key_type: KeyType
    ec_params: tuple[bytes, ...]  # DER encodings we accept; the first is the one we generate
    generate: Mechanism
    sign: Mechanism
    point_size: int  # bytes of the raw public point


_CURVES = {
    "EdDSA": _Curve(
        "EdDSA", KeyType.EC_EDWARDS,
        # OID 1.3.101.112, or PKCS#11 3.0's PrintableString "edwards25519".
        (bytes.fromhex("06032b6570"), b"\x13\x0cedwards25519"),
        Mechanism.EC_EDWARDS_KEY_PAIR_GEN, Mechanism.EDDSA, 32,
    ),
    "ES256": _Curve(
        "ES256", KeyType.EC,
        (bytes.fromhex("06082a8648ce3d030107"),),  # OID 1.2.840.10045.3.1.7 (P-256)
        Mechanism.EC_KEY_PAIR_GEN, Mechanism.ECDSA, 65,
    ),
}

# The private key's protection, reported by list_keys and checked by signer().
_FLAGS = {
    "token": Attribute.TOKEN,
    "private": Attribute.PRIVATE,
    "sensitive": Attribute.SENSITIVE,
    "always_sensitive": Attribute.ALWAYS_SENSITIVE,
    "extractable": Attribute.EXTRACTABLE,
    "never_extractable": Attribute.NEVER_EXTRACTABLE,
    "local": Attribute.LOCAL,
    "sign": Attribute.SIGN,
    "decrypt": Attribute.DECRYPT,
    "unwrap": Attribute.UNWRAP,
    "derive": Attribute.DERIVE,
}

# A session the module no longer honours: evict it, reopen, log in, look the
# key handles up again and retry once.
_LOST_SESSION: tuple[type[Exception], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.DeviceError,
    p11e.UserNotLoggedIn,
    p11e.KeyHandleInvalid,
    p11e.ObjectHandleInvalid,
)

# C_Login answers that another try cannot change; each try may count
# towards locking the token, so none is ever repeated on its own.
_PIN_REFUSED: dict[type[Exception], str] = {
    p11e.PinIncorrect: "the PIN is incorrect (CKR_PIN_INCORRECT)",
    p11e.PinLocked: "the user PIN is locked (CKR_PIN_LOCKED)",
    p11e.PinExpired: "the PIN has expired (CKR_PIN_EXPIRED)",
    p11e.PinInvalid: "the PIN holds characters the token refuses (CKR_PIN_INVALID)",
    p11e.PinLenRange: "the PIN's length is outside the token's range (CKR_PIN_LEN_RANGE)",
    p11e.UserPinNotInitialized: "the token's user PIN is not initialised",
}

# Errors that say the token or the key cannot do what we ask: setup, not outage.
_UNSUPPORTED: tuple[type[Exception], ...] = (
    p11e.MechanismInvalid,
    p11e.MechanismParamInvalid,
    p11e.FunctionNotSupported,
    p11e.KeyTypeInconsistent,
    p11e.TemplateInconsistent,
    p11e.TemplateIncomplete,
    p11e.AttributeValueInvalid,
    p11e.AttributeTypeInvalid,
    p11e.DomainParamsInvalid,
    p11e.TokenWriteProtected,
)


# --- PINs ------------------------------------------------------------------------


def pin_from_env(var_name: str) -> str:
    """The PIN held by environment variable ``var_name``."""
    value = os.environ.get(var_name)
    if not value:
        raise ConfigError(f"the PIN variable {var_name} is not set or is empty")
    return value


def pin_from_file(path: str | os.PathLike[str]) -> str:
    """The PIN in a file: its text without one trailing newline."""
    try:
        raw = Path(path).read_bytes()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read the PIN file {os.fspath(path)!r}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        # The decoder's message quotes the offending byte: a piece of the PIN.
        raise ConfigError(f"the PIN file {os.fspath(path)!r} is not UTF-8") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise ConfigError(f"the PIN file {os.fspath(path)!r} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("the PIN file %s can be read by other users (mode %o)",
                    os.fspath(path), stat.S_IMODE(mode))
    return text


class _Secret:
    """A PIN kept for re-login after a lost session; never shown by repr."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def matches(self, other: str) -> bool:
        return hmac.compare_digest(self._value.encode(), other.encode())

    def __repr__(self) -> str:
        return "<secret>"


# --- keys ------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyInfo:
    """A key pair in the token: its label is the kid of the trust bundle."""

    label: str
    key_id: str  # CKA_ID, hex
    alg: str
    public_jwk: Mapping[str, str] = field(hash=False)
    flags: Mapping[str, bool] = field(hash=False)  # the private key's CKA_* booleans

    @property
    def kid(self) -> str:
        return self.label


def _check_label(label: object) -> str:
    try:
        return check_kid(label)
    except ValueError as exc:
        raise ConfigError(f"key label {label!r}: {exc} (the label is the kid)") from None


def _public_jwk(curve: _Curve, ec_point: bytes) -> dict[str, str]:
    """The JWK of a CKA_EC_POINT: a DER OCTET STRING, or the raw point some modules give."""
    size = curve.point_size
    if len(ec_point) == size + 2 and ec_point[0] == 0x04 and ec_point[1] == size:
        point = ec_point[2:]
    elif len(ec_point) == size:
        point = ec_point
    else:
        raise ValueError(f"CKA_EC_POINT of {len(ec_point)} bytes is not a {curve.alg} key")
    if curve.alg == "EdDSA":
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(point)}
    else:
        if point[0] != 0x04:
            raise ValueError("CKA_EC_POINT is not an uncompressed P-256 point")
        jwk = {"kty": "EC", "crv": "P-256",
               "x": b64url_encode(point[1:33]), "y": b64url_encode(point[33:])}
    return dict(public_key_from_jwk(jwk).jwk)


class _Unsupported(Exception):
    """A private key that is not an Ed25519 or P-256 key with its public key."""


def _curve_of(private: Any) -> _Curve:
    try:
        key_type = private[Attribute.KEY_TYPE]
        params = bytes(private[Attribute.EC_PARAMS])
    except p11e.AttributeTypeInvalid:
        raise _Unsupported("not an elliptic-curve key") from None
    for curve in _CURVES.values():
        if key_type == curve.key_type and params in curve.ec_params:
            return curve
    raise _Unsupported(f"key type {key_type!r} with curve {params.hex()} is not Ed25519 or P-256")


def _flags(private: Any) -> dict[str, bool]:
    flags = {}
    for name, attribute in _FLAGS.items():
        try:
            flags[name] = bool(private[attribute])
        except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive):
            continue
    return flags


def _describe(session: Any, private: Any) -> KeyInfo:
    """A private key's KeyInfo, its public half found by CKA_ID (else by label)."""
    curve = _curve_of(private)
    label = private[Attribute.LABEL]
    key_id = bytes(private[Attribute.ID])
    query: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: curve.key_type,
    }
    query.update({Attribute.ID: key_id} if key_id else {Attribute.LABEL: label})
    publics = _exhaust(session, query)
    if len(publics) != 1:
        raise _Unsupported(f"{len(publics)} public keys match, not 1")
    try:
        jwk = _public_jwk(curve, bytes(publics[0][Attribute.EC_POINT]))
    except ValueError as exc:
        raise _Unsupported(str(exc)) from None
    return KeyInfo(label=label, key_id=key_id.hex(), alg=curve.alg,
                   public_jwk=MappingProxyType(jwk), flags=MappingProxyType(_flags(private)))


# Objects fetched per C_FindObjects call (python-pkcs11's get_objects default).
_SEARCH_BATCH = 10
# What get_objects drives in python-pkcs11 0.10 (the package's stubs leave it out).
_SEARCH_ITER: Any = getattr(_p11_native, "SearchIter", None)


def _exhaust(session: Any, query: Mapping[Attribute, Any]) -> list[Any]:
    """Every object matching ``query``; the search is finished when this returns or raises.

    An abandoned search stays active on the session until garbage collection.
    And python-pkcs11 (0.10) marks a search active before C_FindObjectsInit, so
    one refused there (a lost session) is never finished: its finaliser calls
    C_FindObjectsFinal on the dead session and prints the error as an ignored
    exception. So the search is finished here, that error dropped.
    """
    if _SEARCH_ITER is None:  # a python-pkcs11 without it: its own search
        return list(session.get_objects(dict(query)))
    search = _SEARCH_ITER(session, dict(query), _SEARCH_BATCH)
    try:
        with search:  # C_FindObjectsInit ... C_FindObjectsFinal
            return [obj for batch in search for obj in batch]
    finally:
        with contextlib.suppress(p11e.PKCS11Error):
            search._finalize()  # a no-op unless C_FindObjectsInit failed


# --- the module and its lock -------------------------------------------------------
#
# Concurrency: one lock per loaded module, taken around EVERY call into it.
#
# python-pkcs11 initialises a module with C_Initialize(NULL), which promises
# the module a single-threaded caller, yet releases the GIL inside each call:
# two threads signing at once through SoftHSM2 crash the process. Measured
# with this design (SoftHSM2 2.6, 2-core test machine, 5 runs of 5,000
# signatures, median (range)):
#                  no lock, 1 thread     1 thread              16 threads
#     EdDSA        4,100 (3,100-4,800)   3,900 (2,700-4,500)   4,300 (4,000-4,500)
#     ES256       11,700 (9,700-12,500) 11,600 (6,900-12,300) 10,700 (8,500-12,100)
# python-pkcs11's own per-session lock serialises operations (sign, search)
# on ONE session, but not attribute reads, logins or calls on a second
# session: 16 threads on their own sessions crashed here with SIGSEGV
# (2 threads: CKR_GENERAL_ERROR). The lock costs ~5 % and 16 contending
# threads lose nothing. A signing gRPC
# call peaks at ~1,400-1,750/s on its own, so even EdDSA under the lock
# leaves 2x headroom; worker processes (~2x on two cores) or re-initialising
# the module with CKF_OS_LOCKING_OK would add process management or
# module-specific init code for throughput the server cannot use. With one
# lock a single session per token is enough; it also holds the token's
# login, which PKCS#11 keeps per process, not per session, so every
# Pkcs11Token on the same token shares it (see _Connection). What the lock
# does not cure: each call releases the GIL, and a CPU-bound Python thread
# beside the signer delays every reacquisition (DESIGN.md: ~4,700/s → ~70/s).


class _Module:
    """A loaded PKCS#11 module and the lock that serialises every call into it."""

    def __init__(self, path: str, lib: Any) -> None:
        self.path = path
        self.lib = lib
        self.lock = threading.Lock()
        # Counts re-initialisations: a session opened in an earlier generation is void.
        self.generation = 0

    def reinitialize(self) -> None:
        """C_Finalize, then C_Initialize (lock held): the module sees its tokens afresh.

        A module may never take back a token whose device or storage went
        away: SoftHSM2 2.6 marks it invalid for good, and only a new
        C_Initialize sees it return. Every session on the module is void
        afterwards and handle numbers start over, so an old session's handle
        may name a new session: it is never used or closed again.
        """
        self.generation += 1
        self.lib.reinitialize()


_registry_lock = threading.Lock()  # taken before a module lock, never after
_modules: dict[str, _Module] = {}
_connections: dict[tuple[str, str], _Connection] = {}


def _load_module(module: str) -> _Module:
    """The loaded module at ``module`` (registry lock held); python-pkcs11 loads once."""
    path = os.path.realpath(module)
    loaded = _modules.get(path)
    if loaded is not None:
        return loaded
    if not os.path.isfile(path):
        raise ConfigError(f"PKCS#11 module {module!r} does not exist")
    try:
        lib = pkcs11.lib(path)
    except (p11e.PKCS11Error, OSError) as exc:
        # A module's own errors carry no text; C_Initialize fails when, for
        # one, SoftHSM2's token directory is missing.
        why = str(exc) or f"it failed to initialise ({_error_name(exc)}): is its token " \
            "store or device reachable?"
        raise ConfigError(f"cannot load the PKCS#11 module {module!r}: {why}") from None
    loaded = _modules[path] = _Module(path, lib)
    return loaded


class _TokenMissing(Exception):
    """No token (or more than one) has the label."""


class _PinRefused(Exception):
    """C_Login refused the PIN: never try it again on our own."""


def _error_name(exc: BaseException) -> str:
    return type(exc).__name__


class _Connection:
    """The one logged-in session on a token, shared by its Pkcs11Token handles.

    ``healthy`` implies a session. All HSM calls happen under the module lock.
    ``generation`` is the module's when the session was opened: once the
    module is re-initialised (by a probe of any token on it), the session is
    void and is reopened before the next call.
    """

    def __init__(self, module: _Module, token_label: str, pin: str) -> None:
        self.module = module
        self.token_label = token_label
        self.pin = _Secret(pin)
        self.session: Any = None
        self.generation = module.generation
        self.healthy = False
        self.down_reason: str | None = None
        self.pin_refused = False
        self.closed = False
        self.handles = 0
        self.listeners: dict[int, Callable[[bool], None]] = {}
        self._keys: dict[tuple[str, str], Any] = {}  # (label, id hex) → private key object
        self._notify_lock = threading.Lock()
        self._notified = True

    @property
    def name(self) -> str:
        return f"token {self.token_label!r}"

    # -- opening ----------------------------------------------------------------

    def start(self) -> None:
        """The first login: any failure is a ConfigError, and none is retried."""
        with self.module.lock:
            try:
                self.session = self._login()
                self.generation = self.module.generation
            except (_TokenMissing, _PinRefused) as exc:
                raise ConfigError(f"{self.name}: {exc}") from None
            except p11e.PKCS11Error as exc:
                raise ConfigError(
                    f"{self.name}: cannot open a session ({_error_name(exc)})"
                ) from None
            self.healthy = True

    def _login(self) -> Any:
        token = self._find_token()
        try:
            return self._open_session(token)
        except tuple(_PIN_REFUSED) as exc:
            why = next(text for kind, text in _PIN_REFUSED.items() if isinstance(exc, kind))
            raise _PinRefused(f"{why}; not retried, since failed logins lock tokens") from None

    def _find_token(self) -> Any:
        lib = self.module.lib
        try:
            return lib.get_token(token_label=self.token_label)
        except p11e.MultipleTokensReturned:
            raise _TokenMissing("several tokens carry this label") from None
        except p11e.NoSuchToken:
            pass
        labels = []
        for slot in lib.get_slots(token_present=True):
            try:
                label = slot.get_token().label
            except p11e.PKCS11Error:
                continue
            if label:
                labels.append(label)
        present = ", ".join(repr(label) for label in sorted(labels)) or "none"
        raise _TokenMissing(f"no such token in {self.module.path}; tokens present: {present}")

    def _open_session(self, token: Any) -> Any:
        """Open a R/W session and log in (the seam the fault tests wrap)."""
        try:
            return token.open(rw=True, user_pin=self.pin.reveal())
        except p11e.UserAlreadyLoggedIn:
            # Login is per process: a session we lost track of still holds it.
            return token.open(rw=True)

    def _reopen(self) -> None:
        """Evict the session and its key handles, then log in on a new one."""
        old, self.session = self.session, None
        self._keys.clear()
        if old is not None and self.generation == self.module.generation:
            with contextlib.suppress(p11e.PKCS11Error):
                old.close()
        self.session = self._login()
        self.generation = self.module.generation

    # -- calls --------------------------------------------------------------------

    def call(self, op: Callable[[Any], T]) -> T:
        """Run ``op(session)`` under the lock; on a lost session reopen and retry once."""
        if not self.healthy:  # fast: no lock, no HSM call
            raise Unavailable(self._down_text())
        went_down = False
        try:
            with self.module.lock:
                if not self.healthy:
                    raise Unavailable(self._down_text())
                try:
                    if self.generation == self.module.generation:
                        try:
                            return op(self.session)
                        except _LOST_SESSION as exc:
                            log.warning("%s: session lost (%s); reopening", self.name,
                                        _error_name(exc))
                    else:
                        log.info("%s: the module was re-initialised; reopening", self.name)
                    try:
                        self._reopen()
                    except (_TokenMissing, _PinRefused, p11e.PKCS11Error) as exc:
                        went_down = self._go_down(exc)
                        raise Unavailable(self._down_text()) from None
                    try:
                        return op(self.session)
                    except _LOST_SESSION as exc:
                        went_down = self._go_down(exc)
                        raise Unavailable(self._down_text()) from None
                except p11e.PKCS11Error as exc:
                    raise self._wrap(exc) from None
        finally:
            if went_down:
                self._notify()

    def probe(self) -> bool:
        """Check the session, or, if the token is down, re-initialise the module
        and try once to reopen it."""
        if self.closed or self.pin_refused:
            return False
        if self.healthy:
            with contextlib.suppress(SignerError):
                self.call(lambda session: _exhaust(session, _PROBE_QUERY))
            return self.healthy
        came_up = False
        with self.module.lock:
            if self.closed or self.pin_refused:
                return False
            if not self.healthy:
                try:
                    self.module.reinitialize()  # see _Module.reinitialize
                    self._reopen()
                except (_TokenMissing, _PinRefused, p11e.PKCS11Error) as exc:
                    self._go_down(exc)
                    return False
                self.healthy, self.down_reason, came_up = True, None, True
                log.warning("%s: session reopened, signing again", self.name)
        if came_up:
            self._notify()
        return True

    def _go_down(self, exc: BaseException) -> bool:
        """Record why the token is down (lock held); True if it was up."""
        was_up = self.healthy
        self.healthy = False
        if isinstance(exc, _PinRefused):
            self.pin_refused = True
            self.down_reason = f"{exc}; restart with the right PIN"
        elif isinstance(exc, _TokenMissing):
            self.down_reason = str(exc)
        else:
            self.down_reason = f"the session cannot be reopened ({_error_name(exc)})"
        if was_up:
            log.error("%s is down: %s", self.name, self.down_reason)
        return was_up

    def _down_text(self) -> str:
        if self.closed:
            return f"{self.name}: closed"
        return f"{self.name} is unavailable: {self.down_reason}"

    def _wrap(self, exc: p11e.PKCS11Error) -> SignerError:
        if isinstance(exc, _UNSUPPORTED):
            return ConfigError(f"{self.name} refused the operation ({_error_name(exc)})")
        return Unavailable(f"{self.name}: the HSM failed ({_error_name(exc)})")

    def _notify(self) -> None:
        """Tell listeners the current health, once per change, in order."""
        with self._notify_lock:
            state = self.healthy
            if state == self._notified:
                return
            self._notified = state
            for callback in list(self.listeners.values()):
                try:
                    callback(state)
                except Exception:
                    log.exception("%s: health callback failed", self.name)

    # -- keys (ops run by call(), under the lock) -----------------------------------

    def private_key(self, session: Any, label: str, key_id: str) -> Any:
        key = self._keys.get((label, key_id))
        if key is None:
            found = _exhaust(session, {
                Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label,
                Attribute.ID: bytes.fromhex(key_id),
            })
            if len(found) != 1:
                raise ConfigError(
                    f"{self.name}: key {label!r} (id {key_id}) is no longer in the token"
                )
            key = self._keys[(label, key_id)] = found[0]
        return key

    def close(self) -> None:
        with self.module.lock:
            self.closed = True
            self.healthy = False
            session, self.session = self.session, None
            self._keys.clear()
            if session is not None and self.generation == self.module.generation:
                try:
                    session.close()
                except p11e.PKCS11Error as exc:
                    log.warning("%s: closing the session failed (%s)", self.name,
                                _error_name(exc))


_PROBE_QUERY = {Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: "mandate-health-probe"}


# --- the public face -----------------------------------------------------------------


class Pkcs11Token:
    """A logged-in token of any PKCS#11 module: generate, list and use keys.

    A wrong PIN, a missing module or token raise ConfigError at once and are
    never retried. Handles on the same token in one process share one
    session and its login (PKCS#11 logs in per process); a second handle's
    PIN is compared with the first's, without asking the token.
    """

    def __init__(self, module: str, *, token_label: str, pin: str,
                 on_health_change: Callable[[bool], None] | None = None) -> None:
        if not token_label:
            raise ConfigError("a token label is required")
        if not pin:
            raise ConfigError("an empty PIN was given")
        self._closed = True
        with _registry_lock:
            loaded = _load_module(module)
            key = (loaded.path, token_label)
            conn = _connections.get(key)
            if conn is None:
                conn = _Connection(loaded, token_label, pin)
                conn.start()
                _connections[key] = conn
            elif not conn.pin.matches(pin):
                raise ConfigError(
                    f"{conn.name}: the PIN differs from the one this process logged in "
                    "with, so it is wrong (the token was not asked)"
                )
            conn.handles += 1
            self._conn = conn
            self._closed = False
            if on_health_change is not None:
                conn.listeners[id(self)] = on_health_change

    @property
    def module(self) -> str:
        return self._conn.module.path

    @property
    def token_label(self) -> str:
        return self._conn.token_label

    @property
    def healthy(self) -> bool:
        """True while the token answers; False while calls fail fast with Unavailable."""
        return not self._closed and self._conn.healthy

    @property
    def down_reason(self) -> str | None:
        """Why the token is down, or None."""
        return None if self.healthy else self._conn._down_text()

    def probe(self) -> bool:
        """For a health loop: check the session, or reopen a down token once, after
        re-initialising its module (other tokens' sessions reopen at their next call).

        After the token refused the PIN it stays down and is not asked again.
        """
        return not self._closed and self._conn.probe()

    def _call(self, op: Callable[[Any], T]) -> T:
        if self._closed:
            raise Unavailable(f"{self._conn.name}: this handle is closed")
        return self._conn.call(op)

    def generate_key(self, label: str, alg: str = "EdDSA") -> KeyInfo:
        """A new key pair inside the token: private, sensitive, non-extractable, sign-only."""
        label = _check_label(label)
        curve = _CURVES.get(alg)
        if curve is None:
            raise ConfigError(f"unsupported algorithm {alg!r}: one of {', '.join(ALGS)}")

        def op(session: Any) -> KeyInfo:
            if _exhaust(session, {Attribute.LABEL: label}):
                raise ConfigError(f"{self._conn.name} already holds objects labelled {label!r}")
            params = session.create_domain_parameters(
                curve.key_type, {Attribute.EC_PARAMS: curve.ec_params[0]}, local=True
            )
            _public, private = params.generate_keypair(
                store=True, label=label, id=secrets.token_bytes(16), mechanism=curve.generate,
                public_template={
                    Attribute.TOKEN: True, Attribute.PRIVATE: False, Attribute.VERIFY: True,
                    Attribute.ENCRYPT: False, Attribute.WRAP: False, Attribute.DERIVE: False,
                },
                private_template={
                    Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False, Attribute.SIGN: True,
                    Attribute.DERIVE: False, Attribute.DECRYPT: False, Attribute.UNWRAP: False,
                },
            )
            return _describe(session, private)

        info = self._call(op)
        log.info("%s: generated %s key %r (id %s)", self._conn.name, alg, label, info.key_id)
        return info

    def list_keys(self) -> list[KeyInfo]:
        """The Ed25519 and P-256 key pairs in the token, by label; others are skipped."""

        def op(session: Any) -> list[KeyInfo]:
            keys = []
            for private in _exhaust(session, {Attribute.CLASS: ObjectClass.PRIVATE_KEY}):
                try:
                    keys.append(_describe(session, private))
                except _Unsupported as exc:
                    log.info("%s: skipping a private key: %s", self._conn.name, exc)
            return keys

        return sorted(self._call(op), key=lambda info: (info.label, info.key_id))

    def signer(self, label: str) -> Pkcs11KeySigner:
        """The KeySigner of key ``label``; a missing or unusable key is a ConfigError."""
        label = _check_label(label)

        def op(session: Any) -> KeyInfo:
            found = _exhaust(session, {
                Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label,
            })
            if len(found) != 1:
                what = "no private key" if not found else f"{len(found)} private keys"
                raise ConfigError(f"{self._conn.name} holds {what} labelled {label!r}")
            try:
                return _describe(session, found[0])
            except _Unsupported as exc:
                raise ConfigError(f"{self._conn.name}: key {label!r}: {exc}") from None

        info = self._call(op)
        if not info.flags.get("sign"):
            raise ConfigError(f"{self._conn.name}: key {label!r} may not sign (CKA_SIGN false)")
        if not info.flags.get("sensitive"):
            raise ConfigError(f"{self._conn.name}: key {label!r} is not sensitive: its "
                              "private value can be read out of the token")
        if info.flags.get("extractable"):
            log.warning("%s: key %r is extractable (it can be wrapped out of the token)",
                        self._conn.name, label)
        return Pkcs11KeySigner(self, info)

    def close(self) -> None:
        """Release this handle; the last one closes the session (and logs out)."""
        with _registry_lock:
            if self._closed:
                return
            self._closed = True
            conn = self._conn
            conn.listeners.pop(id(self), None)
            conn.handles -= 1
            if conn.handles > 0:
                return
            _connections.pop((conn.module.path, conn.token_label), None)
            conn.close()

    def __enter__(self) -> Pkcs11Token:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("healthy" if self.healthy else "down")
        return f"Pkcs11Token(module={self.module!r}, token_label={self.token_label!r}, {state})"


class Pkcs11KeySigner:
    """A KeySigner whose private key stays in the token."""

    def __init__(self, token: Pkcs11Token, info: KeyInfo) -> None:
        self._token = token
        self._info = info
        self._curve = _CURVES[info.alg]

    @property
    def kid(self) -> str:
        return self._info.label

    @property
    def alg(self) -> str:
        return self._info.alg

    @property
    def public_jwk(self) -> dict[str, Any]:
        return dict(self._info.public_jwk)

    @property
    def info(self) -> KeyInfo:
        return self._info

    def sign(self, data: bytes) -> bytes:
        """The JWS-form signature of ``data``: 64 bytes for both algorithms."""
        curve, label, key_id = self._curve, self._info.label, self._info.key_id
        message = hashlib.sha256(data).digest() if curve.alg == "ES256" else bytes(data)
        conn = self._token._conn

        def op(session: Any) -> bytes:
            key = conn.private_key(session, label, key_id)
            return bytes(key.sign(message, mechanism=curve.sign))

        signature = self._token._call(op)
        if len(signature) != 64:
            raise ConfigError(f"{conn.name}: the module returned a {len(signature)}-byte "
                              f"{curve.alg} signature, not 64 bytes")
        return signature

    def __repr__(self) -> str:
        return f"Pkcs11KeySigner(kid={self.kid!r}, alg={self.alg!r}, {self._token!r})"


class Pkcs11KeyStore:
    """The daemon's KeyStore on a token: signers are looked up once and kept."""

    def __init__(self, token: Pkcs11Token) -> None:
        self.token = token
        self._signers: dict[str, Pkcs11KeySigner] = {}
        self._lock = threading.Lock()

    def generate(self, kid: str, alg: str) -> Pkcs11KeySigner:
        self.token.generate_key(kid, alg)
        return self.signer(kid)

    def signer(self, kid: str) -> Pkcs11KeySigner:
        with self._lock:
            found = self._signers.get(kid)
            if found is None:
                found = self._signers[kid] = self.token.signer(kid)
            return found
