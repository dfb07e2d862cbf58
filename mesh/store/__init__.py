"""The store: Kubernetes objects as providers put them in, snapshots as the translator reads."""
