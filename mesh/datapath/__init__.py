"""The node datapath: the eBPF programs of `bpf/` (compiled with bcc at agent start), their
pinned maps, and the sink that keeps the maps equal to what the IR says."""
