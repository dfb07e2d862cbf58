"""The gRPC echo service of the Gateway API conformance backends (grpcecho.proto), built from
a descriptor in code: no generated files, and the same wire format.

`Echo` and `EchoTwo` answer with what the request looked like and who answered (pod,
namespace); `EchoThree` is unimplemented on purpose (the suite expects code 12).
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

log = logging.getLogger(__name__)

PACKAGE = "gateway_api_conformance.echo_basic.grpcecho"
SERVICE = f"{PACKAGE}.GrpcEcho"

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED


def _file() -> descriptor_pb2.FileDescriptorProto:
    f = descriptor_pb2.FileDescriptorProto(name="mesh/grpcecho.proto", package=PACKAGE,
                                           syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, int, str]) -> None:
        m = f.message_type.add(name=name)
        for fname, number, ftype, label, type_name in fields:
            m.field.add(name=fname, number=number, type=ftype, label=label,
                        type_name=type_name or None)

    message("Header", ("key", 1, _STRING, _OPTIONAL, ""), ("value", 2, _STRING, _OPTIONAL, ""))
    message("Context", ("namespace", 1, _STRING, _OPTIONAL, ""),
            ("ingress", 2, _STRING, _OPTIONAL, ""), ("service_name", 3, _STRING, _OPTIONAL, ""),
            ("pod", 4, _STRING, _OPTIONAL, ""))
    message("TLSAssertions", ("version", 1, _STRING, _OPTIONAL, ""),
            ("negotiated_protocol", 2, _STRING, _OPTIONAL, ""),
            ("server_name", 3, _STRING, _OPTIONAL, ""),
            ("cipher_suite", 4, _STRING, _OPTIONAL, ""),
            ("peer_certificates", 5, _STRING, _REPEATED, ""))
    message("Assertions", ("fully_qualified_method", 1, _STRING, _OPTIONAL, ""),
            ("headers", 2, _MESSAGE, _REPEATED, f".{PACKAGE}.Header"),
            ("authority", 3, _STRING, _OPTIONAL, ""),
            ("context", 4, _MESSAGE, _OPTIONAL, f".{PACKAGE}.Context"),
            ("tls_assertions", 5, _MESSAGE, _OPTIONAL, f".{PACKAGE}.TLSAssertions"))
    message("EchoRequest")
    message("EchoResponse", ("assertions", 1, _MESSAGE, _OPTIONAL, f".{PACKAGE}.Assertions"),
            ("request", 2, _MESSAGE, _OPTIONAL, f".{PACKAGE}.EchoRequest"))
    svc = f.service.add(name="GrpcEcho")
    for method in ("Echo", "EchoTwo", "EchoThree"):
        svc.method.add(name=method, input_type=f".{PACKAGE}.EchoRequest",
                       output_type=f".{PACKAGE}.EchoResponse")
    return f


_POOL = descriptor_pool.DescriptorPool()
_POOL.Add(_file())
EchoRequest: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName(f"{PACKAGE}.EchoRequest"))
EchoResponse: Any = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName(f"{PACKAGE}.EchoResponse"))


def handler(pod: str, namespace: str) -> grpc.GenericRpcHandler[Any, Any]:
    def echo(method: str) -> Any:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            fqm = f"/{SERVICE}/{method}"
            resp = EchoResponse()
            a = resp.assertions
            a.fully_qualified_method = fqm
            for key, value in context.invocation_metadata() or ():
                if isinstance(value, str):
                    a.headers.add(key=key, value=value)
                    if key == ":authority":
                        a.authority = value
            a.context.pod, a.context.namespace = pod, namespace
            resp.request.CopyFrom(request)
            log.debug("echo", extra={"method": fqm, "pod": pod})
            return resp
        return call

    methods = {m: grpc.unary_unary_rpc_method_handler(
        echo(m), request_deserializer=EchoRequest.FromString,
        response_serializer=EchoResponse.SerializeToString) for m in ("Echo", "EchoTwo")}
    return grpc.method_handlers_generic_handler(SERVICE, methods)


async def serve(addresses: list[str], pod: str, namespace: str) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler(pod, namespace),))
    for address in addresses:
        server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


def call(address: str, method: str, authority: str | None = None,
         timeout: float = 5.0) -> tuple[grpc.StatusCode, Any]:
    """One unary call through `address`; (status code, response or None)."""
    options = [("grpc.default_authority", authority)] if authority else []
    with grpc.insecure_channel(address, options=options) as channel:
        stub = channel.unary_unary(f"/{SERVICE}/{method}",
                                   request_serializer=EchoRequest.SerializeToString,
                                   response_deserializer=EchoResponse.FromString)
        try:
            return grpc.StatusCode.OK, stub(EchoRequest(), timeout=timeout)
        except grpc.RpcError as e:
            return e.code(), None
