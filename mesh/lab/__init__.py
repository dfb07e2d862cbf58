"""The lab: a cluster of nodes and pods in network namespaces on one machine (`mesh lab`)."""
