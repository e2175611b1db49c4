from helpers import AUD, REFUND, World


def test_three_link_chain_verifies(world: World) -> None:
    chain = world.chain3()
    decision = world.verifier().verify(chain, REFUND, pop=world.prove(world.c, chain, REFUND))
    assert decision.subject == "agent:helper"
    assert decision.principals[0] == "spiffe://acme.example/orchestrator"
    assert len(decision.jtis) == 3
    assert decision.kid == "root-1"
    assert AUD
