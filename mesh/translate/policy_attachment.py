"""Traffic policy attachment (GEP-713): which policy decides each feature of each route rule,
what that does to the rule's IR routes and backends, and every policy's status.

Precedence, most specific first: a route rule (by name), the route, a listener (a Gateway's
or a ListenerSet's, by sectionName), the ListenerSet, the Gateway; for a mesh (GAMMA) route:
the rule, the route, the parent Service's port (by name), the Service. Each feature
(rateLimit, retry, timeout, ...) is decided on its own by the most specific policy that sets
it. Two policies on the same target that set the same feature: the oldest decides, then by
namespace/name; the other is Conflicted for it. A Service's backend settings (circuit
breaking, health checks, load balancing, connect and idle timeouts) apply to its backend for
every route; a route's (or its Gateway's) policy that sets them gets its own copy of the
backend with them.

The Gateway API's own fields stay the first choice: an HTTPRoute rule's `timeouts` and
`retry` win over a policy's.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from mesh import ir
from mesh.store import kinds
from mesh.store.kinds import GATEWAY_GROUP, GroupKind
from mesh.store.objects import KubeObject, ObjectKey
from mesh.store.store import StoreSnapshot
from mesh.translate import model, traffic_policy
from mesh.translate.status import (
    Condition,
    Conditions,
    ParentStatus,
    PolicyStatus,
    Reason,
    Type,
    condition,
)
from mesh.translate.traffic_policy import TrafficPolicy

AFFECTED = "mesh.dev/TrafficPolicyAffected"
# Features that shape the backend (an Envoy cluster) rather than the route.
BACKEND_FEATURES = ("circuitBreaker", "healthCheck", "loadBalancer", "timeout", "retry")

# (group, kind, namespace, name, sectionName)
Target = tuple[str, str, str, str, str | None]


@dataclass(frozen=True)
class Scope:
    """Where one route rule is served, as policies see it."""

    route: ObjectKey
    rule: str | None
    parent: Target  # the Gateway, ListenerSet or Service (sectionName: listener / port name)
    gateway: Target | None = None  # a ListenerSet's Gateway

    def levels(self) -> list[Target]:
        """The targets that can carry policies for this scope, most specific first."""
        r = self.route
        out: list[Target] = []
        if self.rule:
            out.append((r.group, r.kind, r.namespace, r.name, self.rule))
        out.append((r.group, r.kind, r.namespace, r.name, None))
        g, k, ns, name, section = self.parent
        if section is not None:
            out.append(self.parent)
        out.append((g, k, ns, name, None))
        if self.gateway is not None:
            out.append(self.gateway)
            out.append((*self.gateway[:4], None))
        return out


@dataclass
class Decision:
    """What decides each feature for one scope: feature -> policy."""

    by_feature: dict[str, TrafficPolicy] = field(default_factory=dict)

    def get(self, feature: str) -> Any:
        p = self.by_feature.get(feature)
        return p.feature(feature) if p is not None else None

    def key(self) -> tuple[Any, ...]:
        return tuple(sorted((f, p.obj.namespace, p.obj.name) for f, p in self.by_feature.items()))


class PolicyIndex:
    """Every TrafficPolicy of a snapshot, by target; built once per translation."""

    def __init__(self, snapshot: StoreSnapshot, global_rate_limits: bool) -> None:
        self.s = snapshot
        self.invalid: dict[ObjectKey, tuple[KubeObject, str]] = {}
        self.policies: list[TrafficPolicy] = []
        for obj in sorted(snapshot.of_kind(traffic_policy.TRAFFIC_POLICY),
                          key=lambda o: (o.created, o.namespace, o.name)):
            try:
                p = traffic_policy.parse_traffic_policy(obj)
            except model.Invalid as e:
                self.invalid[obj.key] = (obj, str(e))
                continue
            if p.rate_limits is not None and p.rate_limits.global_ and not global_rate_limits:
                self.invalid[obj.key] = (obj, "global rate limits need the node's rate limit "
                                         "service: run the agent with --ratelimit-redis URL")
                continue
            self.policies.append(p)
        # The Gateway API's own (experimental) XBackendTrafficPolicy, per Service: its retry
        # budget and session persistence come before a TrafficPolicy's.
        self.backend_policies: dict[tuple[str, str], XBackendPolicy] = {}
        self.backend_invalid: dict[ObjectKey, tuple[KubeObject, str]] = {}
        self.backend_all: list[XBackendPolicy] = []  # valid ones, oldest first
        for obj in sorted(snapshot.of_kind(kinds.X_BACKEND_TRAFFIC_POLICY),
                          key=lambda o: (o.created, o.namespace, o.name)):
            try:
                xp = _parse_x_backend(obj)
            except model.Invalid as e:
                self.backend_invalid[obj.key] = (obj, str(e))
                continue
            self.backend_all.append(xp)
            for svc in xp.services:
                self.backend_policies.setdefault((obj.namespace, svc), xp)  # the oldest wins
        self.by_target: dict[Target, list[TrafficPolicy]] = {}
        for p in self.policies:  # oldest first
            for t in p.targets:
                key = (t.group, t.kind, p.obj.namespace, t.name, t.section_name)
                self.by_target.setdefault(key, []).append(p)
        # (policy, target, feature) -> the older policy on the same target that decides it
        self.conflicts: dict[tuple[ObjectKey, Target, str], TrafficPolicy] = {}
        for target, ps in self.by_target.items():
            for feature in traffic_policy.FEATURES:
                setting = [p for p in ps if p.sets(feature)]
                for loser in setting[1:]:
                    self.conflicts[(loser.obj.key, target, feature)] = setting[0]

    def __bool__(self) -> bool:
        return bool(self.policies) or bool(self.backend_policies)

    def backend_session(self, backend: str | None) -> ir.SessionPersistence | None:
        """An XBackendTrafficPolicy's session persistence for a backend (ns/svc/port)."""
        if backend is None or not self.backend_policies:
            return None
        ns, name, _ = backend.split("|", 1)[0].split("/", 2)
        xp = self.backend_policies.get((ns, name))
        return xp.session if xp is not None else None

    def decide(self, scope: Scope,
               features: Iterable[str] = traffic_policy.ROUTE_FEATURES) -> Decision:
        return self._decide(scope.levels(), features)

    def _decide(self, levels: list[Target], features: Iterable[str]) -> Decision:
        """Per feature, the oldest policy on the most specific of `levels` that sets it."""
        out = Decision()
        for feature in features:
            for target in levels:
                winner = next((p for p in self.by_target.get(target, ()) if p.sets(feature)),
                              None)
                if winner is not None:
                    out.by_feature[feature] = winner
                    break
        return out

    def service_settings(self, namespace: str, name: str, port_name: str | None
                         ) -> ir.BackendSettings:
        """A Service (port)'s backend settings, from the policies that target it."""
        levels: list[Target] = []
        if port_name:
            levels.append(("", "Service", namespace, name, port_name))
        levels.append(("", "Service", namespace, name, None))
        out = backend_settings(self._decide(levels, BACKEND_FEATURES), ir.BackendSettings())
        xp = self.backend_policies.get((namespace, name))
        if xp is not None and xp.budget_percent is not None:
            out = replace(out, circuit_breaker=replace(
                out.circuit_breaker or ir.CircuitBreaker(),
                retry_budget_percent=xp.budget_percent,
                retry_budget_min_concurrency=xp.min_retry_concurrency))
        return out

    def visibility(self, namespace: str, name: str, port_name: str | None) -> str | None:
        """A Service port's l7Visibility (HTTP or None) from the policies that target it
        (the port's before the Service's); None when no policy sets it."""
        levels: list[Target] = []
        if port_name:
            levels.append(("", "Service", namespace, name, port_name))
        levels.append(("", "Service", namespace, name, None))
        decided = self._decide(levels, ("l7Visibility",)).get("l7Visibility")
        return decided if isinstance(decided, str) else None

    # -- status ------------------------------------------------------------------------------

    def status(self, controller: str) -> dict[ObjectKey, PolicyStatus]:
        """Every policy's status: an ancestor entry per target (a route's: per parent)."""
        out: dict[ObjectKey, PolicyStatus] = {}
        for obj, message in self.invalid.values():
            ancestors = []
            for raw in model.as_list(obj.spec.get("targetRefs"))[:traffic_policy.MAX_TARGETS]:
                m = raw if isinstance(raw, dict) else {}
                ref = model.ParentRef(str(m.get("group", "")), str(m.get("kind", "")),
                                      obj.namespace, str(m.get("name", "")),
                                      m.get("sectionName") if isinstance(
                                          m.get("sectionName"), str) else None)
                ancestors.append(ParentStatus(ref, controller, Conditions([condition(
                    Type.ACCEPTED, False, Reason.INVALID, message, obj.generation)])))
            out[obj.key] = PolicyStatus(ancestors)
        for obj, message in self.backend_invalid.values():
            out[obj.key] = PolicyStatus([ParentStatus(
                model.ParentRef("", "Service", obj.namespace, str(t.get("name", ""))),
                controller, Conditions([condition(Type.ACCEPTED, False, Reason.INVALID,
                                                  message, obj.generation)]))
                for t in model.as_list(obj.spec.get("targetRefs"))[:traffic_policy.MAX_TARGETS]
                if isinstance(t, dict)])
        for xp in self.backend_all:
            out[xp.obj.key] = self._x_backend_status(xp, controller)
        overrides = self._overrides()
        for p in self.policies:
            ancestors = []
            for t in p.targets:
                target: Target = (t.group, t.kind, p.obj.namespace, t.name, t.section_name)
                ancestors += [ParentStatus(ref, controller, Conditions([c]))
                              for ref, c in self._target_status(p, target, overrides)]
            out[p.obj.key] = PolicyStatus(ancestors)
        return out

    def _x_backend_status(self, xp: XBackendPolicy, controller: str) -> PolicyStatus:
        ancestors = []
        for svc in xp.services:
            ref = model.ParentRef("", "Service", xp.obj.namespace, svc)
            if self.s.get(kinds.SERVICE, xp.obj.namespace, svc) is None:
                c = condition(Type.ACCEPTED, False, Reason.TARGET_NOT_FOUND,
                              f"Service {xp.obj.namespace}/{svc} does not exist",
                              xp.obj.generation)
            elif (winner := self.backend_policies[(xp.obj.namespace, svc)]) is not xp:
                c = condition(Type.ACCEPTED, False, Reason.CONFLICTED,
                              f"XBackendTrafficPolicy {winner.obj.namespace}/"
                              f"{winner.obj.name} targets the same Service and is older",
                              xp.obj.generation)
            else:
                c = condition(Type.ACCEPTED, True, Reason.ACCEPTED,
                              f"applies to Service {xp.obj.namespace}/{svc}", xp.obj.generation)
            ancestors.append(ParentStatus(ref, controller, Conditions([c])))
        return PolicyStatus(ancestors)

    def _target_status(self, p: TrafficPolicy, target: Target,
                       overrides: dict[ObjectKey, list[str]]
                       ) -> list[tuple[model.ParentRef, Condition]]:
        group, kind, ns, name, section = target
        gen = p.obj.generation
        ref = model.ParentRef(group, kind, ns, name, section)
        obj = self.s.get(GroupKind(group, kind), ns, name)
        if obj is None:
            return [(ref, condition(Type.ACCEPTED, False, Reason.TARGET_NOT_FOUND,
                                    f"{kind} {ns}/{name} does not exist", gen))]
        if section is not None and not _has_section(obj, section):
            what = _section_word(kind)
            return [(ref, condition(Type.ACCEPTED, False, Reason.TARGET_NOT_FOUND,
                                    f"{kind} {ns}/{name} has no {what} named {section}", gen))]
        lost = [(f, w) for f in traffic_policy.FEATURES if p.sets(f)
                if (w := self.conflicts.get((p.obj.key, target, f))) is not None]
        set_features = [f for f in traffic_policy.FEATURES if p.sets(f)]
        if lost and len(lost) == len(set_features):
            older = sorted({f"TrafficPolicy {w.obj.namespace}/{w.obj.name}" for _, w in lost})
            c = condition(Type.ACCEPTED, False, Reason.CONFLICTED,
                          f"{', '.join(older)} targets the same {kind} and is older: it "
                          "decides " + ", ".join(f for f, _ in lost), gen)
        else:
            what = _section_word(kind)
            msg = f"applies to {kind} {ns}/{name}" + (f" {what} {section}" if section else "")
            if lost:
                msg += "; " + ", ".join(f"{f} decided by the older TrafficPolicy "
                                        f"{w.obj.namespace}/{w.obj.name}" for f, w in lost)
            extra = overrides.get(p.obj.key)
            if extra:
                msg += "; overridden where more specific policies apply: " + "; ".join(extra)
            c = condition(Type.ACCEPTED, True, Reason.ACCEPTED, msg, gen)
        if kind in ("HTTPRoute", "GRPCRoute"):
            # A route's ancestors are its parents (GEP-713): one entry per parentRef.
            refs = []
            for raw in model.as_list(obj.spec.get("parentRefs")):
                try:
                    refs.append(model.parse_parent_ref(raw, ns))
                except model.Invalid:
                    continue
            return [(r, c) for r in refs] or [(ref, c)]
        return [(ref, c)]

    def _overrides(self) -> dict[ObjectKey, list[str]]:
        """For each policy on a broad target, the more specific policies that decide some
        of its features somewhere beneath it (told in its status)."""
        beneath: dict[Target, list[Target]] = {}  # a target -> more specific targets under it
        for target in self.by_target:
            for broader in self._broader(target):
                beneath.setdefault(broader, []).append(target)
        out: dict[ObjectKey, list[str]] = {}
        for target, ps in self.by_target.items():
            for p in ps:
                for f in traffic_policy.FEATURES:
                    if not p.sets(f):
                        continue
                    for narrow in beneath.get(target, ()):
                        w = next((q for q in self.by_target[narrow] if q.sets(f)), None)
                        if w is not None and w is not p:
                            where = f"{narrow[1]} {narrow[2]}/{narrow[3]}" + (
                                f" {narrow[4]}" if narrow[4] else "")
                            note = f"{f} on {where} by TrafficPolicy " \
                                f"{w.obj.namespace}/{w.obj.name}"
                            if note not in out.setdefault(p.obj.key, []):
                                out[p.obj.key].append(note)
        return out

    def _broader(self, target: Target) -> list[Target]:
        group, kind, ns, name, section = target
        out: list[Target] = []
        if section is not None:
            out.append((group, kind, ns, name, None))
        if kind in ("HTTPRoute", "GRPCRoute"):
            obj = self.s.get(GroupKind(group, kind), ns, name)
            for raw in model.as_list(obj.spec.get("parentRefs")) if obj else ():
                try:
                    p = model.parse_parent_ref(raw, ns)
                except model.Invalid:
                    continue
                out.append((p.group, p.kind, p.namespace, p.name, None))
                if p.section_name is not None:
                    out.append((p.group, p.kind, p.namespace, p.name, p.section_name))
        return out


