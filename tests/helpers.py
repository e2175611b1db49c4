"""Builders for valid chains and for the broken and malicious ones tests need.

``World`` holds a software root key, a trust bundle, a fixed clock and three
holders; ``forge`` signs any header and payload (or raw bytes) without the
checks the SDK's own builders apply, so tests can make exactly the bad token
they describe.

Below them, plumbing more than one test module shares: a signer config for a
daemon run in this process, threads released together, and a benchmark
script imported as it runs.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from verifier_sdk import (
    Decision,
    Holder,
    Request,
    TrustBundle,
    Verifier,
    decode_unverified,
    issue_root,
    make_pop,
    new_jti,
)
from verifier_sdk._encoding import sha256_b64

NOW = 1_800_000_000  # a fixed clock: 2027-01-15
AUD = "payments-api"
ROOT_KID = "root-1"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jbytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def forge(header: Any, payload: Any, sign: Callable[[bytes], bytes] | None) -> str:
    """A compact JWS over any header/payload (dicts, or raw JSON bytes)."""
    h = header if isinstance(header, bytes) else jbytes(header)
    p = payload if isinstance(payload, bytes) else jbytes(payload)
    signing_input = b64(h) + "." + b64(p)
    signature = sign(signing_input.encode()) if sign else b""
    return signing_input + "." + b64(signature)


def link_hash(token: str) -> str:
    return sha256_b64(token.encode())


REFUND_CAP = {
    "res": "api/payments/refunds/*",
    "act": ["post"],
    "if": {"amount": {"le": 5000}},
}
ORDERS_CAP = {"res": "db/orders/**", "act": ["select"], "if": {"customer": {"eq": 42}}}


@dataclass
class World:
    """A root key in its bundle, holders a → b → c, and a fixed clock."""

    root: Holder = field(default_factory=Holder.generate)
    a: Holder = field(default_factory=Holder.generate)
    b: Holder = field(default_factory=lambda: Holder.generate("ES256"))
    c: Holder = field(default_factory=Holder.generate)
    now: float = NOW

    @property
    def bundle(self) -> TrustBundle:
        return TrustBundle.from_jwks(self.jwks())

    def jwks(self, **extra: Any) -> dict[str, Any]:
        return {"keys": [{**self.root.public_jwk, "kid": ROOT_KID, "alg": self.root.alg, **extra}]}

    def clock(self) -> float:
        return self.now

    def verifier(self, **settings: Any) -> Verifier:
        settings.setdefault("audience", AUD)
        settings.setdefault("clock", self.clock)
        return Verifier(self.bundle, **settings)

    def root_payload(self, **changes: Any) -> dict[str, Any]:
        """The claims of the standard root link, to be tampered with and forged."""
        payload: dict[str, Any] = {
            "v": 1, "iss": "spiffe://acme.example/orchestrator", "sub": "agent:support",
            "iat": NOW - 10, "nbf": NOW - 10, "exp": NOW + 600, "jti": "root-jti-0000000001",
            "cnf": {"jwk": self.a.public_jwk}, "dpt": 2, "cap": [REFUND_CAP, ORDERS_CAP],
        }
        payload.update(changes)
        return {k: v for k, v in payload.items() if v is not None}

    def root_link(self, **changes: Any) -> str:
        return forge(
            {"alg": "EdDSA", "typ": "mandate+jwt", "kid": ROOT_KID},
            self.root_payload(**changes), self.root.sign,
        )

    def issue(self, **kw: Any) -> str:
        """A root link through the SDK's own builder."""
        kw.setdefault("iss", "spiffe://acme.example/orchestrator")
        kw.setdefault("sub", "agent:support")
        kw.setdefault("holder_jwk", self.a.public_jwk)
        kw.setdefault("cap", [REFUND_CAP, ORDERS_CAP])
        kw.setdefault("ttl", 600)
        kw.setdefault("dpt", 2)
        kw.setdefault("now", self.now - 10)
        return issue_root(alg=self.root.alg, kid=ROOT_KID, sign=self.root.sign, **kw)

    def chain3(self, *, use: int | None = None) -> str:
        """root → a → b → c: support narrows to refund o-123, then to a helper."""
        chain = self.issue()
        chain = self.a.attenuate(
            chain, sub="agent:refund", holder_jwk=self.b.public_jwk,
            cap=[{"res": "api/payments/refunds/o-123", "act": ["post"],
                  "if": {"amount": {"le": 5000}}}],
            ttl=300, dpt=1, now=self.now - 5,
        )
        return self.b.attenuate(
            chain, sub="agent:helper", holder_jwk=self.c.public_jwk,
            cap=[{"res": "api/payments/refunds/o-123", "act": ["post"]}],
            ttl=120, dpt=0, use=use, now=self.now - 1,
        )

    def prove(self, holder: Holder, chain: str, req: Request, **kw: Any) -> str:
        kw.setdefault("aud", AUD)
        kw.setdefault("now", self.now)
        return holder.prove(chain, req, **kw)


