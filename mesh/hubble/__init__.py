"""Hubble's API for the node's flows: the Observer service, its filters, and the conversion of
the agent's flows into Hubble's messages (the generated modules are in mesh/hubble/api)."""
