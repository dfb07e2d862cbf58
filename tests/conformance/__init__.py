"""The Gateway API conformance runner (`mesh conformance`)."""
