"""The node datapath: the eBPF programs of `bpf/` (compiled with bcc at agent start), their
pinned maps, and what keeps the maps equal to what the IR says (the service reconciler,
forwarding); the sink that drives them is mesh/sinks/datapath.py."""
