"""The little of the ONNX file format the runtime must read itself (it depends on neither ``onnx`` nor protobuf).

:func:`external_data_locations` lists the external-data files an ONNX model refers to. segrt's exporter always
embeds every tensor in the model file, so an artifact's model with external data was not written by segrt: the
artifact loader refuses it before ONNX Runtime opens anything (recent ONNX Runtime versions refuse locations
outside the model's folder themselves; the check here does not depend on the installed version).

The walk follows the protobuf wire format (https://protobuf.dev/programming-guides/encoding/) through the message
fields that can hold tensors, with the field numbers of ``onnx.proto`` (checked against the ``onnx`` package in
``tests/test_hostile.py``)::

    ModelProto.graph = 7, ModelProto.functions = 25 → FunctionProto.node = 7
    GraphProto.node = 1, .initializer = 5, .sparse_initializer = 15
    NodeProto.attribute = 5
    AttributeProto.t = 5, .g = 6, .tensors = 10, .graphs = 11, .sparse_tensor = 22, .sparse_tensors = 23
    SparseTensorProto.values = 1, .indices = 2
    TensorProto.external_data = 13 (StringStringEntryProto: key = 1, value = 2), .data_location = 14 (EXTERNAL = 1)
"""

from __future__ import annotations

import mmap
import os

__all__ = ["external_data_locations", "OnnxFormatError"]


class OnnxFormatError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def _varint(buf, i: int, end: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= end or shift > 63:
            raise OnnxFormatError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(buf, start: int, end: int):
    """``(field_number, wire_type, value_or_span)`` of one message; length-delimited values as ``(lo, hi)``."""
    i = start
    while i < end:
        key, i = _varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i, end)
            yield field, wire, value
        elif wire == 1:
            i += 8
            yield field, wire, None
        elif wire == 5:
            i += 4
            yield field, wire, None
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if i + n > end:
                raise OnnxFormatError("length-delimited field runs past its message")
            yield field, wire, (i, i + n)
            i += n
        else:  # groups (3, 4) are not used by onnx.proto
            raise OnnxFormatError(f"unexpected protobuf wire type {wire}")
        if i > end:
            raise OnnxFormatError("field runs past its message")


# message kind → {field number: kind of the sub-message}
_CHILDREN = {
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
}


def _entry(buf, lo: int, hi: int) -> tuple[bytes, bytes]:
    key = value = b""
    for f, w, v in _fields(buf, lo, hi):
        if w == 2 and f == 1:
            key = bytes(buf[v[0]:v[1]])
        elif w == 2 and f == 2:
            value = bytes(buf[v[0]:v[1]])
    return key, value


def _walk(buf, kind: str, lo: int, hi: int, out: list, depth: int) -> None:
    if depth > 64:
        raise OnnxFormatError("messages nested more than 64 deep")
    if kind == "tensor":
        external = False
        location = None
        for f, w, v in _fields(buf, lo, hi):
            if f == 14 and w == 0 and v == 1:
                external = True
            elif f == 13 and w == 2:
                external = True
                k, val = _entry(buf, *v)
                if k == b"location":
                    location = val.decode("utf-8", "replace")
        if external:
            out.append(location if location is not None else "")
        return
    children = _CHILDREN[kind]
    for f, w, v in _fields(buf, lo, hi):
        if w == 2 and f in children:
            _walk(buf, children[f], v[0], v[1], out, depth + 1)


def external_data_locations(path: str | os.PathLike) -> list[str]:
    """The ``location`` of every tensor stored outside the ONNX file ``path`` (empty: all data is embedded).

    Raises :class:`OnnxFormatError` when the file is not a well-formed protobuf message."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise OnnxFormatError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as buf:
            out: list[str] = []
            _walk(buf, "model", 0, size, out, 0)
            return out
