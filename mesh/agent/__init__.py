"""The node agent: a composition root that builds the components for its mode and runs them."""
