"""Network policy: identities, the policies by identity, what the datapath and Envoy enforce."""