@dataclass(frozen=True)
class XBackendPolicy:
    """The parts of an XBackendTrafficPolicy (gateway.networking.x-k8s.io) we apply."""

    obj: KubeObject
    services: tuple[str, ...]
    budget_percent: float | None = None
    min_retry_concurrency: int | None = None
    session: ir.SessionPersistence | None = None


def _parse_x_backend(obj: KubeObject) -> XBackendPolicy:
    services = []
    targets = model.as_list(obj.spec.get("targetRefs"))[:traffic_policy.MAX_TARGETS + 1]
    for i, t in enumerate(targets):
        if not isinstance(t, dict) or t.get("group", "") != "" or t.get("kind") != "Service" \
                or not isinstance(t.get("name"), str):
            raise model.Invalid(f"spec.targetRefs[{i}] must name a Service (group \"\")")
        services.append(t["name"])
    if not services or len(services) > traffic_policy.MAX_TARGETS:
        raise model.Invalid(f"spec.targetRefs needs 1 to {traffic_policy.MAX_TARGETS} Services")
    rc = obj.spec.get("retryConstraint")
    percent = count = None
    if isinstance(rc, dict):
        budget: dict[str, Any] = rc["budget"] if isinstance(rc.get("budget"), dict) else {}
        percent = budget.get("percent", 20)
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise model.Invalid("spec.retryConstraint.budget.percent must be 0 to 100")
        rate: dict[str, Any] = rc["minRetryRate"] if isinstance(rc.get("minRetryRate"),
                                                                dict) else {}
        count = rate.get("count")
        if count is not None and (isinstance(count, bool) or not isinstance(count, int)
                                  or count < 1):
            raise model.Invalid("spec.retryConstraint.minRetryRate.count must be 1 or more")
    session = traffic_policy.parse_session_persistence(obj.spec.get("sessionPersistence"),
                                                 "spec.sessionPersistence")
    # Envoy's retry budget has a floor of concurrent retries, not a rate: the rate's count
    # is taken as that floor.
    return XBackendPolicy(obj, tuple(services), float(percent) if percent is not None else None,
                          count, session)


