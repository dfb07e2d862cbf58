"""Flows: what the node saw of its pods' traffic (who talked to whom, what was forwarded or
dropped and why, the HTTP details), kept in a bounded ring and streamed to whoever follows.

The L7 flows come from the node's Envoy through its access log service (`accesslog`); the
model (`model`) is what every source produces and every reader (filters, Hubble's API, the
CLI) reads.
"""
