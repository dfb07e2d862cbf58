"""Gateway API durations (GEP-2257): up to four `<number><h|m|s|ms>` parts, like `1h30m`."""

from __future__ import annotations

import re

_PART = re.compile(r"(\d{1,5})(ms|h|m|s)")
_WHOLE = re.compile(r"^(?:\d{1,5}(?:ms|h|m|s)){1,4}$")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float:
    if not _WHOLE.match(text):
        raise ValueError(f"invalid duration {text!r}")
    return sum(int(n) * _UNIT[u] for n, u in _PART.findall(text))
