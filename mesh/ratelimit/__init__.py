"""The node's rate limit service (RLS): Envoy's `ShouldRateLimit`, counters in Redis, so every
node's proxy shares each global limit."""
