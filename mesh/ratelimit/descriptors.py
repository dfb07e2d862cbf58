"""The descriptor contract between the translator (mesh/sinks/envoy/httpfilters/descriptors.py)
and the service: what one descriptor of a RateLimitRequest asks for.

A descriptor is `mesh.dev/policy` = the limit's id (first), then selector entries (any keys:
they make the counter per client or per value), then `mesh.dev/limit` = `<requests>/<unit>`
and optionally `mesh.dev/shadow` = `true`. The limit travels in the descriptor, so the service
needs no configuration and every node agrees. A descriptor that breaks the contract is a
`Problem`: answered OK (it limits nothing) and logged once.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# The contract's keys, declared here once; the translator's side (the Envoy sink) imports them.
POLICY_KEY = "mesh.dev/policy"
LIMIT_KEY = "mesh.dev/limit"
SHADOW_KEY = "mesh.dev/shadow"
KEY_PREFIX = "mesh:rl:"

# Envoy's RateLimitResponse.RateLimit.Unit values, and each unit's window.
UNITS = {"Second": (1, 1), "Minute": (2, 60), "Hour": (3, 3600), "Day": (4, 86400)}
MAX_REQUESTS = 1_000_000
MAX_DESCRIPTORS = 16
MAX_ENTRIES = 16
MAX_VALUE = 256


@dataclass(frozen=True, slots=True)
class Limit:
    """One descriptor's limit, ready for the store."""

    key: str  # the Redis key of its counter
    policy: str
    requests: int
    unit: int  # RateLimitResponse.RateLimit.Unit
    window_us: int
    shadow: bool
    hits: int  # capped at requests + 1: more can never fit either


@dataclass(frozen=True, slots=True)
class Problem:
    reason: str  # what is wrong, with at most a short excerpt of the offending value


def _excerpt(value: str) -> str:
    return repr(value[:40] + ("..." if len(value) > 40 else ""))


def _counter_key(domain: str, entries: list[tuple[str, str]], unit: str) -> str:
    # Length-prefixed, so no choice of keys and values can make two descriptors collide;
    # hashed, so client data never reaches a key raw. The limit and shadow entries are left
    # out: changing a limit keeps its counter.
    parts: list[bytes] = []
    for part in (domain, unit, *(x for kv in entries for x in kv)):
        raw = part.encode()
        parts += (len(raw).to_bytes(4, "big"), raw)
    return KEY_PREFIX + hashlib.sha256(b"".join(parts)).hexdigest()[:32]


def parse(domain: str, descriptor: Any, request_hits: int) -> Limit | Problem:
    """One RateLimitDescriptor (Envoy's generated class) against the contract."""
    entries = descriptor.entries
    if not entries or entries[0].key != POLICY_KEY or not entries[0].value:
        return Problem(f"descriptor does not start with a {POLICY_KEY} entry")
    policy = entries[0].value
    if len(entries) > MAX_ENTRIES:
        return Problem(f"{_excerpt(policy)}: more than {MAX_ENTRIES} entries")
    selectors: list[tuple[str, str]] = []
    limit = shadow = None
    for e in entries:
        key, value = e.key, e.value
        if len(key) > MAX_VALUE or len(value) > MAX_VALUE:
            return Problem(f"{_excerpt(policy)}: an entry longer than {MAX_VALUE} characters")
        if key == LIMIT_KEY:
            if limit is not None:
                return Problem(f"{policy}: two {LIMIT_KEY} entries")
            limit = value
        elif key == SHADOW_KEY:
            shadow = value
        else:
            selectors.append((key, value))
    if limit is None:
        return Problem(f"{policy}: no {LIMIT_KEY} entry")
    requests_text, _, unit_name = limit.partition("/")
    unit = UNITS.get(unit_name)
    if unit is None or not requests_text.isdigit() or not requests_text.isascii():
        return Problem(f"{policy}: {LIMIT_KEY} {_excerpt(limit)} is not <requests>/"
                       "<Second|Minute|Hour|Day>")
    requests = int(requests_text)
    if not 1 <= requests <= MAX_REQUESTS:
        return Problem(f"{policy}: {LIMIT_KEY} {_excerpt(limit)}: requests must be 1 to "
                       f"{MAX_REQUESTS}")
    if shadow not in (None, "true", "false"):
        return Problem(f"{policy}: {SHADOW_KEY} {_excerpt(shadow)} is not true or false")
    # A descriptor may carry its own hits (0 asks without counting); else the request's.
    hits = descriptor.hits_addend.value if descriptor.HasField("hits_addend") else request_hits
    return Limit(key=_counter_key(domain, selectors, unit_name), policy=policy,
                 requests=requests, unit=unit[0], window_us=unit[1] * 1_000_000,
                 shadow=shadow == "true", hits=min(hits, requests + 1))


def parse_request(request: Any) -> list[Limit | Problem]:
    """Every descriptor of a RateLimitRequest, in order."""
    domain = request.domain
    if len(domain) > MAX_VALUE:
        return [Problem(f"domain longer than {MAX_VALUE} characters")] * len(
            request.descriptors)
    hits = request.hits_addend or 1
    out: list[Limit | Problem] = []
    for i, d in enumerate(request.descriptors):
        out.append(parse(domain, d, hits) if i < MAX_DESCRIPTORS else
                   Problem(f"more than {MAX_DESCRIPTORS} descriptors in one request"))
    return out


class ProblemLog:
    """Logs each distinct problem once (the most recent `remember` of them), and at most
    `per_second` new ones a second: a misbehaving client must not flood the log."""

    def __init__(self, remember: int = 1024, per_second: int = 10) -> None:
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember
        self._per_second = per_second
        self._second = 0
        self._logged_this_second = 0
        self.suppressed = 0

    def report(self, problem: Problem) -> None:
        if problem.reason in self._seen:
            self._seen.move_to_end(problem.reason)
            return
        now = int(time.monotonic())
        if now != self._second:
            self._second, self._logged_this_second = now, 0
        if self._logged_this_second >= self._per_second:
            self.suppressed += 1
            return
        self._logged_this_second += 1
        self._seen[problem.reason] = None
        if len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        log.warning("descriptor ignored (answered OK)", extra={"problem": problem.reason})
