"""IPsec's plan without a kernel: the cluster secret's format, keys per node pair, direction
and SPI, the states and policies a node gets (every key's states both ways, the out policy
naming the SPI it sends with), SPIs that cannot collide, and no key material in an error.
The kernel runs it under qemu (tests/test_ipsec_vm.py)."""

from __future__ import annotations

import pytest

from mesh.encryption import ipsec

A = ipsec.Node("node-a", "172.30.0.11", ("10.244.0.0/24",))
B = ipsec.Node("node-b", "172.30.0.12", ("10.244.1.0/24",))
C = ipsec.Node("node-c", "172.30.0.13", ("10.244.2.0/24", "fd00:10:244:2::/64"))


def test_the_secret_takes_ciliums_format_and_refuses_what_is_not_a_key() -> None:
    keys = ipsec.parse_keys(f"3 rfc4106(gcm(aes)) {'ab' * 20} 128\n# a comment\n\n"
                            f"4 0x{'cd' * 20}\n")
    assert [(k.spi, k.secret) for k in keys] == [(3, bytes.fromhex("ab" * 20)),
                                                 (4, bytes.fromhex("cd" * 20))]
    for text, why in (("", "no key"), ("0 " + "ab" * 20, "not within 1-255"),
                      ("1 abcd", "at least 16"), ("x " + "ab" * 20, "not a number"),
                      (f"1 {'ab' * 20}\n1 {'cd' * 20}", "given twice"),
                      ("1 cbc(aes) key 128", "not `SPI")):
        with pytest.raises(ipsec.IpsecError, match=why):
            ipsec.parse_keys(text)


def test_each_pair_direction_and_spi_gets_its_own_key() -> None:
    k1, k2 = ipsec.parse_keys(f"1 {'11' * 20}\n2 {'11' * 20}")
    derived = {ipsec.derive(k, s, r) for k in (k1, k2) for s, r in (("a", "b"), ("b", "a"),
                                                                     ("a", "c"))}
    assert len(derived) == 6 and all(len(d) == ipsec.KEY_BYTES for d in derived)
    assert ipsec.derive(k1, "a", "b") == ipsec.derive(k1, "a", "b")  # every node agrees


def test_a_node_plans_every_keys_states_and_sends_with_one_spi() -> None:
    keys = ipsec.parse_keys(f"1 {'11' * 20}\n2 {'22' * 20}")
    plan = ipsec.plan(A, [C, B], keys, send=2)
    pairs = {(s.src, s.dst, s.spi >> 24) for s in plan.states}
    assert pairs == {(A.address, p.address, k) for p in (B, C) for k in (1, 2)} | \
        {(p.address, A.address, k) for p in (B, C) for k in (1, 2)}
    # what A sends to B is what B receives from A: the same SPI and key on both sides
    b_plan = ipsec.plan(B, [A], keys, send=2)
    a_out = {(s.spi, s.key) for s in plan.states if s.src == A.address and s.dst == B.address}
    b_in = {(s.spi, s.key) for s in b_plan.states if s.src == A.address and s.dst == B.address}
    assert a_out == b_in
    outs = [p for p in plan.policies if p.direction == "out"]
    assert {(p.src, p.dst) for p in outs} == {("10.244.0.0/24", "10.244.1.0/24"),
                                              ("10.244.0.0/24", "10.244.2.0/24")}
    assert {p.spi for p in outs} == {ipsec.wire_spi(2, "node-a")}
    assert all(p.spi is None for p in plan.policies if p.direction in ("in", "fwd"))
    assert {p.direction for p in plan.policies} == {"out", "in", "fwd"}
    with pytest.raises(ipsec.IpsecError, match="not among the keys"):
        ipsec.plan(A, [B], keys, send=3)


def test_spis_are_unique_per_sender_and_the_key_never_shows() -> None:
    assert ipsec.wire_spi(1, "node-a") != ipsec.wire_spi(1, "node-b")
    assert ipsec.wire_spi(1, "node-a") >> 24 == 1 and ipsec.wire_spi(1, "node-a") > 255
    state = ipsec.plan(A, [B], ipsec.parse_keys(f"1 {'11' * 20}"), 1).states[0]
    args = state.args()
    assert "flag" in args and "esn" in args and "rfc4106(gcm(aes))" in args
    secret = "0x" + state.key.hex()
    assert secret in args
    try:
        ipsec._ip(["state", "add", "src", "bad", "dst", "x", secret])
    except ipsec.IpsecError as e:
        assert secret not in str(e)
    else:
        pytest.fail("ip xfrm took a bad state")


def test_a_node_sends_to_each_peer_with_the_newest_key_that_peer_announced() -> None:
    # the secret's order says which key is newer: SPIs wrap from 255 to 1
    keys = ipsec.parse_keys(f"255 {'11' * 20}\n1 {'22' * 20}")
    assert [k.spi for k in keys] == [255, 1]
    assert ipsec.send_spi(keys, [255]) == 255  # the peer has not installed the new one yet
    assert ipsec.send_spi(keys, [255, 1]) == 1
    assert ipsec.send_spi(keys, [7]) is None and ipsec.send_spi(keys, []) is None
    assert ipsec.parse_spis(ipsec.format_spis(keys)) == (255, 1)
    for bad in ("1,x", "0", "256", "1," * 600):
        with pytest.raises(ValueError):
            ipsec.parse_spis(bad)
    plan = ipsec.plan(A, [B, C], keys, {"node-b": 1})
    outs = {(p.dst, p.spi) for p in plan.policies if p.direction == "out"}
    assert outs == {("10.244.1.0/24", ipsec.wire_spi(1, "node-a"))}  # none to C yet
    # C may already send to A (it saw A's announcement): A takes it in, both keys' states
    assert {p.src for p in plan.policies if p.direction == "in"} == {"10.244.1.0/24",
                                                                      "10.244.2.0/24"}
    assert {(s.src, s.spi >> 24) for s in plan.states if s.dst == A.address} == \
        {(n.address, k) for n in (B, C) for k in (255, 1)}
    # inbound templates are optional: a peer still sending in the clear is not cut off
    inbound = next(p for p in plan.policies if p.direction == "in").args()
    assert inbound[-2:] == ["level", "use"] and "spi" not in inbound
