"""The mesh's xDS control plane: Envoy resource builders, snapshot cache and ADS server.

Named `meshxds`, not `xds`: the xds-protos wheel owns the top-level `xds` package (the CNCF
`xds.core`, `xds.type` protos that Envoy's generated code imports).
"""

import os

# The agent forks Envoy from a process that runs gRPC threads. gRPC's fork handlers serve
# fork-without-exec, which we never do; left on, they print a warning at every start.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
