"""The load generator over gRPC: its ModelInfer requests, and a closed loop against a small ``grpc.aio`` server
in this process (loopback only) that speaks ``inference.GRPCInferenceService``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from bench import servers
from bench.grpc_load import GrpcRequest, channel_count, infer_once, run_grpc_level, top_classes
from bench.loadgen import LoadError, LoadPlan, merge, summarize
from stageformer.local import free_port


class FakeInference(pb_grpc.GRPCInferenceServiceServicer):
    """ModelInfer that answers the top class as a BYTES output after ``delay_s``; every ``fail_every``-th call is
    RESOURCE_EXHAUSTED. Counts calls and the peers (client address and port: one per connection) they came from."""

    def __init__(self, delay_s: float = 0.0, fail_every: int = 0) -> None:
        self.delay_s, self.fail_every = delay_s, fail_every
        self.calls = 0
        self.peers: set[str] = set()
        self.received: list[pb.ModelInferRequest] = []

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        self.calls += 1
        self.peers.add(context.peer())
        if len(self.received) < 3:
            self.received.append(request)
        await asyncio.sleep(self.delay_s)
        if self.fail_every and self.calls % self.fail_every == 0:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        answer = b"0.9:3:three"
        response = pb.ModelInferResponse(model_name=request.model_name, model_version="1")
        response.outputs.add(name="logits", datatype="BYTES", shape=[1, 1])
        response.raw_output_contents.append(len(answer).to_bytes(4, "little") + answer)
        return response


@asynccontextmanager
async def grpc_server(**kwargs: Any) -> AsyncIterator[tuple[int, FakeInference]]:
    servicer = FakeInference(**kwargs)
    server = grpc.aio.server()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(0)


def requests(count: int = 3) -> list[GrpcRequest]:
    return [GrpcRequest.infer("m", np.full((4, 4, 3), i, dtype=np.uint8)) for i in range(count)]


def test_infer_request_carries_raw_uint8_contents() -> None:
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    message = pb.ModelInferRequest.FromString(GrpcRequest.infer("digits", pixels).payload)
    assert message.model_name == "digits"
    (tensor,) = message.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("image", "UINT8", [1, 2, 3, 3])
    assert list(message.raw_input_contents) == [pixels.tobytes()]
    (output,) = message.outputs
    assert output.name == "logits" and output.parameters["classification"].int64_param == 5
    batch = pb.ModelInferRequest.FromString(GrpcRequest.infer("m", np.stack([pixels, pixels]), top_k=2).payload)
    assert (
        list(batch.inputs[0].shape) == [2, 2, 3, 3] and batch.outputs[0].parameters["classification"].int64_param == 2
    )


async def test_closed_loop_counts_requests_and_latencies() -> None:
    async with grpc_server(delay_s=0.002) as (port, servicer):
        result = await run_grpc_level("127.0.0.1", port, requests(), LoadPlan(4, 0.3, warmup_s=0.05))
    assert result.errors == 0 and result.ok > 10
    assert result.statuses == {"OK": result.ok}
    assert servicer.calls >= result.ok  # the warm-up and the requests in flight at the end are not counted
    assert result.throughput == pytest.approx(result.ok / result.seconds)
    assert 2.0 <= result.latency_ms["p50"] <= result.latency_ms["p99"] < 500.0  # at least the server's 2 ms
    assert result.client_cpu_s is not None and result.client_cpu_s > 0
    assert {bytes(r.raw_input_contents[0][:1]) for r in servicer.received} <= {b"\x00", b"\x01", b"\x02"}


async def test_errors_are_counted_by_code_and_the_first_is_kept() -> None:
    async with grpc_server(fail_every=3) as (port, _):
        result = await run_grpc_level("127.0.0.1", port, requests(1), LoadPlan(2, 0.3, 0.0))
    assert result.errors > 0 and result.ok > 0
    assert (
        set(result.statuses) == {"OK", "RESOURCE_EXHAUSTED"} and result.statuses["RESOURCE_EXHAUSTED"] == result.errors
    )
    assert result.first_error == "gRPC RESOURCE_EXHAUSTED: queue full"
    assert result.ok == pytest.approx(2 * result.errors, rel=0.05, abs=4)  # every third call fails


@pytest.mark.parametrize(("channels", "connections"), [(0, 4), (1, 1), (2, 2), (9, 4)])
async def test_channels_are_connections(channels: int, connections: int) -> None:
    async with grpc_server(delay_s=0.001) as (port, servicer):
        result = await run_grpc_level("127.0.0.1", port, requests(), LoadPlan(4, 0.2, 0.05), channels=channels)
    assert result.ok > 0 and result.errors == 0
    assert len(servicer.peers) == connections == channel_count(4, channels)


async def test_refused_port_gives_errors_not_a_busy_loop() -> None:
    port = free_port()  # nobody listens there
    result = await run_grpc_level("127.0.0.1", port, requests(1), LoadPlan(2, 0.3, 0.0))
    assert result.ok == 0 and 0 < result.errors < 40  # each failure waits before the next try
    assert set(result.statuses) == {"UNAVAILABLE"}
    assert result.first_error is not None and result.first_error.startswith("gRPC UNAVAILABLE")


async def test_request_budget_and_window_hooks() -> None:
    edges: list[str] = []

    async def start() -> None:
        edges.append("start")

    async def end() -> None:
        edges.append("end")

    async with grpc_server() as (port, servicer):
        plan = LoadPlan(2, 30.0, warmup_s=0.0, max_requests=20)
        result = await asyncio.wait_for(run_grpc_level("127.0.0.1", port, requests(), plan, start, end), 10)
    assert servicer.calls <= 20 and result.seconds < 10
    assert edges == ["start", "end"]


async def test_one_parsed_answer() -> None:
    async with grpc_server() as (port, _):
        response = await infer_once("127.0.0.1", port, requests(1)[0])
    assert response.model_name == "m" and top_classes(response) == ["0.9:3:three"]


async def test_only_loopback_and_sane_arguments() -> None:
    with pytest.raises(LoadError, match="loopback"):
        await run_grpc_level("10.0.0.1", 1, requests(1), LoadPlan(1, 0.1))
    with pytest.raises(LoadError, match="no requests"):
        await run_grpc_level("127.0.0.1", 1, [], LoadPlan(1, 0.1))
    with pytest.raises(LoadError, match="channels"):
        await run_grpc_level("127.0.0.1", 1, requests(1), LoadPlan(1, 0.1), channels=-1)


def test_grpc_outcomes_summarize_and_merge() -> None:
    first = summarize(2, 1.0, [0.01] * 4, {"OK": 4, "UNAVAILABLE": 1}, "gRPC UNAVAILABLE: down")
    first.client_cpu_s = 0.25
    second = summarize(2, 1.0, [0.02] * 6, {"OK": 6})
    second.client_cpu_s = 0.5
    assert first.ok == 4 and first.errors == 1
    merged = merge([first, second])
    assert merged.ok == 10 and merged.errors == 1 and merged.client_cpu_s == pytest.approx(0.75)
    assert merged.to_dict()["client_cpu_s"] == pytest.approx(0.75)
    second.client_cpu_s = None
    assert merge([first, second]).client_cpu_s is None  # not measured in every window: not summed


# --- how the bench starts servers for it ---------------------------------------------------------------------


def test_grpc_port_only_where_a_system_uses_it(tmp_path: Any) -> None:
    grpc_system = servers.STANDARD[servers.OURS_GRPC]
    ours = [servers.STANDARD[servers.OURS_V1], servers.STANDARD[servers.OURS_V2], grpc_system]
    assert len({s.process for s in ours}) == 1  # /v1, /v2 and gRPC: one server process
    ports = servers.ports_for(ours)
    assert ports.grpc and ports.http != ports.grpc
    assert servers.ports_for(ours[:2]).grpc == 0
    argv, _ = servers.start_command("stageformer", tmp_path / "m.onnx", ports.http, ["--grpc-port=7"], tmp_path, 9)
    assert argv[-2:] == ["--grpc-port", "9"]  # after the extra flags: the bench's own port wins
    argv, _ = servers.start_command("stageformer", tmp_path / "m.onnx", ports.http, [], tmp_path)
    assert argv[-2:] == ["--grpc-port", "0"]


def test_load_for_picks_the_transport() -> None:
    from bench.images import ImageSet

    images = ImageSet(names=("a.jpg",), jpegs=(b"\xff\xd8\xff\xd9",), source="test")
    pixels = [np.zeros((2, 2, 3), dtype=np.uint8)]
    ports = servers.Ports(1000, 1001)
    load = servers.load_for(servers.STANDARD[servers.OURS_GRPC], ports, "m", images, pixels, grpc_channels=2)
    assert isinstance(load, servers.GrpcLoad) and load.port == 1001 and load.channels == 2 and len(load.requests) == 1
    http = servers.load_for(servers.STANDARD[servers.OURS_V2], ports, "m", images, pixels)
    assert isinstance(http, servers.HttpLoad) and http.port == 1000
    with pytest.raises(ValueError, match="gRPC port"):
        servers.load_for(servers.STANDARD[servers.OURS_GRPC], servers.Ports(1000), "m", images, pixels)
