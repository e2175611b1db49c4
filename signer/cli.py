"""``mandate``: run the signer daemon, provision keys, delegate, revoke, audit;
offline, for holders: keygen, inspect, verify, attenuate, prove.

Errors are one line on stderr and a non-zero exit; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import softhsm
from verifier_sdk import (
    Capability,
    Decision,
    Holder,
    Request,
    TrustBundle,
    VerificationError,
    Verifier,
    decode_unverified,
)
from verifier_sdk._encoding import sha256_b64
from verifier_sdk._keys import ALGORITHMS, public_key_from_jwk

from ._audit import AuditLocation, read_records, verify_log
from ._config import Config, load_config
from ._errors import ConfigError, SignerError
from ._proto.mandate.v1 import signer_pb2 as pb
from ._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
from ._server import Core, Daemon
from ._storage import audit_location, audit_location_at, migrate_storage

EXIT_USAGE = 2
EXIT_FAILED = 1


class CliError(Exception):
    """A user-facing failure: printed as one line."""


# --- server side ------------------------------------------------------------------

def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from ._logging import configure_logging  # noqa: PLC0415 - the daemon's logs only

    config = _config(args)
    configure_logging(config.server.log_format,
                      level=logging.DEBUG if args.debug else logging.INFO)
    daemon = Daemon(config)
    daemon.start()
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.reload_policy())
    print(f"mandate signer listening on port {daemon.port}", flush=True)
    daemon.wait()
    return 0


def cmd_hsm_init(args: argparse.Namespace) -> int:
    so_pin = os.environ.get(args.so_pin_env, "")
    pin = os.environ.get(args.pin_env, "")
    if not so_pin or not pin:
        raise CliError(f"set {args.so_pin_env} and {args.pin_env} to the SO and user PINs")
    # A second token with the same label makes the label ambiguous: the keys
    # already in the first one could no longer be found by it.
    if args.label in _token_labels(Path(args.dir)):
        raise CliError(f"{args.dir} already holds a token labelled {args.label!r}")
    try:
        conf = softhsm.init_token(Path(args.dir), args.label, so_pin=so_pin, user_pin=pin)
    except softhsm.SoftHsmError as exc:
        raise CliError(str(exc)) from None
    print(f"SoftHSM2 token {args.label!r} initialised; export SOFTHSM2_CONF={conf}")
    return 0


def _token_labels(directory: Path) -> set[str]:
    """Labels of the tokens already in a SoftHSM2 store directory (none if new)."""
    conf = directory / softhsm.CONFIG_NAME
    util = shutil.which("softhsm2-util")
    if not conf.is_file() or util is None:
        return set()
    try:
        done = subprocess.run(  # noqa: S603 - a fixed tool, arguments as a list
            [util, "--show-slots"], env={**os.environ, "SOFTHSM2_CONF": str(conf)},
            capture_output=True, text=True, timeout=30, check=False,
        )
    except subprocess.TimeoutExpired:
        raise CliError("softhsm2-util --show-slots did not finish in 30 s") from None
    return {line.split(":", 1)[1].strip() for line in done.stdout.splitlines()
            if line.strip().startswith("Label:")}


@contextmanager
def _offline_daemon(args: argparse.Namespace) -> Iterator[Core]:
    """The daemon's issuing parts, in this process, without the server:
    for provisioning commands."""
    core = Core(_config(args))
    try:
        yield core
    finally:
        core.close(served=False)


def cmd_keys_generate(args: argparse.Namespace) -> int:
    with _offline_daemon(args) as daemon:
        record = daemon.issuer.add_key(args.kid, args.alg, caller="cli")
    print(f"generated {record.alg} key {record.kid!r} in the HSM; in the bundle from {record.nbf}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    with _offline_daemon(args) as daemon:
        keys = daemon.issuer.keyring()
        try:
            active = daemon.issuer.active_key(int(time.time())).kid
        except SignerError:
            active = None
        token = getattr(daemon.keys, "token", None)
        in_token = {k.label: k for k in token.list_keys()} if token is not None else {}
    for key in keys:
        mark = "*" if key.kid == active else " "
        exp = "-" if key.exp is None else str(key.exp)
        print(f"{mark} {key.kid:24} {key.alg:6} nbf={key.nbf} exp={exp}")
    for label in sorted(set(in_token) - {k.kid for k in keys}):
        print(f"  {label:24} {in_token[label].alg:6} in the HSM, not in the bundle")
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    with _offline_daemon(args) as daemon:
        new, old = daemon.issuer.rotate(args.new_kid, args.alg, not_before=args.not_before,
                                        max_link_ttl_s=daemon.max_link_ttl(), caller="cli")
    print(f"new key {new.kid!r} signs from {new.nbf}; {old.kid!r} leaves the bundle at {old.exp}")
    return 0


def cmd_keys_export_bundle(args: argparse.Namespace) -> int:
    with _offline_daemon(args) as daemon:
        bundle = daemon.issuer.trust_bundle()
    TrustBundle.from_jwks(bundle)  # never export what a verifier would refuse
    _write(args.out, json.dumps(bundle, indent=2, sort_keys=True) + "\n")
    return 0


def cmd_db_migrate(args: argparse.Namespace) -> int:
    print(migrate_storage(_config(args)))
    return 0


def _audit_log(args: argparse.Namespace) -> AuditLocation:
    """The log ``--config`` names ([state]), or ``--log``: a file, or a
    PostgreSQL URL whose password comes from PGPASSWORD or .pgpass."""
    if args.config:
        return audit_location(_config(args))
    return audit_location_at(args.log)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    bundle = TrustBundle.from_jwks(Path(args.bundle).read_text())
    report = verify_log(_audit_log(args), bundle)
    if report.ok:
        print(f"ok: {report.message}")
        return 0
    print(f"FAILED at seq {report.first_bad_seq} ({report.problem}): {report.message}")
    return EXIT_FAILED


def cmd_audit_show(args: argparse.Namespace) -> int:
    records = read_records(_audit_log(args), caller=args.caller, jti=args.jti, sub=args.sub,
                           limit=args.limit)
    for r in records:
        print(json.dumps({"seq": r.seq, "time": r.time, "event": r.event, "caller": r.caller,
                          "sub": r.sub, "decision": r.decision, "reason": r.reason,
                          "jti": r.jti, "kid": r.kid}, ensure_ascii=False))
    return 0


# --- client side ------------------------------------------------------------------

def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.plaintext:
        return grpc.insecure_channel(args.server)
    if not (args.ca and args.cert and args.key):
        raise CliError("mutual TLS needs --ca, --cert and --key (or --plaintext for a "
                       "loopback development server)")
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=Path(args.ca).read_bytes(),
            private_key=Path(args.key).read_bytes(),
            certificate_chain=Path(args.cert).read_bytes(),
        )
    except OSError as exc:
        raise CliError(f"cannot read TLS material: {exc}") from None
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.server, creds, options=options)


def _rpc(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except grpc.RpcError as exc:
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        reason = _denial_reason(exc)
        if reason:
            code = f"{code} ({reason})"
        raise CliError(f"{code}: {detail}") from None


def _denial_reason(error: grpc.RpcError) -> str:
    """The machine-readable reason a denial carries (google.rpc.ErrorInfo), if any."""
    try:
        status = rpc_status.from_call(error)
    except (ValueError, AttributeError):  # a mismatched status, or not a call at all
        return ""
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def _scalar(value: Any) -> pb.Scalar:
    if isinstance(value, bool):
        return pb.Scalar(b=value)
    if isinstance(value, int):
        return pb.Scalar(i=value)
    if isinstance(value, str):
        return pb.Scalar(s=value)
    raise CliError(f"constraint values are strings, ints or booleans, not {value!r}")


def cap_to_proto(cap: Any) -> pb.Capability:
    if not isinstance(cap, dict) or not {"res", "act"} <= cap.keys():
        raise CliError('a capability is {"res": ..., "act": [...], "if": {...}}')
    when = {}
    for attr, ops in (cap.get("if") or {}).items():
        c = pb.Constraint()
        for op, value in ops.items():
            if op == "eq":
                c.eq.CopyFrom(_scalar(value))
            elif op == "in":
                c.any_of.extend(_scalar(v) for v in value)
            elif op in ("lt", "le", "gt", "ge", "prefix"):
                setattr(c, op, value)
            else:
                raise CliError(f"unknown constraint operator {op!r}")
        when[attr] = c
    return pb.Capability(res=cap["res"], act=cap["act"], when=when)


def _json_arg(text: str, what: str) -> Any:
    text = _read_arg(text, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"{what}: not JSON: {exc}") from None


def cmd_delegate(args: argparse.Namespace) -> int:
    jwk = _json_arg(args.holder_jwk, "--holder-jwk")
    if not isinstance(jwk, dict):
        raise CliError("--holder-jwk: a JWK object")
    caps = [cap_to_proto(_json_arg(c, "--cap")) for c in args.cap]
    request = pb.DelegateRequest(
        sub=args.sub, caps=caps, ttl_seconds=args.ttl, aud=args.aud or [], dpt=args.dpt,
        idempotency_key=args.idempotency_key or str(uuid.uuid4()), kid=args.kid or "",
        holder_jwk=pb.Jwk(kty=jwk.get("kty", ""), crv=jwk.get("crv", ""), x=jwk.get("x", ""),
                          y=jwk.get("y", "")),
    )
    if args.use is not None:
        request.use = args.use
    with _channel(args) as channel:
        reply = _rpc(lambda: pb_grpc.SignerStub(channel).Delegate(request, timeout=args.timeout))
    _write(args.out, reply.chain + "\n")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        reply = _rpc(lambda: pb_grpc.SignerStub(channel).Revoke(
            pb.RevokeRequest(jti=args.jti, reason=args.reason), timeout=args.timeout))
    print(f"revoked; revocation list seq {reply.revocation_list.seq}")
    return 0


def cmd_revocations_fetch(args: argparse.Namespace) -> int:
    with _channel(args) as channel:
        reply = _rpc(lambda: pb_grpc.SignerStub(channel).GetRevocationList(
            pb.GetRevocationListRequest(), timeout=args.timeout))
    _write(args.out, reply.token + "\n")
    return 0


def _write(out: str | None, text: str) -> None:
    if out:
        Path(out).write_text(text)
    else:
        sys.stdout.write(text)


# --- holder tools: offline, no daemon and no HSM ------------------------------------

# Shown in place of characters that could rewrite a terminal: C0/C1 controls and
# the bidirectional overrides. Chains are untrusted input until verified.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
UNVERIFIED_BANNER = ("UNVERIFIED: decoded only. No signature, trust bundle, chaining, time or "
                     "revocation check was made; use `mandate verify` to trust it.")


def _safe(text: str) -> str:
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _read_arg(value: str, what: str) -> str:
    """A value given inline, as ``@file``, or as ``-`` for standard input."""
    if value == "-":
        return sys.stdin.read()
    if value.startswith("@"):
        return _read_file(value[1:], what)
    return value


def _read_file(path: str, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CliError(f"{what}: {path} is not UTF-8 text") from None


def _chain_arg(value: str) -> str:
    chain = _read_arg(value, "chain").strip()
    if not chain:
        raise CliError("chain: empty")
    return chain


def _load_holder(path: str) -> Holder:
    """A holder's private JWK, as ``mandate keygen`` writes it."""
    try:
        jwk = json.loads(_read_file(path, "--key"))
    except json.JSONDecodeError as exc:
        raise CliError(f"--key {path}: not JSON: {exc}") from None
    if not isinstance(jwk, dict):
        raise CliError(f"--key {path}: not a JWK object")
    if "d" not in jwk:
        raise CliError(f"--key {path}: a public JWK; this needs the private key "
                       "(as written by mandate keygen -o)")
    try:
        return Holder.from_jwk(jwk)
    except ValueError as exc:
        raise CliError(f"--key {path}: not a usable private JWK: {exc}") from None


