"""A node's WireGuard key pair (X25519, from `cryptography`) and the checks a peer's public key
must pass.

The private key lives in one file of the agent's state directory, mode 0600, written whole
(a temporary file renamed over it), and is never logged: only its public half leaves the
process, as the Node's annotation and in logs. Keys are written as WireGuard writes them
(base64 of the 32 raw bytes); its UAPI wants them in hex.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

# The Node annotation holding a node's WireGuard public key (Cilium's is
# network.cilium.io/wg-pub-key).
ANNOTATION = "mesh.dev/wireguard-public-key"
KEY_FILE = "wireguard.key"


class InvalidKey(ValueError):
    """A key that cannot be used, and why."""


@dataclass(frozen=True)
class KeyPair:
    private: bytes
    public: bytes

    @property
    def public_text(self) -> str:
        return base64.b64encode(self.public).decode()

    def __repr__(self) -> str:  # never the private half, whoever prints it
        return f"KeyPair(public={self.public_text})"


def generate() -> KeyPair:
    key = X25519PrivateKey.generate()
    return _pair(key)


def _pair(key: X25519PrivateKey) -> KeyPair:
    private = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.Raw,
                                           serialization.PublicFormat.Raw)
    return KeyPair(private, public)


def save(path: Path, pair: KeyPair) -> None:
    """Write the private key (base64), 0600 from its creation on."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(base64.b64encode(pair.private).decode() + "\n")
    tmp.replace(path)


def load(path: Path) -> KeyPair:
    """The key pair of a private key file; InvalidKey if it is not one (or readable by others:
    a key others could read is not kept)."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise InvalidKey(f"{path} is readable by others (mode {mode:o}): not used")
    try:
        raw = base64.b64decode(path.read_text().strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey(f"{path} does not hold a base64 key") from None
    if len(raw) != 32:
        raise InvalidKey(f"{path} does not hold a 32-byte key")
    return _pair(X25519PrivateKey.from_private_bytes(raw))


def load_or_create(path: Path) -> tuple[KeyPair, bool]:
    """The node's key pair, made (and saved) on first use; whether it was made now."""
    if path.exists():
        return load(path), False
    pair = generate()
    save(path, pair)
    return pair, True


def parse_public(text: str) -> bytes:
    """A peer's public key as published (base64 of 32 bytes); InvalidKey saying what is wrong
    with it. A key of low order (whose shared secret is zero with every key) is refused as
    WireGuard refuses it."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey("not base64") from None
    if len(raw) != 32:
        raise InvalidKey(f"{len(raw)} bytes, not 32")
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise InvalidKey("a point of low order, not a usable X25519 key") from None
    return raw

