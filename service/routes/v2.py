"""``/v2``: the Open Inference Protocol (KServe V2 / Triton HTTP), with the binary tensor and
classification extensions, so ``tritonclient.http`` and KServe clients work unchanged."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from stageformer.core import __version__

from ..deps import Registry, State, admitted, lookup_model, require_api_key, run_inference
from ..errors import APIError, error_responses
from ..registry import ServedModel
from .v1 import softmax

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
secured = [Depends(require_api_key)]

HEADER_LENGTH = "inference-header-content-length"
DATATYPES: dict[str, np.dtype[Any]] = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype(np.float32)}
MAX_DIM = 1 << 24


@router.get("", summary="Server metadata", dependencies=secured, responses=error_responses(401))
def server_metadata() -> dict[str, Any]:
    return {"name": "stageformer", "version": __version__, "extensions": ["binary_tensor_data", "classification"]}


@router.get("/health/live", summary="Liveness")
def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Readiness: every model loaded and warmed up")
def ready(state: State) -> Response:
    if not state.ready:
        return JSONResponse({"ready": False}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"ready": True})


def _datatype(model: ServedModel) -> str:
    return "UINT8" if model.info.input_format == "raw" else "FP32"


@router.get("/models/{model}", summary="Model metadata", dependencies=secured, responses=error_responses(401, 404, 503))
@router.get("/models/{model}/versions/{version}", include_in_schema=False, dependencies=secured)
def model_metadata(model: str, registry: Registry, version: str = "1") -> dict[str, Any]:
    served = _model(registry, model, version)
    info = served.info
    return {
        "name": info.name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": info.input_name, "datatype": _datatype(served), "shape": [-1, *info.sample_shape]}],
        "outputs": [{"name": info.output_name, "datatype": "FP32", "shape": [-1, info.num_classes]}],
        "parameters": {
            "labels": list(info.labels),
            "preprocess": json.loads(info.preprocess.to_json()),
            "provider": served.runtime.provider,
            "max_batch_size": served.batcher.max_batch_size,
            "max_queue_delay_ms": served.batcher.max_queue_delay_s * 1000.0,
        },
    }


@router.get(
    "/models/{model}/ready", summary="Model readiness", dependencies=secured, responses=error_responses(401, 404, 503)
)
@router.get("/models/{model}/versions/{version}/ready", include_in_schema=False, dependencies=secured)
def model_ready(model: str, registry: Registry, version: str = "1") -> dict[str, Any]:
    _model(registry, model, version)
    return {"name": model, "ready": True}


def _model(registry: Registry, name: str, version: str) -> ServedModel:
    served = lookup_model(registry, name)
    if version != "1":
        raise APIError(404, f"model {name!r} has only version 1, not {version!r}")
    return served


# --- inference ----------------------------------------------------------------------------------


async def _read_request(request: Request) -> tuple[dict[str, Any], bytes]:
    body = await request.body()
    header_length = request.headers.get(HEADER_LENGTH)
    if header_length is None:
        json_part, binary = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise APIError(400, f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 <= n <= len(body):
            raise APIError(400, f"{HEADER_LENGTH} {n} is outside the body of {len(body)} bytes")
        json_part, binary = body[:n], body[n:]
    try:
        payload = json.loads(json_part)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the inference request is not valid JSON: {exc}") from None
    except RecursionError:
        raise APIError(400, "the inference request nests JSON too deeply") from None
    if not isinstance(payload, dict):
        raise APIError(400, "the inference request must be a JSON object with 'inputs'")
    return payload, binary


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


def _decode_input(spec: Any, binary: bytes, offset: int, served: ServedModel) -> tuple[np.ndarray, int]:
    """The input tensor ``spec`` describes, checked against the model; returns it and the new binary offset."""
    info = served.info
    if not isinstance(spec, dict):
        raise APIError(400, "each entry of 'inputs' must be an object with name, shape, datatype and data")
    name, shape, datatype = spec.get("name"), spec.get("shape"), spec.get("datatype")
    if name != info.input_name:
        raise APIError(400, f"unknown input {name!r}; model {info.name!r} has one input, {info.input_name!r}")
    expected_type = _datatype(served)
    if datatype != expected_type:
        raise APIError(400, f"input {name!r} has datatype {datatype!r}; this model takes {expected_type}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise APIError(400, f"input {name!r}: shape must be a list of integers, got {shape!r}")
    if any(d < 0 or d > MAX_DIM for d in shape):
        raise APIError(400, f"input {name!r}: shape {shape} has a negative or huge dimension")
    want = list(info.sample_shape)
    if len(shape) != len(want) + 1 or shape[1:] != want or shape[0] < 1:
        raise APIError(
            400, f"input {name!r}: shape {shape} does not fit the model; send [batch, {', '.join(map(str, want))}]"
        )
    count = math.prod(shape)
    dtype = DATATYPES[datatype]
    params = spec.get("parameters") or {}
    if "binary_data_size" in params:
        size = params["binary_data_size"]
        if not isinstance(size, int) or size < 0 or offset + size > len(binary):
            raise APIError(
                400, f"input {name!r}: binary_data_size {size!r} does not fit the {len(binary)} binary bytes"
            )
        if size != count * dtype.itemsize:
            raise APIError(
                400,
                f"input {name!r}: {size} binary bytes, but shape {shape} of {datatype} needs {count * dtype.itemsize}",
            )
        array = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += size
    else:
        if "data" not in spec:
            raise APIError(400, f"input {name!r} has neither 'data' nor parameters.binary_data_size")
        flat = _flatten(spec["data"], count)
        if len(flat) != count:
            seen = f"{len(flat)}" if len(flat) <= count else f"more than {count}"
            raise APIError(400, f"input {name!r}: {seen} values for shape {shape} ({count} values)")
        try:
            values = np.asarray(flat, dtype=np.float64)
        except (TypeError, ValueError):
            raise APIError(400, f"input {name!r}: data must be numbers") from None
        if datatype == "UINT8" and (values.min() < 0 or values.max() > 255 or np.any(values != np.floor(values))):
            raise APIError(400, f"input {name!r}: UINT8 data must be integers in 0..255")
        with np.errstate(over="ignore"):  # FP32 overflow becomes Inf, refused below
            array = values.astype(dtype).reshape(shape)
    if dtype == np.float32 and not np.isfinite(array).all():
        raise APIError(400, f"input {name!r}: FP32 data holds NaN or Inf")
    return array, offset


def _classification(logits: np.ndarray, labels: tuple[str, ...], k: int) -> np.ndarray:
    probs = softmax(logits.astype(np.float64))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    rows = [[f"{probs[b, i]:f}:{i}:{labels[i]}" for i in order[b]] for b in range(len(order))]
    return np.asarray(rows, dtype=object)


_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string", "enum": list(DATATYPES)},
        "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
        "data": {"type": "array", "items": {}, "description": "row-major values, flat or nested"},
    },
}
_OUTPUT = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "parameters": {
            "type": "object",
            "properties": {"binary_data": {"type": "boolean"}, "classification": {"type": "integer", "minimum": 1}},
        },
    },
}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "inputs": {"type": "array", "items": _TENSOR},
                        "outputs": {"type": "array", "items": _OUTPUT},
                        "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
                    },
                }
            },
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "binary tensor extension: the JSON header (Inference-Header-Content-Length bytes), "
                "then the tensors' bytes",
            },
        },
    }
}


@router.post(
    "/models/{model}/infer",
    summary="Inference (JSON or binary tensors)",
    dependencies=secured,
    openapi_extra=_INFER_BODY,
    responses=error_responses(400, 401, 404, 413, 500, 503, 504),
)
@router.post("/models/{model}/versions/{version}/infer", include_in_schema=False, dependencies=secured)
async def infer(model: str, request: Request, state: State, registry: Registry, version: str = "1") -> Response:
    served = _model(registry, model, version)
    with admitted(state, served):  # before the body is read: a full server refuses at once
        return await _infer(served, request, state)


async def _infer(served: ServedModel, request: Request, state: State) -> Response:
    info = served.info
    payload, binary = await _read_request(request)
    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise APIError(400, f"'inputs' must list exactly one tensor, {info.input_name!r}")
    array, used = _decode_input(inputs[0], binary, 0, served)
    if used != len(binary):
        raise APIError(400, f"{len(binary) - used} binary bytes follow the JSON header that no input claims")

    request_params = payload.get("parameters") or {}
    outputs = payload.get("outputs") or [{"name": info.output_name}]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise APIError(400, "'outputs' must be a list of objects")
    for out in outputs:
        if out.get("name") != info.output_name:
            raise APIError(400, f"unknown output {out.get('name')!r}; model {info.name!r} has {info.output_name!r}")
    if info.input_format == "normalized" and array.dtype != np.float32:
        array = array.astype(np.float32)
    rows = await run_inference(state, served, list(array), request)
    logits = np.stack(rows)

    response_outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out in outputs:
        params = out.get("parameters") or {}
        want_binary = bool(params.get("binary_data", request_params.get("binary_data_output", False)))
        k = params.get("classification")
        if k is not None:
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise APIError(400, f"parameters.classification must be a positive integer, got {k!r}")
            tensor = _classification(logits, info.labels, min(k, info.num_classes))
            entry: dict[str, Any] = {"name": info.output_name, "datatype": "BYTES", "shape": list(tensor.shape)}
            if want_binary:
                blob = b"".join(len(s.encode()).to_bytes(4, "little") + s.encode() for s in tensor.ravel())
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = [str(s) for s in tensor.ravel()]
        else:
            entry = {"name": info.output_name, "datatype": "FP32", "shape": list(logits.shape)}
            if want_binary:
                blob = np.ascontiguousarray(logits, dtype="<f4").tobytes()
                entry["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                entry["data"] = logits.ravel().tolist()
        response_outputs.append(entry)

    result: dict[str, Any] = {"model_name": info.name, "model_version": "1", "outputs": response_outputs}
    if "id" in payload:
        result["id"] = payload["id"]
    header = json.dumps(result).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
