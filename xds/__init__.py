"""xDS control plane: Envoy resource builders, the per-node snapshot cache and the ADS server.

The xds-protos wheel also ships a top-level `xds` package (the CNCF `xds.core`, `xds.type`
protos that Envoy's generated code imports). Both live under this one name: extending the
package path lets `xds.core` resolve to the wheel's modules while `xds.server` etc. are ours.
"""

import os
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)

# The agent forks Envoy from a process that runs gRPC threads. gRPC's fork handlers serve
# fork-without-exec, which we never do; left on, they only print a warning at every start.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
