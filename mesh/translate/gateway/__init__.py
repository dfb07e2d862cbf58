"""The Gateway API translator: GatewayClasses, Gateways, ListenerSets, routes (GAMMA's
too), BackendTLSPolicies and TrafficPolicies to IR listeners and status. Its phases, in
order, are listed in `translator`."""