def _section_word(kind: str) -> str:
    """What a target's sectionName names."""
    return "rule" if kind.endswith("Route") else "port" if kind == "Service" else "listener"


def _has_section(obj: KubeObject, section: str) -> bool:
    if obj.kind in ("HTTPRoute", "GRPCRoute"):
        return any(isinstance(r, dict) and r.get("name") == section
                   for r in model.as_list(obj.spec.get("rules")))
    if obj.kind == "Service":
        return any(isinstance(p, dict) and p.get("name") == section
                   for p in model.as_list(obj.spec.get("ports")))
    return any(isinstance(li, dict) and li.get("name") == section
               for li in model.as_list(obj.spec.get("listeners")))


def affected(conds: Conditions, names: list[str], generation: int) -> None:
    """The target's own status says which policies affect it."""
    conds.put(condition(AFFECTED, True, Reason.ACCEPTED,
                        "affected by TrafficPolicy " + ", ".join(sorted(names)), generation))


# -- applying a decision -----------------------------------------------------------------------

def shapes_backend(feature: str, p: TrafficPolicy) -> bool:
    """Whether the policy's `feature` sets anything of a backend's (its cluster's)."""
    if feature in ("circuitBreaker", "healthCheck", "loadBalancer"):
        return True
    if feature == "retry":
        return p.retry is not None and p.retry.budget_percent is not None
    if feature == "timeout":
        t = p.timeout
        return t is not None and any(
            v is not None for v in (t.connect, t.connection_idle, t.max_connection_duration))
    return False


