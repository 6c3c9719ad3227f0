"""The closed loop over gRPC: ``inference.GRPCInferenceService/ModelInfer`` (Triton's protocol, which our server
speaks on ``--grpc-port``) with the tensor in ``raw_input_contents``, as ``tritonclient.grpc`` sends it.

Each distinct tensor's ``ModelInferRequest`` is built with ``tritonclient.grpc.service_pb2`` and serialized once,
before the clock starts; the clients send those bytes through a ``grpc.aio`` multi-callable that neither
serializes requests nor parses answers (the HTTP clients do not parse theirs either), so a request costs the
client little more than gRPC's own work. gRPC's status is the outcome: ``OK`` or the code's name.

Channels: by default each client has its own channel and its own HTTP/2 connection (``channels=0``), as each
HTTP client has its own keep-alive connection; ``channels=n`` shares n channels among the clients, their calls
multiplexed as HTTP/2 streams. Channels get a local subchannel pool: gRPC would otherwise put channels to the same
address on one connection.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bench.loadgen import Hook, LevelResult, LoadError, LoadPlan, Outcome, check_loopback, closed_loop

if TYPE_CHECKING:
    import grpc
    import numpy as np

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class GrpcRequest:
    """One prepared ModelInfer request: the serialized ``ModelInferRequest`` sent on the wire."""

    payload: bytes

    @classmethod
    def infer(
        cls, model: str, pixels: np.ndarray, input_name: str = "image", output_name: str = "logits", top_k: int = 5
    ) -> GrpcRequest:
        """One image (``[H, W, 3]``) or a batch (``[N, H, W, 3]``) of ``uint8`` pixels as raw contents, asking
        for the top ``top_k`` classes (the classification extension), as ``stageformer /v2``'s requests do."""
        from tritonclient.grpc import service_pb2 as pb

        shape = list(pixels.shape) if pixels.ndim == 4 else [1, *pixels.shape]
        request = pb.ModelInferRequest(model_name=model)
        request.inputs.add(name=input_name, datatype="UINT8", shape=shape)
        output = request.outputs.add(name=output_name)
        output.parameters["classification"].int64_param = top_k
        request.raw_input_contents.append(pixels.astype("u1", copy=False).tobytes())
        return cls(request.SerializeToString())


def open_channel(host: str, port: int) -> grpc.aio.Channel:
    """An insecure ``grpc.aio`` channel to a loopback address, on its own connection."""
    import grpc

    check_loopback(host)
    options = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    return grpc.aio.insecure_channel(f"{host}:{port}", options=options)


def model_infer(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    """ModelInfer on ``channel``, taking and returning serialized messages."""
    return channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)


class GrpcClient:
    """A closed-loop client calling ModelInfer on a channel it may share with other clients."""

    def __init__(self, call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes], requests: Sequence[GrpcRequest]):
        self.call = call
        self.requests = requests

    async def send(self, which: int) -> Outcome:
        import grpc

        try:
            await self.call(self.requests[which].payload)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            return Outcome(code.name, False, f"gRPC {code.name}: {(exc.details() or '')[:300]}", unreachable)
        return Outcome("OK", True)

    async def close(self) -> None:
        """The channel is the level's to close."""


async def run_grpc_level(
    host: str,
    port: int,
    requests: Sequence[GrpcRequest],
    plan: LoadPlan,
    on_window_start: Hook | None = None,
    on_window_end: Hook | None = None,
    *,
    channels: int = 0,
) -> LevelResult:
    """Run one closed-loop level over gRPC, as ``bench.loadgen.run_level`` does over HTTP: client ``i`` sends
    ``requests[(i + k) % len(requests)]`` as its k-th request. ``channels``: 0 gives every client its own
    channel, n > 0 shares n channels (at most one per client) round-robin among the clients."""
    check_loopback(host)
    if not requests:
        raise LoadError("no requests to send")
    if channels < 0:
        raise LoadError(f"channels must be 0 (one per client) or more, got {channels}")
    opened = [open_channel(host, port) for _ in range(channel_count(plan.concurrency, channels))]
    calls = [model_infer(channel) for channel in opened]
    try:
        return await closed_loop(
            plan,
            len(requests),
            lambda i: GrpcClient(calls[i % len(calls)], requests),
            on_window_start,
            on_window_end,
        )
    finally:
        for channel in opened:
            await channel.close()


def channel_count(concurrency: int, channels: int) -> int:
    """How many channels a level opens: one per client for 0, else ``channels`` but no more than clients."""
    return concurrency if channels == 0 else min(channels, concurrency)


def describe_channels(channels: int) -> str:
    return "one channel (one HTTP/2 connection) per client" if channels == 0 else f"{channels} shared channel(s)"


async def infer_once(host: str, port: int, request: GrpcRequest, timeout_s: float = 30.0) -> Any:
    """One ModelInfer call on a fresh channel, its answer parsed: a ``ModelInferResponse``. For checking that a
    server answers the requests a level will send."""
    from tritonclient.grpc import service_pb2 as pb

    channel = open_channel(host, port)
    try:
        answer = await model_infer(channel)(request.payload, timeout=timeout_s)
    finally:
        await channel.close()
    return pb.ModelInferResponse.FromString(answer)


def top_classes(response: Any) -> list[str]:
    """The classification strings of a ModelInferResponse's first output (``BYTES``: 4-byte length, then text)."""
    raw: bytes = response.raw_output_contents[0]
    found, at = [], 0
    while at < len(raw):
        size = int.from_bytes(raw[at : at + 4], "little")
        found.append(raw[at + 4 : at + 4 + size].decode())
        at += 4 + size
    return found
