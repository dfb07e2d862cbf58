"""Status conditions in the shape the Kubernetes API uses (`.status.conditions[]`).

The translator is pure, so it leaves `lastTransitionTime` out; the status sink adds it,
keeping the previous time while a condition's status stays the same.
"""

from __future__ import annotations

from typing import Any


def condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


def find(conditions: list[dict[str, Any]], type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c["type"] == type_), None)


def put(conditions: list[dict[str, Any]], new: dict[str, Any]) -> None:
    """Set a condition, replacing one of the same type."""
    for i, c in enumerate(conditions):
        if c["type"] == new["type"]:
            conditions[i] = new
            return
    conditions.append(new)
