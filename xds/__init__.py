"""xDS control plane: Envoy resource builders, the per-node snapshot cache and the ADS server."""
