"""The upstream NetworkPolicy cases against the lab: `python -m tests.netpol`."""
