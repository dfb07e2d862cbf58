"""The Envoy sink: IR -> Envoy resources (one module per kind of resource, one per HTTP
filter) -> the xDS snapshot cache the node's Envoy reads over ADS."""
