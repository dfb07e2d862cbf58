"""Sinks: each turns the IR into effects on the node (Envoy over xDS, the eBPF datapath's
maps) and says, per object, whether the node runs it."""
