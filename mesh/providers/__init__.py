"""Providers turn the outside world (a directory of YAML, later the Kubernetes API) into
objects in the store. Nothing else reads input."""