REFUND = Request("api/payments/refunds/o-123", "post", {"amount": 4999})


# --- tampering with chains --------------------------------------------------------
# Shared by the error-code and attack tables: build a chain, change one link,
# and re-sign what follows so that only the intended defect remains.


def unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def signers(world: World) -> tuple[Holder, Holder, Holder]:
    """Who signs links 0, 1 and 2 of chain3."""
    return world.root, world.a, world.b


def claims(chain: str, index: int) -> dict[str, Any]:
    """A copy of link ``index``'s payload (decoded, not verified)."""
    return copy.deepcopy(decode_unverified(chain)[index][1])


def header_of(chain: str, index: int) -> dict[str, Any]:
    return copy.deepcopy(decode_unverified(chain)[index][0])


def pop_for(world: World, chain: str, holder: Holder | None = None, req: Request = REFUND,
            *, aud: str = AUD, iat: int | None = None, ath: str | None = None) -> str:
    """A PoP by ``holder`` (default: the leaf holder of a prefix of chain3) over the
    chain's last token as sent, built without decoding the chain."""
    holder = holder or (world.a, world.b, world.c)[chain.count("~")]
    return make_pop(
        alg=holder.alg, sign=holder.sign,
        leaf_hash=ath or link_hash(chain.rsplit("~", 1)[-1]), request=req, aud=aud,
        iat=int(world.now) if iat is None else iat, jti=new_jti(),
    )


def use(world: World, chain: str, req: Request = REFUND, *, verifier: Verifier | None = None,
        pop: str | None = None, holder: Holder | None = None) -> Decision:
    verifier = verifier or world.verifier()
    return verifier.verify(chain, req, pop=pop or pop_for(world, chain, holder, req))


def relink(world: World, chain: str, index: int, token: str) -> str:
    """Put ``token`` at ``index``; re-sign the later links so each prv names its parent."""
    tokens = chain.split("~")
    decoded = decode_unverified(chain)
    tokens[index] = token
    for j in range(index + 1, len(tokens)):
        header, payload = copy.deepcopy(decoded[j])
        payload["prv"] = link_hash(tokens[j - 1])
        tokens[j] = forge(header, payload, signers(world)[j].sign)
    return "~".join(tokens)


def reforge(world: World, chain: str, index: int, *, header: dict[str, Any] | None = None,
            drop: tuple[str, ...] = (), sign: Callable[[bytes], bytes] | None = None,
            **changes: Any) -> str:
    """Link ``index`` with ``changes`` (and without ``drop``), signed by its legitimate
    signer unless ``sign``; later links re-signed to follow it."""
    head, payload = header_of(chain, index), claims(chain, index)
    head.update(header or {})
    payload.update(changes)
    for name in drop:
        del payload[name]
    return relink(world, chain, index, forge(head, payload, sign or signers(world)[index].sign))


# --- plumbing -------------------------------------------------------------------------

HSM_PIN_ENV = "MANDATE_TEST_HSM_PIN"  # where a daemon in the test process finds its PIN
BENCH = Path(__file__).resolve().parent.parent / "bench"


def write_signer_config(directory: Path, *, hsm_module: str, token: str, policy: str,
                        server: Mapping[str, Any], state: Mapping[str, Any], issuer: str,
                        audit: Mapping[str, Any] | None = None) -> Path:
    """``policy`` as policy.toml and a signer.toml naming it in ``directory``: a
    listener on 127.0.0.1:0 with the ``server`` settings, ``token`` on the
    SoftHSM2 ``hsm_module`` with its PIN from HSM_PIN_ENV, the ``state`` and
    ``audit`` settings, revocation lists from ``issuer``. The config's path."""
    (directory / "policy.toml").write_text(policy)
    tables: dict[str, Mapping[str, Any]] = {
        "server": {"listen": "127.0.0.1:0", **server},
        "hsm": {"module": hsm_module, "token_label": token, "pin_env": HSM_PIN_ENV},
        "policy": {"file": "policy.toml"},
        "state": state,
        **({"audit": audit} if audit else {}),
        "revocation": {"issuer": issuer},
    }
    config = directory / "signer.toml"
    config.write_text("".join(  # JSON strings, numbers, booleans and lists are TOML values
        f"\n[{name}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
        for name, table in tables.items()))
    return config


def run_together(work: Callable[[int], object], count: int, *,
                 join_s: float) -> tuple[list[BaseException], int]:
    """``work(i)`` for i in 0 .. count-1, each on a thread of its own, all released
    at once (a barrier, 30 s), each joined for up to ``join_s``: what they raised,
    and how many still run."""
    errors: list[BaseException] = []
    start = threading.Barrier(count, timeout=30)

    def run(i: int) -> None:
        try:
            start.wait()
            work(i)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(join_s)
    return errors, sum(worker.is_alive() for worker in workers)


def load_bench(name: str) -> ModuleType:
    """bench/``name``.py imported as it runs (its folder first on sys.path), as
    module ``bench_<name>``: the tests reuse the benchmarks' builders and runs."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()