def _public_jwk_arg(value: str, what: str) -> dict[str, Any]:
    jwk = _json_arg(value, what)
    if not isinstance(jwk, dict):
        raise CliError(f"{what}: a JWK object")
    if "d" in jwk:
        # Never put a private key into a link, where every verifier would read it.
        raise CliError(f"{what}: holds a private key ('d'); pass the public JWK")
    try:
        public_key_from_jwk(jwk)
    except ValueError as exc:
        raise CliError(f"{what}: {exc}") from None
    return jwk


def _request_args(args: argparse.Namespace) -> Request:
    ctx = {} if args.ctx is None else _json_arg(args.ctx, "--ctx")
    if not isinstance(ctx, dict):
        raise CliError("--ctx: a JSON object of attribute values")
    try:
        return Request(args.res, args.act, ctx)
    except ValueError as exc:
        raise CliError(f"request: {exc}") from None


def _time_arg(text: str) -> float:
    """``--now``: Unix seconds, or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither Unix seconds nor an ISO 8601 time") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _iso(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):  # far outside the calendar
        return str(t)


def _duration(seconds: float) -> str:
    """E.g. ``2m 30s``, ``3d 4h``: the two largest units."""
    rest = int(abs(seconds))
    parts = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts[:2]) or "0s"


def _time_left(nbf: int, exp: int, now: float) -> tuple[str, str]:
    """(status, words): where ``now`` falls in the window [nbf, exp)."""
    if now < nbf:
        return "not_yet_valid", f"not valid yet: starts in {_duration(nbf - now)}"
    if now >= exp:
        return "expired", f"expired {_duration(now - exp)} ago"
    return "valid", f"{_duration(exp - now)} left"


def _verification_line(exc: VerificationError) -> str:
    where = "" if exc.link is None else f" (link {exc.link})"
    return _safe(f"{exc.code}{where}: {exc.message}")


def cmd_keygen(args: argparse.Namespace) -> int:
    outs = [args.out] + ([args.public_out] if args.public_out else [])
    if len(set(outs)) != len(outs):
        raise CliError("-o and --public-out name the same file")
    for path in outs:
        if os.path.lexists(path):
            raise CliError(f"{path} already exists; refusing to overwrite it")
    holder = Holder.generate(args.alg)
    public = json.dumps(holder.public_jwk, sort_keys=True)
    _create(args.out, json.dumps(holder.private_jwk(), sort_keys=True) + "\n", 0o600)
    if args.public_out:
        _create(args.public_out, public + "\n", 0o644)
    print(f"wrote the {holder.alg} private key to {args.out} (mode 0600)")
    print(f"public JWK: {public}")
    print(f"thumbprint: {holder.thumbprint}")
    return 0


def _create(path: str, text: str, mode: int) -> None:
    """Write a new file with exactly ``mode``; never replace one (or follow a link)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CliError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise CliError(f"cannot create {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        os.fchmod(out.fileno(), mode)  # the umask may have narrowed it further
        out.write(text)


def _describe_links(chain: str, now: float) -> list[dict[str, Any]]:
    """Each link's header and payload with what a reader wants computed."""
    tokens = chain.split("~")
    decoded = decode_unverified(chain)  # shape checks: malformed → VerificationError
    links: list[dict[str, Any]] = []
    for index, ((header, payload), token) in enumerate(zip(decoded, tokens, strict=True)):
        holder_key = public_key_from_jwk(payload["cnf"]["jwk"])
        status, left = _time_left(payload["nbf"], payload["exp"], now)
        problems = []
        if index:
            parent = links[-1]
            if payload["iss"] != parent["payload"]["sub"]:
                problems.append(f"iss is not link {index - 1}'s sub")
            if header["kid"] != parent["computed"]["holder_thumbprint"]:
                problems.append(f"kid is not link {index - 1}'s holder key")
            if payload["prv"] != parent["computed"]["hash"]:
                problems.append(f"prv is not the hash of link {index - 1}")
        links.append({
            "header": header,
            "payload": payload,
            "computed": {
                "index": index,
                "hash": sha256_b64(token.encode("ascii")),
                "holder_thumbprint": holder_key.thumbprint,
                "holder_alg": holder_key.alg,
                "caps": [Capability.parse(c).describe() for c in payload["cap"]],
                "iat_iso": _iso(payload["iat"]),
                "nbf_iso": _iso(payload["nbf"]),
                "exp_iso": _iso(payload["exp"]),
                "status": status,
                "time_left": left,
                "seconds_left": int(payload["exp"] - now),
                "chain_problems": problems,
            },
        })
    return links


def _tree(links: list[dict[str, Any]]) -> list[str]:
    """Root first; each link drawn under the one that delegated to it."""
    lines = []
    last = len(links) - 1
    for i, link in enumerate(links):
        h, p, c = link["header"], link["payload"], link["computed"]
        head = "" if i == 0 else "   " * (i - 1) + "└─ "
        role = "root" if i == 0 else ("leaf" if i == last else "")
        lines.append(f"{head}link {i}  {p['iss']} → {p['sub']}" + (f"  ({role})" if role else ""))
        pad = "   " * i + ("│  " if i < last else "   ")
        if i == 0:
            signer = f"{h['kid']} (trust bundle key, {h['alg']})"
        else:
            signer = f"{h['kid']} ({h['alg']}, link {i - 1}'s holder)"
        rows = [("kid", signer),
                ("holder", f"{c['holder_thumbprint']} ({c['holder_alg']})"),
                ("jti", p["jti"])]
        rows += [("caps" if n == 0 else "", cap) for n, cap in enumerate(c["caps"])]
        rows += [("aud", ", ".join(p["aud"]) if "aud" in p else "any"),
                 ("use", str(p["use"]) if "use" in p else "unlimited"),
                 ("window", f"{c['nbf_iso']} .. {c['exp_iso']} ({c['time_left']})"),
                 ("dpt", f"{p['dpt']}" + (" (may delegate no further)" if p["dpt"] == 0 else
                                          f" (may delegate {p['dpt']} more link(s))"))]
        if c["chain_problems"]:
            rows.append(("BROKEN", "; ".join(c["chain_problems"])))
        lines += [f"{pad}{name:<7} {value}" for name, value in rows]
    return [_safe(line) for line in lines]


def cmd_inspect(args: argparse.Namespace) -> int:
    now = time.time() if args.now is None else args.now
    links = _describe_links(_chain_arg(args.chain), now)
    if args.json:
        print(json.dumps({"verified": False, "now": int(now), "links": links}, indent=2,
                         ensure_ascii=True))
        return 0
    print(UNVERIFIED_BANNER)
    print("\n".join(_tree(links)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    try:
        bundle = TrustBundle.from_jwks(_read_file(args.bundle, "--bundle"))
    except ValueError as exc:
        raise CliError(f"--bundle {args.bundle}: {exc}") from None
    if args.chain == "-" and args.pop == "-":
        raise CliError("only one of the chain and --pop can be read from standard input")
    request = _request_args(args)
    pop = _read_arg(args.pop, "--pop").strip()
    chain = _chain_arg(args.chain)
    revocations = _read_file(args.revocations, "--revocations").strip() if args.revocations \
        else None
    clock: Callable[[], float] = time.time
    if args.now is not None:
        fixed: float = args.now
        clock = lambda: fixed  # noqa: E731 - the verifier's injectable clock
    try:
        verifier = Verifier(bundle, audience=args.aud, clock=clock)
    except ValueError as exc:
        raise CliError(f"--aud: {exc}") from None
    try:
        if revocations is not None:
            verifier.update_revocations(revocations)
        decision = verifier.verify(chain, request, pop=pop)
    except VerificationError as exc:
        print("refused")
        print(f"  code     {exc.code}")
        print(f"  link     {'-' if exc.link is None else exc.link}")
        print(f"  message  {_safe(exc.message)}")
        return EXIT_FAILED
    _print_decision(decision, clock())
    return 0


def _print_decision(decision: Decision, now: float) -> None:
    _, left = _time_left(int(now), decision.expires_at, now)
    lines = [
        f"allowed: {decision.request.act} on {decision.request.res} for {decision.subject}",
        f"  principals  {' → '.join(decision.principals)}",
        f"  subject     {decision.subject}",
        f"  jtis        {', '.join(decision.jtis)}",
        f"  kid         {decision.kid}",
        f"  expires_at  {decision.expires_at} ({_iso(decision.expires_at)}, {left})",
    ]
    print("\n".join(_safe(line) for line in lines))


def cmd_attenuate(args: argparse.Namespace) -> int:
    holder = _load_holder(args.key)
    chain = _chain_arg(args.chain)
    next_jwk = _public_jwk_arg(args.holder_jwk, "--holder-jwk")
    caps = [_json_arg(c, "--cap") for c in args.cap]
    for cap in caps:
        try:
            Capability.parse(cap)
        except ValueError as exc:
            raise CliError(f"--cap: {exc}") from None
    try:
        new_chain = holder.attenuate(chain, sub=args.sub, holder_jwk=next_jwk, cap=caps,
                                     ttl=args.ttl, dpt=args.dpt, aud=args.aud, use=args.use)
    except ValueError as exc:
        raise CliError(f"attenuate: {exc}") from None
    _write(args.out, new_chain + "\n")
    return 0


def cmd_prove(args: argparse.Namespace) -> int:
    holder = _load_holder(args.key)
    request = _request_args(args)
    chain = _chain_arg(args.chain)
    try:
        pop = holder.prove(chain, request, aud=args.aud)
    except ValueError as exc:
        raise CliError(f"prove: {exc}") from None
    _write(args.out, pop + "\n")
    return 0


# --- argument parsing -----------------------------------------------------------------

def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default="127.0.0.1:7443", help="host:port of the daemon")
    p.add_argument("--ca", help="CA bundle that signed the daemon's certificate")
    p.add_argument("--cert", help="this client's certificate (PEM)")
    p.add_argument("--key", help="this client's private key (PEM)")
    p.add_argument("--server-name", help="expected name in the daemon's certificate")
    p.add_argument("--plaintext", action="store_true", help="no TLS (loopback development)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mandate", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help_text: str,
                parent: Any = sub) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_text,
                                                       description=help_text)
        p.set_defaults(func=func)
        return p

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", required=True, help="the daemon's config file")
        return p

    with_config(command("serve", cmd_serve, "run the signer daemon"))

    hsm = command("hsm", lambda a: EXIT_USAGE, "HSM token set-up").add_subparsers(
        dest="hsm_command", required=True)
    init = command("init", cmd_hsm_init, "initialise a SoftHSM2 token in a directory", hsm)
    init.add_argument("--dir", required=True)
    init.add_argument("--label", default="mandate")
    init.add_argument("--so-pin-env", default="MANDATE_HSM_SO_PIN")
    init.add_argument("--pin-env", default="MANDATE_HSM_PIN")

    keys = command("keys", lambda a: EXIT_USAGE, "root keys in the HSM").add_subparsers(
        dest="keys_command", required=True)
    gen = with_config(command("generate", cmd_keys_generate, "generate a root key", keys))
    gen.add_argument("--kid", required=True)
    gen.add_argument("--alg", default="EdDSA", choices=["EdDSA", "ES256"])
    with_config(command("list", cmd_keys_list, "list root keys (* = active)", keys))
    rot = with_config(command("rotate", cmd_keys_rotate, "start a new root key", keys))
    rot.add_argument("--new-kid", required=True)
    rot.add_argument("--alg", default="EdDSA", choices=["EdDSA", "ES256"])
    rot.add_argument("--not-before", type=int, help="Unix time the new key starts (default now)")
    exp = with_config(command("export-bundle", cmd_keys_export_bundle,
                              "write the trust bundle (JWKS)", keys))
    exp.add_argument("--out", "-o", help="file (default: stdout)")

    dlg = command("delegate", cmd_delegate, "ask the daemon for a root link")
    _client_options(dlg)
    dlg.add_argument("--sub", required=True)
    dlg.add_argument("--holder-jwk", required=True, help="public JWK as JSON, or @file")
    dlg.add_argument("--cap", action="append", required=True,
                     help="a capability as JSON, or @file; repeat for more")
    dlg.add_argument("--ttl", type=int, required=True, help="seconds")
    dlg.add_argument("--aud", action="append")
    dlg.add_argument("--dpt", type=int, default=0)
    dlg.add_argument("--use", type=int)
    dlg.add_argument("--kid")
    dlg.add_argument("--idempotency-key")
    dlg.add_argument("--out", "-o")

    rev = command("revoke", cmd_revoke, "revoke links by jti")
    _client_options(rev)
    rev.add_argument("jti", nargs="+")
    rev.add_argument("--reason", default="")

    rl = command("revocations", lambda a: EXIT_USAGE, "revocation lists").add_subparsers(
        dest="rl_command", required=True)
    fetch = command("fetch", cmd_revocations_fetch, "fetch the signed revocation list", rl)
    _client_options(fetch)
    fetch.add_argument("--out", "-o")

    db = command("db", lambda a: EXIT_USAGE, "the state and audit database").add_subparsers(
        dest="db_command", required=True)
    with_config(command("migrate", cmd_db_migrate,
                        "create or upgrade the schema [state] names (idempotent)", db))

    audit = command("audit", lambda a: EXIT_USAGE, "the audit log").add_subparsers(
        dest="audit_command", required=True)

    def log_options(p: argparse.ArgumentParser) -> None:
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--log", help="audit.db, or a postgresql:// URL (password from "
                                         "PGPASSWORD or .pgpass)")
        where.add_argument("--config", "-c", help="the daemon's config file: the log its "
                                                  "[state] names")

    ver = command("verify", cmd_audit_verify, "check the log against its checkpoints", audit)
    log_options(ver)
    ver.add_argument("--bundle", required=True, help="trust bundle (JWKS) file")
    show = command("show", cmd_audit_show, "list audit records as JSON lines", audit)
    log_options(show)
    show.add_argument("--caller")
    show.add_argument("--sub")
    show.add_argument("--jti")
    show.add_argument("--limit", type=int)

    _offline_commands(command)
    return parser