def backend_settings(d: Decision, base: ir.BackendSettings) -> ir.BackendSettings:
    """`base` with the backend features `d` decides."""
    out = base
    cb: ir.CircuitBreaker | None = d.get("circuitBreaker")
    retry: traffic_policy.RetrySettings | None = d.get("retry")
    if retry is not None and retry.budget_percent is not None:
        cb = replace(cb or ir.CircuitBreaker(), retry_budget_percent=retry.budget_percent,
                     retry_budget_min_concurrency=retry.budget_min_concurrency)
    if cb is not None:
        out = replace(out, circuit_breaker=cb)
    hc: traffic_policy.HealthChecks | None = d.get("healthCheck")
    if hc is not None:
        out = replace(out, health_check=hc.active, outlier_detection=hc.passive)
    lb: traffic_policy.Balancing | None = d.get("loadBalancer")
    if lb is not None:
        out = replace(out, load_balancer=lb.balancer)
    t: traffic_policy.Timeouts | None = d.get("timeout")
    if t is not None:
        out = replace(out, connect_timeout=t.connect or out.connect_timeout,
                      idle_timeout=t.connection_idle or out.idle_timeout,
                      max_connection_duration=t.max_connection_duration or
                      out.max_connection_duration)
    return out


def apply_route(route: ir.Route, d: Decision) -> ir.Route:
    """The route with the route-level features `d` decides (backends: see `apply`)."""
    if not d.by_feature:
        return route
    out = route
    rl: traffic_policy.RateLimits | None = d.get("rateLimit")
    if rl is not None:
        out = replace(out, rate_limits=rl.local + rl.global_)
    lb: traffic_policy.Balancing | None = d.get("loadBalancer")
    if lb is not None and lb.hash_policy is not None:
        out = replace(out, hash_policy=lb.hash_policy)
    session: ir.SessionPersistence | None = d.get("sessionPersistence")
    if session is not None and out.session is None:  # the route's own field first
        out = replace(out, session=session)
    a = out.action
    if isinstance(a, ir.Forward):
        retry: traffic_policy.RetrySettings | None = d.get("retry")
        if retry is not None and a.retry is None and retry.retry is not None:
            a = replace(a, retry=retry.retry)
        if retry is not None and a.per_try_timeout is None and retry.per_try_timeout:
            a = replace(a, per_try_timeout=retry.per_try_timeout)
        t: traffic_policy.Timeouts | None = d.get("timeout")
        if t is not None:
            if not a.timeout and t.request:
                a = replace(a, timeout=t.request)
            if t.stream_idle:
                a = replace(a, idle_timeout=t.stream_idle)
        out = replace(out, action=a)
    return out


def scope_for_gateway(route: KubeObject, rule: str | None, gateway: tuple[str, str],
                      listener: str, owner: ObjectKey) -> Scope:
    if owner.kind == "Gateway":
        return Scope(route.key, rule, (GATEWAY_GROUP, "Gateway", owner.namespace, owner.name,
                                       listener))
    return Scope(route.key, rule, (owner.group, owner.kind, owner.namespace, owner.name,
                                   listener),
                 gateway=(GATEWAY_GROUP, "Gateway", gateway[0], gateway[1], listener))


def scope_for_service(route: KubeObject, rule: str | None, namespace: str, name: str,
                      port_name: str | None) -> Scope:
    return Scope(route.key, rule, ("", "Service", namespace, name, port_name or None))

