"""The project's CNI plugin (the `mesh-cni` binary a runtime calls per pod)."""
