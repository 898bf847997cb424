"""The Open Inference Protocol (KServe v2, Triton's HTTP/REST): request parsing and response encoding.

Tensors travel as JSON (`data`, row-major, flattened) or, with Triton's binary tensor extension, as
raw bytes after a JSON header whose length the `Inference-Header-Content-Length` header gives: an
input says `parameters.binary_data_size`, and an output is sent binary when it (or the request,
`binary_data_output`) asks. BYTES elements in binary are a 4-byte little-endian length, then the
bytes. This is what tritonclient.http sends by default.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

HEADER_LENGTH = "Inference-Header-Content-Length"
_LENGTH = struct.Struct("<I")


class ProtocolError(ValueError):
    """A request the protocol cannot accept: a 400 with {"error": message}."""


class TensorIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: list[Any] | None = None


class OutputWanted(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class InferRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[TensorIn] = Field(min_length=1)
    outputs: list[OutputWanted] | None = None


def parse_request(body: bytes, header_length: str | None) -> tuple[InferRequest, dict[str, list[str]]]:
    """The request and each input's texts (every input of this API is BYTES)."""
    if header_length is not None:
        try:
            size = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} must be an integer, not {header_length!r}") from None
        if not 0 < size <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} is {size}, but the body has {len(body)} bytes")
        head, binary = body[:size], body[size:]
    else:
        head, binary = body, b""
    try:
        request = InferRequest.model_validate(json.loads(head))
    except RecursionError:
        raise ProtocolError("the inference request nests arrays or objects too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ProtocolError(f"the inference request is malformed: {where}: {first['msg']}") from None
        raise ProtocolError(f"the inference request is not valid JSON: {exc}") from None
    texts: dict[str, list[str]] = {}
    offset = 0
    for tensor in request.inputs:
        if tensor.name in texts:
            raise ProtocolError(f"input {tensor.name!r} is given twice")
        if tensor.datatype != "BYTES":
            raise ProtocolError(f"input {tensor.name!r} has datatype {tensor.datatype}; this model takes BYTES (texts)")
        if any(d < 0 for d in tensor.shape):
            raise ProtocolError(f"input {tensor.name!r} has shape {tensor.shape}; a request's shape has no -1")
        count = math.prod(tensor.shape)
        binary_size = tensor.parameters.get("binary_data_size")
        if binary_size is not None:
            if not isinstance(binary_size, int) or binary_size < 0 or offset + binary_size > len(binary):
                raise ProtocolError(f"input {tensor.name!r}: binary_data_size {binary_size!r} overruns the body")
            values = _decode_bytes(binary[offset : offset + binary_size], tensor.name)
            offset += binary_size
        elif tensor.data is not None:
            values = _flatten(tensor.data, tensor.name)
        else:
            raise ProtocolError(f"input {tensor.name!r} has neither data nor binary_data_size")
        if len(values) != count:
            raise ProtocolError(
                f"input {tensor.name!r} has {len(values)} elements; its shape {tensor.shape} says {count}"
            )
        texts[tensor.name] = values
    if offset != len(binary):
        raise ProtocolError(f"the body has {len(binary) - offset} bytes after the last binary input")
    return request, texts


def _flatten(data: list[Any], name: str) -> list[str]:
    out: list[str] = []
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, str):
            out.append(item)
        else:
            raise ProtocolError(f"input {name!r}: BYTES elements are strings, not {type(item).__name__}")
    return out


def _decode_bytes(raw: bytes, name: str) -> list[str]:
    values, offset = [], 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element's length is cut off")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element overruns its tensor")
        try:
            values.append(raw[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise ProtocolError(f"input {name!r}: element {len(values)} is not UTF-8 text") from None
        offset += length
    return values


def encode_response(
    request: InferRequest, model: str, version: str, outputs: dict[str, np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """The response body, and the headers it needs (the JSON header's length, when any output is binary)."""
    wanted = {o.name: o for o in request.outputs} if request.outputs else None
    if wanted is not None:
        unknown = sorted(set(wanted) - set(outputs))
        if unknown:
            raise ProtocolError(f"no output named {unknown[0]!r}; this model's outputs: {', '.join(outputs)}")
    all_binary = bool(request.parameters.get("binary_data_output"))
    described, blobs = [], []
    for name, array in outputs.items():
        if wanted is not None and name not in wanted:
            continue
        array = np.ascontiguousarray(array, dtype="<f4")
        tensor: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(array.shape)}
        asked = wanted[name].parameters.get("binary_data") if wanted else None
        binary = all_binary if asked is None else bool(asked)  # an output's own choice wins
        if binary:
            blob = array.tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.ravel().tolist()
        described.append(tensor)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": described}
    if request.id is not None:
        head["id"] = request.id
    header = json.dumps(head, separators=(",", ":")).encode()
    if not blobs:
        return header, {}
    return header + b"".join(blobs), {HEADER_LENGTH: str(len(header))}


def metadata(name: str, versions: list[str], task: str, dims: int, platform: str) -> dict[str, Any]:
    """Model metadata: what the inputs and outputs are called, their datatypes and shapes."""
    if task == "rerank":
        inputs = [
            {"name": "query", "datatype": "BYTES", "shape": [1]},
            {"name": "documents", "datatype": "BYTES", "shape": [-1]},
        ]
        outputs = [{"name": "scores", "datatype": "FP32", "shape": [-1]}]
    else:
        inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        outputs = [{"name": "embedding", "datatype": "FP32", "shape": [-1, dims]}]
    return {"name": name, "versions": versions, "platform": platform, "inputs": inputs, "outputs": outputs}
