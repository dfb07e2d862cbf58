"""What an annotation parser raises for a value it refuses; shared by the ingress-nginx
annotation modules (`ingress_annotations` and the families it delegates to), so that none of
them imports another to say so."""

from __future__ import annotations


class Refused(ValueError):
    """A value that is refused: the message says why, and becomes a status warning."""
