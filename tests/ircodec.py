"""The IR as plain YAML data and back: the one encoding of the golden files' IR, which the
translator's golden test expects and the Envoy sink's golden test takes as its input (as
Envoy Gateway's `testdata/in/xds-ir/*.yaml`). Bytes are YAML `!!binary`; object keys are
[group, kind, namespace, name]; a route's action is a one-key map keyed by its kind
(`Forward: {...}`); fields at their defaults are left out, so that a new optional IR field
changes no golden file."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any

import yaml

from mesh import ir
from mesh.store.objects import ObjectKey

_ACTIONS = {cls.__name__: cls for cls in (ir.Forward, ir.Redirect, ir.DirectResponse)}


def encode(value: Any) -> Any:
    if isinstance(value, ObjectKey):
        return list(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v != f.default and not (f.default_factory is not dataclasses.MISSING
                                       and v == f.default_factory()):
                out[f.name] = encode(v)
        return {type(value).__name__: out} if type(value).__name__ in _ACTIONS else out
    if isinstance(value, frozenset | set):
        return sorted(encode(v) for v in value)
    if isinstance(value, tuple | list):
        return [encode(v) for v in value]
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, vars(ir) | vars(ir.l7))


def decode(tp: Any, data: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is ObjectKey:
        return ObjectKey(*data)
    if origin in (types.UnionType, typing.Union):
        if data is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if len(members) == 1:
            return decode(members[0], data)
        (kind, fields), = data.items()
        return decode(_ACTIONS[kind], fields)
    if dataclasses.is_dataclass(tp):
        cls: Any = tp
        hints = _hints(cls)
        return cls(**{k: decode(hints[k], v) for k, v in data.items()})
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(decode(args[0], v) for v in data)
        return tuple(decode(a, v) for a, v in zip(args, data, strict=True))
    if origin is frozenset:
        return frozenset(decode(args[0], v) for v in data)
    if tp is float and isinstance(data, int):
        return float(data)
    return data


def dump(model: ir.IR) -> str:
    """The IR as golden-file text."""
    return yaml.safe_dump(encode(model), sort_keys=False, width=100, default_flow_style=None)


def load(text: str) -> ir.IR:
    """The IR from golden-file text (`dump`'s)."""
    model = decode(ir.IR, yaml.safe_load(text))
    assert isinstance(model, ir.IR)
    return model


# Protobuf map fields: their JSON key order follows the runtime's map iteration, which upb
# does not keep stable from run to run.
_MAP_FIELDS = frozenset({"typedPerFilterConfig", "typedExtensionProtocolOptions",
                         "filterMetadata", "typedFilterMetadata"})


def sorted_maps(value: Any) -> Any:
    """Envoy JSON with protobuf map fields in key order (golden files compare as text)."""
    if isinstance(value, dict):
        return {k: sorted_maps(v) if k not in _MAP_FIELDS or not isinstance(v, dict)
                else {mk: sorted_maps(v[mk]) for mk in sorted(v)} for k, v in value.items()}
    if isinstance(value, list):
        return [sorted_maps(v) for v in value]
    return value
