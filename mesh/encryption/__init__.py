"""Transparent encryption between nodes: the node's WireGuard keys and device, driven by the
IR's peers (mesh/ir/encryption.py)."""

STATUS_FILE = "encryption.json"  # in the agent's state directory: what `mesh encryption` shows
