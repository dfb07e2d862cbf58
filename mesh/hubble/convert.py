"""The node's flows as Hubble's `flow.Flow` messages, so that Hubble's clients read them as
they read Cilium's.

Where Hubble has a convention, it is followed: an L7 flow is the response (`RESPONSE`, from
the server to the client, `is_reply`), which carries the status code and the latency
besides the method and URL; labels are `k8s:key=value` with the pod's namespace as
`k8s:io.kubernetes.pod.namespace`; the event type is the Cilium monitor's (4 trace, with
the observation point as subtype; 1 drop, with the reason; 129 access log; 7 a socket's
translation, as Hubble's SOCK flow after it).
"""

from __future__ import annotations

import ipaddress
import uuid
from typing import Any

from google.protobuf.struct_pb2 import Struct
from google.protobuf.wrappers_pb2 import BoolValue

from mesh.flows.model import DROPPED, L7, SOCK, Connection, Endpoint, Flow
from mesh.flows.store import Lost
from mesh.hubble.api.flow import flow_pb2

EMITTER = "mesh"
# Cilium's monitor message types and trace subtypes (pkg/monitor/api/types.go).
MESSAGE_DROP, MESSAGE_TRACE, MESSAGE_TRACE_SOCK, MESSAGE_ACCESS_LOG = 1, 4, 7, 129
POST_XLATE_FWD = 2  # flow.proto's SOCK_XLATE_POINT_POST_DIRECTION_FWD
_TRACE_SUBTYPE = {"TO_ENDPOINT": 0, "TO_PROXY": 1, "TO_STACK": 3, "TO_CRYPTO": 13}
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
_FLAG_ORDER = ("SYN", "ACK", "RST", "FIN", "PSH")


def _endpoint(e: Endpoint) -> flow_pb2.Endpoint:
    labels = [label if label.startswith("reserved:") else f"k8s:{label}" for label in e.labels]
    if e.namespace:
        labels.append(f"k8s:{NAMESPACE_LABEL}={e.namespace}")
    workloads = [flow_pb2.Workload(name=e.workload, kind=e.workload_kind)] \
        if e.workload else []
    return flow_pb2.Endpoint(identity=e.identity, namespace=e.namespace,
                             labels=sorted(labels), pod_name=e.pod, workloads=workloads)


def _service(name: str) -> flow_pb2.Service | None:
    if not name:
        return None
    namespace, _, service = name.partition("/")
    return flow_pb2.Service(namespace=namespace, name=service)


def _ip_version(address: str) -> str:
    try:
        v = ipaddress.ip_address(address).version
    except ValueError:
        return "IP_NOT_USED"
    return "IPv4" if v == 4 else "IPv6"


def to_proto(flow: Flow, version: str = "") -> flow_pb2.Flow:
    src, dst = flow.source, flow.destination
    if flow.kind == L7:
        src, dst = dst, src  # the response: from the server to the client
    # enums by name: the generated constructors take them so, and typed
    fields: dict[str, Any] = dict(
        uuid=flow.id or str(uuid.uuid4()), emitter=flow_pb2.Emitter(name=EMITTER, version=version),
        verdict=flow.verdict, node_name=flow.node,
        Type=flow.kind,
        IP=flow_pb2.IP(source=src.ip, destination=dst.ip, ipVersion=_ip_version(src.ip),
                       encrypted=flow.connection is not None and
                       flow.connection.point == "TO_CRYPTO"),
        source=_endpoint(src), destination=_endpoint(dst),
        source_service=_service(src.service), destination_service=_service(dst.service))
    if flow.direction:
        fields["traffic_direction"] = flow.direction
    reason = 0
    if flow.verdict == DROPPED and flow.drop_reason in flow_pb2.DropReason.keys():
        reason = flow_pb2.DropReason.Value(flow.drop_reason)
        fields["drop_reason_desc"] = flow.drop_reason
        fields["drop_reason"] = reason
    conn = flow.connection
    if conn is not None and flow.kind == "L3_L4" and conn.point and flow.verdict != DROPPED:
        fields["trace_observation_point"] = conn.point
    out = flow_pb2.Flow(**fields)
    out.time.FromNanoseconds(int(flow.time * 1e9))
    if flow.connection_id:
        # Hubble's Flow has no field for it: its extensions hold the connection's id
        extension = Struct()
        extension.update({"connection_id": flow.connection_id})
        out.extensions.Pack(extension)
    if flow.protocol == "TCP":
        tcp = out.l4.TCP
        tcp.source_port, tcp.destination_port = src.port, dst.port
        if flow.connection is not None:
            for name in flow.connection.tcp_flags:
                setattr(tcp.flags, name, True)
    elif flow.protocol == "UDP":
        out.l4.UDP.source_port, out.l4.UDP.destination_port = src.port, dst.port
    if flow.kind == L7 and flow.http is not None:
        http = flow.http
        out.l7.type = flow_pb2.RESPONSE
        out.l7.latency_ns = int(http.latency_ms * 1e6)
        out.l7.http.code = http.status
        out.l7.http.method = http.method
        out.l7.http.url = f"http://{http.host}{http.path}"
        out.l7.http.protocol = http.protocol
        out.is_reply.CopyFrom(BoolValue(value=True))
        out.event_type.type = MESSAGE_ACCESS_LOG
        out.Summary = f"{http.protocol} {http.status} {int(http.latency_ms)}ms " \
            f"({http.method} {out.l7.http.url})"
    elif flow.kind == SOCK:
        # as Hubble's socket trace after the translation: no TCP flags; from the client
        out.ClearField("traffic_direction")
        out.is_reply.CopyFrom(BoolValue(value=False))
        out.sock_xlate_point = flow_pb2.SOCK_XLATE_POINT_POST_DIRECTION_FWD
        out.event_type.type = MESSAGE_TRACE_SOCK
        out.event_type.sub_type = POST_XLATE_FWD
        if flow.protocol == "TCP":
            out.l4.TCP.ClearField("flags")
        out.Summary = flow.protocol
    elif conn is not None:
        out.is_reply.CopyFrom(BoolValue(value=conn.is_reply))
        if flow.verdict == DROPPED:
            out.event_type.type = MESSAGE_DROP
            out.event_type.sub_type = reason
        else:
            out.event_type.type = MESSAGE_TRACE
            out.event_type.sub_type = _TRACE_SUBTYPE.get(conn.point, 0)
        out.Summary = summary(flow.protocol, conn)
    return out


def summary(protocol: str, conn: Connection) -> str:
    """What Hubble's CLI prints after the verdict: the packet's TCP flags (in Hubble's order)
    or protocol, and for a connection's end its counts each way."""
    if protocol == "TCP":
        text = "TCP Flags: " + ", ".join(f for f in _FLAG_ORDER if f in conn.tcp_flags)
    else:
        text = protocol
    if conn.event == "CLOSED":
        (sent, received), (sent_bytes, received_bytes) = conn.packets, conn.bytes
        text += f"; closed: {sent} packets {sent_bytes} bytes sent, " \
                f"{received} packets {received_bytes} bytes received"
    return text


def lost_event(lost: Lost) -> flow_pb2.LostEvent:
    return flow_pb2.LostEvent(source=lost.source, num_events_lost=lost.count)
