"""``mandate``: run the signer daemon, provision keys, delegate, revoke, audit.

Errors are one line on stderr and a non-zero exit; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

import softhsm
from verifier_sdk import TrustBundle, VerificationError

from ._audit import read_records, verify_log
from ._config import Config, load_config
from ._errors import ConfigError, SignerError
from ._proto.mandate.v1 import signer_pb2 as pb
from ._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
from ._server import Daemon

EXIT_USAGE = 2
EXIT_FAILED = 1


class CliError(Exception):
    """A user-facing failure: printed as one line."""


# --- server side ------------------------------------------------------------------

def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    daemon = Daemon(_config(args))
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
def _offline_daemon(args: argparse.Namespace) -> Iterator[Daemon]:
    """The daemon's parts without the server: for provisioning commands."""
    daemon = Daemon(_config(args))
    try:
        yield daemon
    finally:
        daemon.stop()


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


def cmd_audit_verify(args: argparse.Namespace) -> int:
    bundle = TrustBundle.from_jwks(Path(args.bundle).read_text())
    report = verify_log(Path(args.log), bundle)
    if report.ok:
        print(f"ok: {report.message}")
        return 0
    print(f"FAILED at seq {report.first_bad_seq} ({report.problem}): {report.message}")
    return EXIT_FAILED


def cmd_audit_show(args: argparse.Namespace) -> int:
    records = read_records(Path(args.log), caller=args.caller, jti=args.jti, sub=args.sub,
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
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
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

    audit = command("audit", lambda a: EXIT_USAGE, "the audit log").add_subparsers(
        dest="audit_command", required=True)
    ver = command("verify", cmd_audit_verify, "check the log against its checkpoints", audit)
    ver.add_argument("--log", required=True, help="audit.db")
    ver.add_argument("--bundle", required=True, help="trust bundle (JWKS) file")
    show = command("show", cmd_audit_show, "list audit records as JSON lines", audit)
    show.add_argument("--log", required=True)
    show.add_argument("--caller")
    show.add_argument("--sub")
    show.add_argument("--jti")
    show.add_argument("--limit", type=int)
    return parser


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
        if isinstance(exc, ConfigError) and not text.startswith("config"):
            text = f"configuration: {text}"
        print(f"mandate: {text}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
