"""Two signer replicas on one SoftHSM2 token and one PostgreSQL database:
concurrent Delegate and Revoke against both leave one audit log that
verifies, with exactly one record per call; a revocation made on one
replica is enforced by a verifier that polls the other; a retried Delegate
gets the same link from either replica."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import AUD, HSM_PIN_ENV, run_together, write_signer_config
from hsm_fixtures import SoftHsm
from postgres_server import PostgresCluster, postgres  # noqa: F401 - the session's server

from signer import cli
from signer._audit import read_records, verify_log
from signer._config import load_config
from signer._pg import PgAuditStore, PgDatabase, migrate
from signer._proto.mandate.v1 import signer_pb2 as pb
from signer._proto.mandate.v1 import signer_pb2_grpc as pb_grpc
from signer._server import Daemon
from signer.cli import cap_to_proto
from verifier_sdk import Holder, Request, TrustBundle, VerificationError, Verifier

TOKEN = "mandate-replicas"
PASSWORD_ENV = "MANDATE_TEST_PG_PASSWORD"
CALLER = "local:insecure"  # every caller's identity on a plaintext loopback listener
RPC_TIMEOUT_S = 20
POLICY = f"""
[[grant]]
caller = "{CALLER}"
subjects = ["agent:fleet/*"]
caps = [{{ res = "api/orders/*", act = ["read"] }}]
max_ttl = 600
max_dpt = 1
audiences = ["{AUD}"]
"""
CAP = {"res": "api/orders/o-1", "act": ["read"]}
READ = Request("api/orders/o-1", "read", {})


@dataclass
class Fleet:
    replicas: tuple[Daemon, Daemon]
    db: PgDatabase
    config_paths: tuple[Path, Path]
    channels: list[grpc.Channel]

    def stub(self, i: int) -> pb_grpc.SignerStub:
        channel = grpc.insecure_channel(f"127.0.0.1:{self.replicas[i].port}")
        self.channels.append(channel)
        return pb_grpc.SignerStub(channel)

    def jwks(self) -> str:
        reply = self.stub(0).GetTrustBundle(pb.GetTrustBundleRequest(), timeout=RPC_TIMEOUT_S)
        return str(reply.jwks)

    def bundle(self) -> TrustBundle:
        return TrustBundle.from_jwks(self.jwks())

    def stop(self) -> None:
        for channel in self.channels:
            channel.close()
        for daemon in self.replicas:
            daemon.stop(grace=1)


def delegate_request(holder: Holder, key: str | None = None, **changes: Any
                     ) -> pb.DelegateRequest:
    jwk = holder.public_jwk
    fields: dict[str, Any] = {
        "sub": "agent:fleet/worker", "caps": [cap_to_proto(CAP)], "ttl_seconds": 300,
        "aud": [AUD], "idempotency_key": key or str(uuid.uuid4()),
        "holder_jwk": pb.Jwk(kty=jwk["kty"], crv=jwk["crv"], x=jwk["x"], y=jwk.get("y", "")),
    }
    fields.update(changes)
    return pb.DelegateRequest(**fields)


@pytest.fixture
def fleet(hsm: SoftHsm, request: pytest.FixtureRequest, tmp_path: Path,
          monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    url = cluster.create_database()
    db = PgDatabase(url, password=cluster.password)
    migrate(db)
    monkeypatch.setenv(PASSWORD_ENV, cluster.password)
    monkeypatch.setenv(HSM_PIN_ENV, hsm.user_pin)
    paths = []
    for name in ("a", "b"):
        directory = tmp_path / name
        directory.mkdir()
        paths.append(write_signer_config(
            directory, hsm_module=hsm.module, token=TOKEN, policy=POLICY,
            server={"plaintext_loopback": True, "issuance": "inline"},
            state={"url": url, "password_env": PASSWORD_ENV}, audit={"checkpoint_every": 10},
            issuer="mandate-fleet-test"))
    first = Daemon(load_config(paths[0]))
    first.issuer.add_key(f"root-{uuid.uuid4().hex[:12]}", "EdDSA")
    first.start()
    try:
        # The second replica finds the key in the shared keyring, and in the token.
        second = Daemon(load_config(paths[1]))
        second.start()
    except BaseException:
        first.stop(grace=1)
        raise
    running = Fleet((first, second), db, (paths[0], paths[1]), [])
    try:
        yield running
    finally:
        running.stop()


def test_concurrent_calls_on_two_replicas_leave_one_log_with_a_record_per_call(
        fleet: Fleet, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    threads, per_thread, revoke_every = 4, 9, 3
    stubs = [fleet.stub(i % 2) for i in range(threads)]
    others = [fleet.stub((i + 1) % 2) for i in range(threads)]
    issued: list[list[str]] = [[] for _ in range(threads)]
    revoked: list[list[str]] = [[] for _ in range(threads)]  # every Revoke call made
    published: list[int] = []  # seqs of the lists the Revoke calls got
    lock = threading.Lock()
    holders = [Holder.generate() for _ in range(threads)]

    def work(i: int) -> None:
        for n in range(1, per_thread + 1):
            reply = stubs[i].Delegate(delegate_request(holders[i]), timeout=RPC_TIMEOUT_S)
            issued[i].append(reply.jti)
            if n % revoke_every == 0:
                # Revoke on the other replica the link this one just issued: the
                # replicas take turns on the list (a lock in the shared store), so
                # every call succeeds with a list of its own.
                revoked[i].append(reply.jti)
                answer = others[i].Revoke(pb.RevokeRequest(jti=[reply.jti]),
                                          timeout=RPC_TIMEOUT_S)
                with lock:
                    published.append(answer.revocation_list.seq)

    errors, running = run_together(work, threads, join_s=180)
    assert not running
    assert not errors, errors
    delegated = [jti for jtis in issued for jti in jtis]
    revoke_calls = [jti for jtis in revoked for jti in jtis]
    assert len(set(delegated)) == threads * per_thread
    assert len(published) == len(revoke_calls)
    assert len(set(published)) == len(published)  # no two lists share a seq

    # One more revocation, on the first replica: its list holds every revocation
    # made so far, whichever replica took it and whether or not its call's own
    # list was the one stored; both replicas now serve that list.
    last = fleet.stub(1).Delegate(delegate_request(Holder.generate()), timeout=RPC_TIMEOUT_S)
    final = fleet.stub(0).Revoke(pb.RevokeRequest(jti=[last.jti]), timeout=RPC_TIMEOUT_S)
    assert final.revocation_list.seq > max(published, default=-1)
    jwks = fleet.jwks()
    verifier = Verifier(TrustBundle.from_jwks(jwks), audience=AUD)
    for i in (0, 1):
        served = fleet.stub(i).GetRevocationList(pb.GetRevocationListRequest(),
                                                 timeout=RPC_TIMEOUT_S)
        assert (served.seq, served.token) == (final.revocation_list.seq,
                                              final.revocation_list.token)
    verifier.update_revocations(final.revocation_list.token)
    assert verifier.revocation_seq == final.revocation_list.seq
    for chain_jti in [*revoke_calls, last.jti]:
        assert fleet.replicas[1].state.issued(chain_jti) is not None
    assert set(fleet.replicas[0].state.revoked_jtis(live_after=0)) == {*revoke_calls, last.jti}

    fleet.stop()
    store = PgAuditStore(fleet.db)
    records = read_records(store)
    assert sorted(r.jti for r in records if r.event == "delegate") == \
        sorted([*delegated, last.jti])
    assert sorted(r.jti for r in records if r.event == "revoke") == \
        sorted([*revoke_calls, last.jti])
    events = [r.event for r in records]
    assert (events.count("key"), events.count("start"), events.count("stop")) == (1, 2, 2)
    assert len(records) == len(delegated) + 1 + len(revoke_calls) + 1 + 5
    report = verify_log(store, TrustBundle.from_jwks(jwks))
    assert report.ok, report.message
    assert (report.records_checked, report.unsigned_tail) == (len(records), 0)
    # The operator's command says the same, reading the log the config names.
    bundle_file = tmp_path / "bundle.json"
    bundle_file.write_text(jwks)
    capsys.readouterr()
    assert cli.main(["audit", "verify", "--config", str(fleet.config_paths[1]),
                     "--bundle", str(bundle_file)]) == 0
    assert f"ok: {len(records)} records" in capsys.readouterr().out


def test_a_revocation_on_one_replica_is_enforced_by_a_verifier_polling_the_other(
        fleet: Fleet) -> None:
    holder = Holder.generate()
    reply = fleet.stub(1).Delegate(delegate_request(holder), timeout=RPC_TIMEOUT_S)
    verifier = Verifier(fleet.bundle(), audience=AUD, require_revocations=True)
    seqs = []

    def poll_b() -> None:
        served = fleet.stub(1).GetRevocationList(pb.GetRevocationListRequest(),
                                                 timeout=RPC_TIMEOUT_S)
        verifier.update_revocations(served.token)
        seqs.append(served.seq)

    poll_b()
    verifier.verify(reply.chain, READ, pop=holder.prove(reply.chain, READ, aud=AUD))
    # Revocations alternate between the replicas; each list's seq is above the last.
    spare = [fleet.stub(i % 2).Delegate(delegate_request(Holder.generate()),
                                        timeout=RPC_TIMEOUT_S).jti for i in range(3)]
    for i, jti in enumerate(spare):
        answer = fleet.stub(i % 2).Revoke(pb.RevokeRequest(jti=[jti]), timeout=RPC_TIMEOUT_S)
        seqs.append(answer.revocation_list.seq)
    revoked = fleet.stub(0).Revoke(pb.RevokeRequest(jti=[reply.jti], reason="left the fleet"),
                                   timeout=RPC_TIMEOUT_S)
    seqs.append(revoked.revocation_list.seq)
    poll_b()
    published = seqs[:-1]
    assert published == sorted(set(published))  # strictly rising, across both replicas
    assert seqs[-1] == seqs[-2]  # B serves the list A just published
    with pytest.raises(VerificationError) as err:
        verifier.verify(reply.chain, READ, pop=holder.prove(reply.chain, READ, aud=AUD))
    assert (err.value.code, err.value.link) == ("revoked", 0)


def test_a_retried_delegate_gets_the_same_link_from_the_other_replica(fleet: Fleet) -> None:
    holder = Holder.generate()
    request = delegate_request(holder, key=f"retry-{uuid.uuid4()}")
    first = fleet.stub(0).Delegate(request, timeout=RPC_TIMEOUT_S)
    again = fleet.stub(1).Delegate(request, timeout=RPC_TIMEOUT_S)
    assert not first.idempotent_replay
    assert again.idempotent_replay
    assert (again.chain, again.jti) == (first.chain, first.jti)
    # The same key for another request is refused on either replica.
    with pytest.raises(grpc.RpcError) as err:
        fleet.stub(1).Delegate(delegate_request(holder, key=request.idempotency_key,
                                                ttl_seconds=60), timeout=RPC_TIMEOUT_S)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    records = read_records(PgAuditStore(fleet.db), event="delegate")
    assert [r.jti for r in records] == [first.jti]

