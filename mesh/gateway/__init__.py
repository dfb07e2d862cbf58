"""Gateway API and Ingress: the typed model and the pure translator to the IR and status."""
