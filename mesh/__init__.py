"""The node agent: runs the xDS server and the node's Envoy, and (later) the datapath."""