def _offline_commands(command: Callable[..., argparse.ArgumentParser]) -> None:
    """keygen, inspect, verify, attenuate, prove: a holder's or a service's tools."""
    chain_help = "the chain: inline, @file, or - for standard input"
    now_help = "the time to judge by: Unix seconds or ISO 8601 (default: now)"

    def request_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--aud", required=True, help="the service (audience) the call is for")
        p.add_argument("--res", required=True, help="the resource, e.g. api/orders/o-123")
        p.add_argument("--act", required=True, help="the action, e.g. select")
        p.add_argument("--ctx", help="the request's attributes as a JSON object, or @file")

    kg = command("keygen", cmd_keygen, "make a holder key pair (private JWK, mode 0600)")
    kg.add_argument("--alg", default="EdDSA", choices=list(ALGORITHMS))
    kg.add_argument("--out", "-o", required=True, help="new file for the private JWK")
    kg.add_argument("--public-out", help="new file for the public JWK")

    ins = command("inspect", cmd_inspect,
                  "draw a chain as a tree, root first (decoded only: nothing is verified)")
    ins.add_argument("chain", help=chain_help)
    ins.add_argument("--json", action="store_true", help="a JSON document for scripts")
    ins.add_argument("--now", type=_time_arg, help=now_help)

    ver = command("verify", cmd_verify,
                  "verify a chain and its PoP for one request, offline (exit 0 allowed, "
                  "1 refused)")
    ver.add_argument("chain", help=chain_help)
    ver.add_argument("--bundle", required=True, help="trust bundle (JWKS) file")
    request_options(ver)
    ver.add_argument("--pop", required=True, help="the proof of possession, or @file")
    ver.add_argument("--revocations", help="signed revocation list file")
    ver.add_argument("--now", type=_time_arg, help=now_help)

    att = command("attenuate", cmd_attenuate,
                  "append a narrower link for the next holder (signed with your key)")
    att.add_argument("chain", help=chain_help)
    att.add_argument("--key", required=True, help="your private JWK file (the chain's leaf key)")
    att.add_argument("--sub", required=True, help="the next holder's principal")
    att.add_argument("--holder-jwk", required=True,
                     help="the next holder's public JWK as JSON, or @file")
    att.add_argument("--cap", action="append", required=True,
                     help="a capability as JSON, or @file; repeat for more")
    att.add_argument("--ttl", type=int, required=True, help="seconds (capped by the parent's exp)")
    att.add_argument("--dpt", type=int, default=0, help="links the next holder may add")
    att.add_argument("--aud", action="append", help="an allowed audience; repeat for more")
    att.add_argument("--use", type=int, help="how many uses the link allows")
    att.add_argument("--out", "-o", help="file (default: stdout)")

    prv = command("prove", cmd_prove, "make a proof of possession for one request")
    prv.add_argument("chain", help=chain_help)
    prv.add_argument("--key", required=True, help="your private JWK file (the chain's leaf key)")
    request_options(prv)
    prv.add_argument("--out", "-o", help="file (default: stdout)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result: int = args.func(args)
        return result
    except (CliError, SignerError, VerificationError, ValueError, OSError) as exc:
        if args.debug:
            raise
        text = exc.message if isinstance(exc, SignerError) else str(exc)
        if isinstance(exc, VerificationError):
            text = _verification_line(exc)
        if isinstance(exc, ConfigError) and not text.startswith("config"):
            text = f"configuration: {text}"
        print(f"mandate: {text}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
