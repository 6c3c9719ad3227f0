"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` (Triton's ``grpc_service.proto``, a
superset of KServe's v2 gRPC protocol, with the same package and method paths), served with ``grpc.aio`` on its
own port, in the same process and on the same event loop as HTTP. It shares the models, the batchers,
admission, limits, metrics, the API key (``authorization: Bearer KEY`` metadata) and the drain.

The message classes and the servicer base come from ``tritonclient[grpc]``, which ships them generated from
Triton's own ``.proto`` files: the exact messages ``tritonclient.grpc`` and KServe clients send, with no
``.proto`` copy or code generation step to keep in step here.

Served: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelConfig, ModelInfer (raw and
typed input contents; outputs as raw contents; the classification extension), RepositoryIndex,
RepositoryModelLoad, RepositoryModelUnload. Other methods answer UNIMPLEMENTED.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from stageformer.core import __version__

from .. import oip
from ..errors import KINDS, Kind, ServiceError, bad_input, not_found
from ..model_config import model_config
from ..pipeline import Disconnected, ModelPipeline
from ..postprocess import classification_strings
from ..registry import ModelRegistry
from ..security import bearer_matches
from ..state import AppState
from .v2 import EXTENSIONS

logger = logging.getLogger(__name__)

SERVICE = "/inference.GRPCInferenceService/"
Reply = TypeVar("Reply")
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Reply]]


