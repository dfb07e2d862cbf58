"""Transparent encryption without a kernel: the node's key file (0600, never shown), the checks
a published key must pass, and Nodes made into WireGuard peers (a malformed, low-order or
copied key refused with a problem naming the node, the others kept). The tunnels run for real
in the lab (tests/test_encryption_lab.py)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from mesh import ir
from mesh.encryption import keys
from mesh.encryption.wireguard import tunnel_mtu
from mesh.store.objects import parse_object
from mesh.store.store import Store
from mesh.translate.encryption import translate_encryption


def test_the_key_file_is_0600_and_the_private_key_is_never_shown(tmp_path: Path) -> None:
    path = tmp_path / keys.KEY_FILE
    pair, made = keys.load_or_create(path)
    assert made and path.stat().st_mode & 0o777 == 0o600
    again, made = keys.load_or_create(path)
    assert not made and again == pair
    secret = base64.b64encode(pair.private).decode()
    assert secret not in repr(pair) and pair.private.hex() not in repr(pair)
    assert pair.public_text in repr(pair)
    path.chmod(0o644)
    with pytest.raises(keys.InvalidKey, match="readable by others"):
        keys.load(path)
    path.chmod(0o600)
    path.write_text("not a key\n")
    with pytest.raises(keys.InvalidKey):
        keys.load(path)


def test_a_published_key_must_be_a_usable_x25519_key() -> None:
    good = keys.generate().public_text
    assert keys.parse_public(good) == base64.b64decode(good)
    for bad, why in (("not base64!", "not base64"),
                     (base64.b64encode(b"x" * 31).decode(), "31 bytes"),
                     (base64.b64encode(bytes(32)).decode(), "low order")):
        with pytest.raises(keys.InvalidKey, match=why):
            keys.parse_public(bad)


def test_the_tunnel_mtu_leaves_room_for_wireguard() -> None:
    assert tunnel_mtu(1500) == 1440 and tunnel_mtu(1500, 6) == 1420
    assert tunnel_mtu(9001) == 8941


def node(name: str, address: str, cidr: str | None, key: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}"}
    if key is not None:
        meta["annotations"] = {keys.ANNOTATION: key}
    return {"apiVersion": "v1", "kind": "Node", "metadata": meta,
            "spec": {"podCIDRs": [cidr]} if cidr else {},
            "status": {"addresses": [{"type": "InternalIP", "address": address},
                                     {"type": "Hostname", "address": name}]}}


def encryption(*nodes: dict[str, Any], me: str = "n1") -> ir.Encryption:
    store = Store()
    store.replace("test", [parse_object(n) for n in nodes])
    return translate_encryption(store.snapshot(), me)


def test_nodes_become_peers_and_bad_keys_are_refused_by_name() -> None:
    k1, k2, k3 = (keys.generate().public_text for _ in range(3))
    found = encryption(
        node("n1", "172.30.0.11", "10.244.0.0/24", k1),
        node("n2", "172.30.0.12", "10.244.1.0/24", k2),
        node("n3", "172.30.0.13", "10.244.2.0/24", "garbage"),
        node("n4", "172.30.0.14", "10.244.3.0/24", None),  # not published yet
        node("n5", "172.30.0.15", None, k3))  # no pod CIDR yet: not a peer
    assert found.peers == (
        ir.EncryptionPeer("n2", "172.30.0.12", ("10.244.1.0/24",), k2),
        ir.EncryptionPeer("n3", "172.30.0.13", ("10.244.2.0/24",), None,
                          f"annotation {keys.ANNOTATION}: not base64; the node gets no "
                          "tunnel"),
        ir.EncryptionPeer("n4", "172.30.0.14", ("10.244.3.0/24",), None))
    assert [(p.node, p.uid) for p in found.problems] == [("n3", "uid-n3")]


def test_a_copied_key_is_refused_for_both_nodes() -> None:
    k1, k2 = keys.generate().public_text, keys.generate().public_text
    found = encryption(node("n1", "172.30.0.11", "10.244.0.0/24", k1),
                       node("n2", "172.30.0.12", "10.244.1.0/24", k2),
                       node("n3", "172.30.0.13", "10.244.2.0/24", k2))
    assert [(p.node, p.public_key) for p in found.peers] == [("n2", None), ("n3", None)]
    assert {p.node: p.message for p in found.problems} == {
        "n2": f"annotation {keys.ANNOTATION}: the same key as node n3's; the node gets no "
              "tunnel",
        "n3": f"annotation {keys.ANNOTATION}: the same key as node n2's; the node gets no "
              "tunnel"}
    # the node's own key copied by another: this node's peers do not include it either
    found = encryption(node("n1", "172.30.0.11", "10.244.0.0/24", k1),
                       node("n2", "172.30.0.12", "10.244.1.0/24", k1))
    assert found.peers[0].public_key is None and "n1" in found.peers[0].problem


def test_nodes_ipsec_announcements_are_read_and_a_bad_one_refused_by_name() -> None:
    from mesh.encryption.ipsec import SPIS_ANNOTATION

    n1 = node("n1", "172.30.0.11", "10.244.0.0/24", None)
    n1["metadata"]["annotations"] = {SPIS_ANNOTATION: "3"}
    n2 = node("n2", "172.30.0.12", "10.244.1.0/24", None)
    n2["metadata"]["annotations"] = {SPIS_ANNOTATION: "3,4"}
    n3 = node("n3", "172.30.0.13", "10.244.2.0/24", None)
    n3["metadata"]["annotations"] = {SPIS_ANNOTATION: "3;4"}
    found = encryption(n1, n2, n3, node("n4", "172.30.0.14", "10.244.3.0/24", None))
    assert [(p.node, p.ipsec_spis, p.problem) for p in found.peers] == [
        ("n2", (3, 4), ""),
        ("n3", (), f"annotation {SPIS_ANNOTATION}: '3;4' is not SPIs separated by commas; "
                   "nothing is sent to it through ESP"),
        ("n4", (), "")]
    # what IPsec needs of this node itself: its address, pod CIDRs, its own announcement
    assert (found.address, found.pod_cidrs, found.published_spis, found.tunnel_source) == (
        "172.30.0.11", ("10.244.0.0/24",), "3", "10.244.0.1")
