"""The node's Envoy as a process: its bootstrap (a pure function), the supervisor that starts,
adopts, restarts and stops it, and a client for its admin API."""