def rpc(guarded: bool = True) -> Callable[[Handler[Reply]], Handler[Reply]]:
    """A servicer method with the API key check (when ``guarded``), metrics, and ``ServiceError`` kinds turned
    into gRPC status codes; an unexpected error is INTERNAL with no details, and logged."""

    def decorate(method: Handler[Reply]) -> Handler[Reply]:
        @functools.wraps(method)
        async def call(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Reply:
            started, code = time.perf_counter(), grpc.StatusCode.OK
            try:
                if guarded:
                    self.check_key(context)
                return await method(self, request, context)
            except ServiceError as exc:
                code = grpc.StatusCode[KINDS[exc.kind].grpc_code]
                self.state.metrics.rejections.labels(exc.model or "", exc.reason).inc()
                await context.abort(code, exc.message)
            except (grpc.aio.AbortError, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                logger.exception("unhandled error in %s", method.__name__)
                await context.abort(code, "internal server error; the server logged the details")
            finally:
                route = SERVICE + method.__name__
                self.state.metrics.requests.labels(route, "GRPC", code.name).inc()
                self.state.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)
            raise AssertionError("unreachable: abort raises")

        return call

    return decorate


def _gone(context: grpc.aio.ServicerContext) -> Disconnected:
    """Completes when the call ends before its answer: the client cancelled or its deadline passed."""

    async def wait() -> None:
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[None] = loop.create_future()
        context.add_done_callback(lambda _: loop.call_soon_threadsafe(_settle, ended))
        await ended

    return wait


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _infer_parameter(param: pb.InferParameter) -> Any:
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind is not None else None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, state: AppState) -> None:
        self.state = state

    def check_key(self, context: grpc.aio.ServicerContext) -> None:
        key = self.state.settings.api_key
        if key is None:
            return
        metadata = dict(context.invocation_metadata() or ())
        if not bearer_matches(metadata.get("authorization"), key):
            raise ServiceError(
                Kind.UNAUTHENTICATED, "missing or wrong API key; send `authorization: Bearer <key>` metadata"
            )

    def registry(self) -> ModelRegistry:
        return self.state.serving()

    def model(self, name: str, version: str) -> ModelPipeline:
        model = self.registry().lookup(name)
        if version not in ("", "1"):
            raise not_found(f"model {name!r} has only version 1, not {version!r}")
        return model

    # --- health and metadata ------------------------------------------------------------------------

    @rpc(guarded=False)
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        return pb.ServerLiveResponse(live=True)

    @rpc(guarded=False)
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        return pb.ServerReadyResponse(ready=self.state.ready)

    @rpc()
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        registry = self.state.registry
        ready = self.state.ready and registry is not None and request.name in registry.models
        return pb.ModelReadyResponse(ready=ready and request.version in ("", "1"))

    @rpc()
    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:  # noqa: N802
        return pb.ServerMetadataResponse(name="stageformer", version=__version__, extensions=EXTENSIONS)

    @rpc()
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:  # noqa: N802
        model = self.model(request.name, request.version)
        spec, info = model.input_spec, model.info
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=info.name,
            versions=["1"],
            platform="onnxruntime_onnx",
            inputs=[tensor(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))],
            outputs=[tensor(name=info.output_name, datatype="FP32", shape=[-1, info.num_classes])],
        )

    @rpc()
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:  # noqa: N802
        return pb.ModelConfigResponse(config=model_config(self.model(request.name, request.version)))

    # --- inference ----------------------------------------------------------------------------------

    @rpc()
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        model = self.model(request.model_name, request.model_version)
        with model.arrival() as announcement:
            tensor = _input_tensor(request, model.input_spec)
            wanted = _output_requests(request, model.info.output_name)
            logits = await model.infer(announcement, tensor, _gone(context))
        response = pb.ModelInferResponse(model_name=model.name, model_version="1", id=request.id)
        for want in wanted:
            output = response.outputs.add(name=model.info.output_name)
            if want.classification is None:
                output.datatype, output.shape[:] = "FP32", list(logits.shape)
                response.raw_output_contents.append(np.ascontiguousarray(logits, dtype="<f4").tobytes())
            else:
                strings = classification_strings(logits, model.info.labels, want.classification)
                output.datatype, output.shape[:] = "BYTES", list(strings.shape)
                response.raw_output_contents.append(
                    b"".join(len(s.encode()).to_bytes(4, "little") + s.encode() for s in strings.ravel())
                )
        return response

    # --- model repository ---------------------------------------------------------------------------

    def repository(self) -> Any:
        self.registry()  # UNAVAILABLE while starting or draining
        if self.state.repository is None:
            raise ServiceError(Kind.UNAVAILABLE, "the model repository is not running; try again shortly")
        return self.state.repository

    @rpc()
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Any) -> pb.RepositoryIndexResponse:  # noqa: N802
        entries = [e for e in self.repository().index() if not request.ready or e.state == "READY"]
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(name=e.name, version="1", state=e.state, reason=e.reason) for e in entries]
        )

    @rpc()
    async def RepositoryModelLoad(self, request: Any, context: Any) -> pb.RepositoryModelLoadResponse:  # noqa: N802
        await self.repository().load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc()
    async def RepositoryModelUnload(self, request: Any, context: Any) -> pb.RepositoryModelUnloadResponse:  # noqa: N802
        await self.repository().unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _input_tensor(request: pb.ModelInferRequest, spec: oip.TensorSpec) -> np.ndarray:
    """The one input of a ModelInfer request, from its raw contents or its typed contents."""
    if len(request.inputs) != 1:
        raise bad_input(f"inputs must hold exactly one tensor, {spec.name!r}; got {len(request.inputs)}")
    given = request.inputs[0]
    shape = list(given.shape)
    oip.check_tensor(given.name, given.datatype, shape, spec)
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise bad_input(
                f"raw_input_contents must hold one entry per input (1), got {len(request.raw_input_contents)}"
            )
        return oip.tensor_from_bytes(given.name, shape, request.raw_input_contents[0], spec)
    typed = given.contents.uint_contents if spec.datatype == "UINT8" else given.contents.fp32_contents
    field = "uint_contents" if spec.datatype == "UINT8" else "fp32_contents"
    if not typed:
        raise bad_input(f"input {given.name!r} has no data: send raw_input_contents or contents.{field}")
    return oip.tensor_from_numbers(given.name, shape, np.asarray(typed, dtype=np.float64), spec)


def _output_requests(request: pb.ModelInferRequest, output_name: str) -> list[oip.OutputRequest]:
    if not request.outputs:
        return [oip.OutputRequest(None, True)]
    wanted = []
    for out in request.outputs:
        if out.name != output_name:
            raise bad_input(f"unknown output {out.name!r}; this model has one output, {output_name!r}")
        k = _infer_parameter(out.parameters["classification"]) if "classification" in out.parameters else None
        if k is not None and (type(k) is not int or k < 1):
            raise bad_input(f"outputs.parameters.classification must be a positive integer, got {k!r}")
        wanted.append(oip.OutputRequest(k, True))
    return wanted


async def start_grpc(state: AppState) -> grpc.aio.Server:
    """The gRPC server on ``--host``:``--grpc-port``, started on the running event loop."""
    settings = state.settings
    limit = settings.max_body_bytes
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        maximum_concurrent_rpcs=settings.max_connections,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(state), server)
    address = f"{settings.host}:{settings.grpc_port}"
    server.add_insecure_port(address)
    await server.start()
    logger.info("gRPC (inference.GRPCInferenceService) on %s", address)
    return server
