"""Sinks: each turns the IR into effects on the node (Envoy over xDS now; BPF maps and
WireGuard peers later) and says, per object, whether the node runs it."""
