"""``/v2``: the Open Inference Protocol (KServe V2 / Triton HTTP), with the binary tensor and
classification extensions, so ``tritonclient.http`` and KServe clients work unchanged. The tensor codec is
``service.oip``; this module parses HTTP and shapes the answers."""

from __future__ import annotations

import asyncio
import json
from functools import partial
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from stageformer.core import __version__

from .. import oip
from ..bodies import PROCESS_PARSE_BYTES
from ..deps import Registry, State, require_api_key, wait_for_disconnect
from ..errors import not_found
from ..http_errors import error_responses
from ..model_config import model_config_json
from ..pipeline import ModelPipeline

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
secured = [Depends(require_api_key)]

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository", "model_configuration"]
# Bodies up to this size are decoded on the event loop (a few hundred microseconds at most); larger ones
# in the decode pool, so that parsing megabytes of JSON never stalls other requests or the health probes.
INLINE_DECODE_BYTES = 64 * 1024


@router.get("", summary="Server metadata", dependencies=secured, responses=error_responses(401))
def server_metadata() -> dict[str, Any]:
    return {"name": "stageformer", "version": __version__, "extensions": EXTENSIONS}


@router.get("/health/live", summary="Liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Readiness: every model loaded and warmed up")
async def ready(state: State) -> Response:
    if not state.ready:
        return JSONResponse({"ready": False}, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse({"ready": True})


def _model(registry: Registry, name: str, version: str) -> ModelPipeline:
    model = registry.lookup(name)
    if version != "1":
        raise not_found(f"model {name!r} has only version 1, not {version!r}")
    return model


@router.get("/models/{model}", summary="Model metadata", dependencies=secured, responses=error_responses(401, 404, 503))
@router.get("/models/{model}/versions/{version}", include_in_schema=False, dependencies=secured)
def model_metadata(model: str, registry: Registry, version: str = "1") -> dict[str, Any]:
    served = _model(registry, model, version)
    info, spec = served.info, served.input_spec
    return {
        "name": info.name,
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}],
        "outputs": [{"name": info.output_name, "datatype": "FP32", "shape": [-1, info.num_classes]}],
        "parameters": {
            "labels": list(info.labels),
            "preprocess": json.loads(info.preprocess.to_json()),
            "provider": served.runtime.provider,
            "max_batch_size": served.batcher.max_batch_size,
            "max_batch_size_measured": bool(served.runtime.batch_throughput),
            "images_per_second_by_batch_size": {
                str(b): round(r, 1) for b, r in served.runtime.batch_throughput.items()
            },
            "max_queue_delay_ms": served.batcher.max_queue_delay_s * 1000.0,
            "lanes": len(served.runtime.lanes),
            "images_per_second_full_session_vs_lanes": {
                k: round(r, 1) for k, r in served.runtime.lane_throughput.items()
            },
        },
    }


@router.get(
    "/models/{model}/config",
    summary="Model configuration, as Triton's ModelConfig",
    dependencies=secured,
    responses=error_responses(401, 404, 503),
)
@router.get("/models/{model}/versions/{version}/config", include_in_schema=False, dependencies=secured)
def config(model: str, registry: Registry, version: str = "1") -> dict[str, Any]:
    return model_config_json(_model(registry, model, version))


@router.get(
    "/models/{model}/ready", summary="Model readiness", dependencies=secured, responses=error_responses(401, 404, 503)
)
@router.get("/models/{model}/versions/{version}/ready", include_in_schema=False, dependencies=secured)
def model_ready(model: str, registry: Registry, version: str = "1") -> dict[str, Any]:
    _model(registry, model, version)
    return {"name": model, "ready": True}


# --- inference ----------------------------------------------------------------------------------


_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string", "enum": list(oip.DATATYPES)},
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
    responses=error_responses(400, 401, 404, 408, 413, 500, 503, 504),
)
@router.post("/models/{model}/versions/{version}/infer", include_in_schema=False, dependencies=secured)
async def infer(model: str, request: Request, state: State, registry: Registry, version: str = "1") -> Response:
    served = _model(registry, model, version)
    with served.arrival() as announcement:
        body = await request.body()
        header_length = request.headers.get(oip.HEADER_LENGTH)
        decode = partial(oip.decode_request, body, header_length, served.input_spec)
        if len(body) <= INLINE_DECODE_BYTES:
            parsed, tensor = decode()
        elif header_length is None and len(body) > PROCESS_PARSE_BYTES:  # millions of JSON numbers
            parsed, tensor = await state.json_parser.decode(body, served.input_spec)
        else:
            parsed, tensor = await asyncio.get_running_loop().run_in_executor(state.decode_pool, decode)
        wanted = oip.output_requests(parsed, served.info.output_name)
        logits = await served.infer(announcement, tensor, partial(wait_for_disconnect, request))
    outputs, blobs = oip.encode_outputs(logits, served.info.labels, served.info.output_name, wanted)
    content, header_length_out = oip.response_body(served.name, parsed.id, outputs, blobs)
    if header_length_out is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length_out)})  # fmt: skip
