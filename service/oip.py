"""The Open Inference Protocol's tensor codec (KServe V2 / Triton), as pure functions: request bytes to a
checked NumPy tensor, logits to response outputs. No HTTP, no model: ``TensorSpec`` says what the model
takes. Used by the HTTP route (JSON and the binary tensor extension) and by gRPC (typed and raw contents).

Every malformed request is a ``ServiceError`` of kind bad input whose message names the field: the request
is validated against a schema (pydantic models of the protocol's request) before any value is used.

Large requests are decoded off the event loop, and the work is shaped so that it never holds Python's
global lock for long (other threads, the event loop among them, keep running): JSON is parsed by
pydantic-core's parser, which lets other threads run, and tensor data is converted in slices of
``SLICE_VALUES`` values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError
from pydantic_core import from_json, to_json

from .errors import bad_input
from .postprocess import classification_strings

HEADER_LENGTH = "inference-header-content-length"  # the binary tensor extension's header (lower case)
DATATYPES: dict[str, np.dtype[Any]] = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype(np.float32)}
MAX_DIM = 1 << 24  # no dimension of a request is larger; bounds the arithmetic before any allocation
SLICE_VALUES = 1 << 14  # tensor values converted per call (a fraction of a millisecond with the lock held)

Scalar = StrictBool | StrictInt | StrictFloat | StrictStr
Parameters = dict[str, Scalar]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class RequestInput(_Message):
    name: StrictStr
    shape: list[Annotated[StrictInt, Field(ge=0, le=MAX_DIM)]]
    datatype: StrictStr
    parameters: Parameters | None = None
    data: Any = None  # nested lists of numbers, checked (off the event loop for large bodies) by ``tensor_from_values``


class RequestOutput(_Message):
    name: StrictStr
    parameters: Parameters | None = None


class InferenceRequest(_Message):
    id: StrictStr | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


@dataclass(frozen=True)
class TensorSpec:
    """The one input a model takes: its name, datatype and shape (``-1`` for the batch axis)."""

    name: str
    datatype: str  # a key of DATATYPES
    shape: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype[Any]:
        return DATATYPES[self.datatype]


# --- requests ---------------------------------------------------------------------------------------


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON header, binary tensor data) of a request body; all JSON without the binary extension."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise bad_input(f"Inference-Header-Content-Length must be an integer, got {header_length[:40]!r}") from None
    if not 0 <= n <= len(body):
        raise bad_input(f"Inference-Header-Content-Length {n} is outside the body of {len(body)} bytes")
    return body[:n], body[n:]


def _field_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(x) for x in err["loc"]) or "request"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_request(header: bytes) -> InferenceRequest:
    """The JSON header of an inference request, validated against the protocol's request schema."""
    try:
        payload = from_json(header)
    except ValueError as exc:  # malformed, invalid UTF-8, nested too deeply, a number out of range
        if "recursion limit" in str(exc):
            raise bad_input(f"the inference request nests JSON too deeply ({exc})") from None
        raise bad_input(f"the inference request is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(payload, dict):
        raise bad_input("the inference request must be a JSON object with 'inputs'")
    try:
        return InferenceRequest.model_validate(payload)
    except ValidationError as exc:
        raise bad_input(f"malformed inference request: {_field_errors(exc)}") from None


def check_tensor(name: str, datatype: str, shape: Sequence[int], spec: TensorSpec) -> int:
    """Check a tensor's header against what the model takes; returns its number of values."""
    if name != spec.name:
        raise bad_input(f"unknown input {name!r}; this model has one input, {spec.name!r}")
    if datatype != spec.datatype:
        raise bad_input(f"input {name!r} has datatype {datatype!r}; this model takes {spec.datatype}")
    if any(d < 0 or d > MAX_DIM for d in shape):
        raise bad_input(f"input {name!r}: shape {list(shape)} has a negative or huge dimension")
    want = list(spec.shape[1:])
    if len(shape) != len(spec.shape) or list(shape[1:]) != want or shape[0] < 1:
        raise bad_input(
            f"input {name!r}: shape {list(shape)} does not fit the model; send [batch, {', '.join(map(str, want))}]"
        )
    return math.prod(shape)


def tensor_from_bytes(name: str, shape: Sequence[int], raw: bytes | memoryview, spec: TensorSpec) -> np.ndarray:
    """A tensor from its little-endian, row-major bytes (binary extension, gRPC raw contents)."""
    count = math.prod(shape)
    need = count * spec.dtype.itemsize
    if len(raw) != need:
        raise bad_input(f"input {name!r}: {len(raw)} bytes, but shape {list(shape)} of {spec.datatype} needs {need}")
    array = np.frombuffer(raw, dtype=spec.dtype.newbyteorder("<"), count=count).reshape(shape)
    return _finite(name, array)


_END = object()


def _flatten(data: Any, max_values: int) -> list[Any]:
    """Tensor data, flat or nested lists (row-major), as one flat list; no recursion, so no depth limit
    to trip over. Stops once more than ``max_values`` values were seen."""
    if not isinstance(data, list):
        return [data]
    flat: list[Any] = []
    stack = [iter(data)]
    while stack and len(flat) <= max_values:
        value = next(stack[-1], _END)
        if value is _END:
            stack.pop()
        elif isinstance(value, list):
            stack.append(iter(value))
        else:
            flat.append(value)
    return flat


def _numbers(name: str, data: list[Any], count: int) -> np.ndarray:
    """``data`` (flat, or nested with equal lengths at each level) as one flat float64 array, converted a
    slice of the outermost list at a time. ``ValueError`` for ragged nesting."""
    if not data:
        raise ValueError("no values")
    first = np.asarray(data[0])  # one row, to know how many values each element holds
    step = max(1, SLICE_VALUES // max(1, first.size))
    parts = []
    for start in range(0, len(data), step):
        part = np.asarray(data[start : start + step])  # type inferred: numbers give int64/float64, others not
        if part.dtype.kind not in "iuf":
            what = "booleans" if part.dtype.kind == "b" else "numbers out of range, strings or objects"
            raise bad_input(f"input {name!r}: data must be numbers, found {what}")
        parts.append(part.reshape(-1).astype(np.float64))
    values = np.concatenate(parts)
    if values.size != count:
        raise ValueError("the nesting does not match the shape")
    return values


def tensor_from_values(name: str, shape: Sequence[int], data: Any, spec: TensorSpec) -> np.ndarray:
    """A tensor from JSON values (flat or nested lists, row-major)."""
    count = math.prod(shape)
    try:
        values = _numbers(name, data, count) if isinstance(data, list) else None
    except ValueError:  # ragged nesting, or nested otherwise than the shape: walk it value by value
        values = None
    if values is None:
        flat = _flatten(data, count)
        if len(flat) != count:
            seen = f"{len(flat)}" if len(flat) <= count else f"more than {count}"
            raise bad_input(f"input {name!r}: {seen} values for shape {list(shape)} ({count} values)")
        if not all(type(v) is int or type(v) is float for v in flat):
            raise bad_input(f"input {name!r}: data must be numbers (not strings, booleans or objects)")
        try:
            values = np.asarray(flat, dtype=np.float64)
        except OverflowError:
            raise bad_input(f"input {name!r}: a value is too large for a number") from None
    return tensor_from_numbers(name, shape, values, spec)


def tensor_from_numbers(name: str, shape: Sequence[int], values: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """A tensor from a flat array of numbers (JSON data, gRPC typed contents), checked for count and range."""
    count = math.prod(shape)
    if values.size != count:
        raise bad_input(f"input {name!r}: {values.size} values for shape {list(shape)} ({count} values)")
    if (
        spec.datatype == "UINT8"
        and count
        and (values.min() < 0 or values.max() > 255 or np.any(values != np.floor(values)))
    ):
        raise bad_input(f"input {name!r}: UINT8 data must be integers in 0..255")
    with np.errstate(over="ignore"):  # FP32 overflow becomes Inf, refused below
        array = values.astype(spec.dtype).reshape(shape)
    return _finite(name, array)


def _finite(name: str, array: np.ndarray) -> np.ndarray:
    if array.dtype == np.float32 and not np.isfinite(array).all():
        raise bad_input(f"input {name!r}: FP32 data holds NaN or Inf")
    return array


def decode_inputs(request: InferenceRequest, binary: bytes, spec: TensorSpec) -> np.ndarray:
    """The one input tensor of a parsed request, from JSON data or the binary bytes that follow the header."""
    if len(request.inputs) != 1:
        raise bad_input(f"'inputs' must list exactly one tensor, {spec.name!r}; got {len(request.inputs)}")
    given = request.inputs[0]
    check_tensor(given.name, given.datatype, given.shape, spec)
    params = given.parameters or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if type(size) is not int or size < 0 or size > len(binary):
            raise bad_input(
                f"input {given.name!r}: binary_data_size {size!r} does not fit the {len(binary)} binary bytes"
            )
        array = tensor_from_bytes(given.name, given.shape, memoryview(binary)[:size], spec)
        if size != len(binary):
            raise bad_input(f"{len(binary) - size} binary bytes follow the JSON header that no input claims")
        return array
    if binary:
        raise bad_input(f"{len(binary)} binary bytes follow the JSON header that no input claims")
    if given.data is None:
        raise bad_input(f"input {given.name!r} has neither 'data' nor parameters.binary_data_size")
    return tensor_from_values(given.name, given.shape, given.data, spec)


# --- responses --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputRequest:
    """What the client asked of the one output: top-k classification strings or logits, binary or JSON."""

    classification: int | None  # k of the classification extension, or None for the logits
    binary: bool


def output_requests(request: InferenceRequest, output_name: str) -> list[OutputRequest]:
    """The outputs a parsed request asks for (the logits, as JSON, when it names none)."""
    binary_default = (request.parameters or {}).get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise bad_input(f"parameters.binary_data_output must be true or false, got {binary_default!r}")
    if request.outputs is None:
        return [OutputRequest(None, binary_default)]
    wanted = []
    for out in request.outputs:
        if out.name != output_name:
            raise bad_input(f"unknown output {out.name!r}; this model has one output, {output_name!r}")
        params = out.parameters or {}
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise bad_input(f"outputs.parameters.binary_data must be true or false, got {binary!r}")
        k = params.get("classification")
        if k is not None and (type(k) is not int or k < 1):
            raise bad_input(f"outputs.parameters.classification must be a positive integer, got {k!r}")
        wanted.append(OutputRequest(k, binary))
    return wanted


def encode_outputs(
    logits: np.ndarray, labels: Sequence[str], output_name: str, wanted: Sequence[OutputRequest]
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Response ``outputs`` entries and, in the same order, the binary blobs of those sent as binary."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for want in wanted:
        if want.classification is not None:
            tensor = classification_strings(logits, labels, want.classification)
            entry: dict[str, Any] = {"name": output_name, "datatype": "BYTES", "shape": list(tensor.shape)}
            if want.binary:
                blob = b"".join(len(s.encode()).to_bytes(4, "little") + s.encode() for s in tensor.ravel())
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = [str(s) for s in tensor.ravel()]
        else:
            entry = {"name": output_name, "datatype": "FP32", "shape": list(logits.shape)}
            if want.binary:
                blob = np.ascontiguousarray(logits, dtype="<f4").tobytes()
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = logits.ravel().tolist()
        entries.append(entry)
    return entries, blobs


def response_body(
    model_name: str, request_id: str | None, outputs: list[dict[str, Any]], blobs: list[bytes]
) -> tuple[bytes, int | None]:
    """The response body and, when binary blobs follow the JSON, the JSON header's length."""
    result: dict[str, Any] = {"model_name": model_name, "model_version": "1", "outputs": outputs}
    if request_id is not None:
        result["id"] = request_id
    header = to_json(result)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def decode_request(body: bytes, header_length: str | None, spec: TensorSpec) -> tuple[InferenceRequest, np.ndarray]:
    """Body bytes to the parsed request and its input tensor: everything CPU-heavy of a request, in one
    call that the server may run off the event loop."""
    header, binary = split_body(body, header_length)
    request = parse_request(header)
    return request, decode_inputs(request, binary, spec)


def decode_json_request(body: bytes, spec: TensorSpec) -> tuple[InferenceRequest, np.ndarray]:
    """``decode_request`` of an all-JSON body, with the request's ``data`` left out of what it returns (the
    tensor has it): what a worker process sends back is the tensor's bytes, not millions of Python numbers."""
    request, tensor = decode_request(body, None, spec)
    inputs = [given.model_copy(update={"data": None}) for given in request.inputs]
    return request.model_copy(update={"inputs": inputs}), tensor
