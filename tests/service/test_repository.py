"""The model repository while serving: index, load, reload and unload over HTTP and gRPC, a reload under a
steady stream of requests, a broken file, concurrent loads, an unload that drains first, and --watch."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient

import service.repository
from model import create_model, default_preprocess, save_checkpoint
from stageformer.local import free_port

from .harness import GatedRun, LiveServer, classify, live_server, marked_png, request, wait_until

LABELS = [f"class-{i}" for i in range(10)]


def export_tiny(folder: Path, name: str, seed: int) -> Path:
    """A ``tiny`` model called ``name`` with weights drawn from ``seed``, exported to ``folder/name.onnx``."""
    from export import export_onnx

    torch.manual_seed(seed)
    checkpoint = save_checkpoint(create_model("tiny"), folder / f"{name}-{seed}.safetensors",
                                 default_preprocess("tiny"), LABELS)  # fmt: skip
    output = folder / f"{name}-{seed}.onnx"
    export_onnx(checkpoint, output, name=name, exporter="torchscript", parity_batch_sizes=(1,))
    return output


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Exported files: two versions of 'tiny', and 'other'."""
    folder = tmp_path_factory.mktemp("versions")
    return {"tiny v1": export_tiny(folder, "tiny", 1), "tiny v2": export_tiny(folder, "tiny", 2),
            "other": export_tiny(folder, "other", 3)}  # fmt: skip


@pytest.fixture
def repo(tmp_path: Path, versions: dict[str, Path]) -> Path:
    """A model folder holding tiny (v1)."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(versions["tiny v1"], folder / "tiny.onnx")
    return folder


def post(live: LiveServer, path: str) -> tuple[int, object]:
    reply = request(live.port, "POST", path, b"", {"content-type": "application/json"})
    return reply.status, reply.json() if reply.body else None


def first_logit(live: LiveServer, model: str = "tiny") -> float:
    reply = request(live.port, "POST", f"/v1/models/{model}/classify?top_k=1", marked_png(7),
                    {"content-type": "image/png"})  # fmt: skip
    assert reply.status == 200, reply.body
    return float(reply.json()["results"][0]["predictions"][0]["score"])


def test_index_load_and_unload_over_http(repo: Path, versions: dict[str, Path]) -> None:
    with live_server(models=[str(repo)]) as live:
        assert post(live, "/v2/repository/index") == (200, [{"name": "tiny", "version": "1", "state": "READY",
                                                             "reason": ""}])  # fmt: skip
        shutil.copy(versions["other"], repo / "other.onnx")
        status, index = post(live, "/v2/repository/index")
        assert [(e["name"], e["state"]) for e in index] == [("other", "UNAVAILABLE"), ("tiny", "READY")]  # type: ignore[union-attr]
        assert request(live.port, "GET", "/v2/models/other/ready").status == 404
        assert post(live, "/v2/repository/models/other/load") == (200, {})
        assert request(live.port, "GET", "/v2/models/other/ready").status == 200
        first_logit(live, "other")
        assert post(live, "/v2/repository/models/tiny/unload") == (200, {})
        assert request(live.port, "POST", "/v1/models/tiny/classify", marked_png(1),
                       {"content-type": "image/png"}).status == 404  # fmt: skip
        status, ready = post(live, "/v2/repository/index")
        assert status == 200 and {e["name"]: e["state"] for e in ready} == {"other": "READY", "tiny": "UNAVAILABLE"}  # type: ignore[union-attr]
        status, error = post(live, "/v2/repository/models/nothing/load")
        assert status == 404 and "no model file for 'nothing'" in error["error"]  # type: ignore[index]
        assert post(live, "/v2/repository/models/tiny/unload")[0] == 404  # not loaded


def test_repository_over_grpc(repo: Path, versions: dict[str, Path]) -> None:
    port = free_port()
    with live_server(models=[str(repo)], grpc_port=port), grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as c:
        shutil.copy(versions["other"], repo / "other.onnx")
        index = c.get_model_repository_index(as_json=True)["models"]
        assert {m["name"]: m.get("state") for m in index} == {"tiny": "READY", "other": "UNAVAILABLE"}
        c.load_model("other")
        assert c.is_model_ready("other")
        c.unload_model("tiny")
        assert not c.is_model_ready("tiny")


def test_a_reload_under_steady_traffic_fails_no_request(repo: Path, versions: dict[str, Path]) -> None:
    with live_server(models=[str(repo)], max_batch_size=4) as live:
        before = first_logit(live)
        statuses: list[int] = []
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                statuses.append(classify(live.port, marked_png(len(statuses) % 200)).status)

        threads = [threading.Thread(target=traffic) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(statuses) > 20, what="traffic")
        shutil.copy(versions["tiny v2"], repo / "tiny.onnx")
        assert post(live, "/v2/repository/models/tiny/load") == (200, {})
        count = len(statuses)
        wait_until(lambda: len(statuses) > count + 20, what="traffic on the new model")
        stop.set()
        for thread in threads:
            thread.join()
        assert statuses and set(statuses) == {200}, sorted(set(statuses))
        assert first_logit(live) != before  # the new weights answer
        wait_until(lambda: not live.state.registry.retired, what="the old model to stop")  # type: ignore[union-attr]


def test_a_broken_file_fails_to_load_and_the_old_model_keeps_answering(repo: Path) -> None:
    with live_server(models=[str(repo)]) as live:
        before = first_logit(live)
        (repo / "tiny.onnx").write_bytes(b"\x08\x07 not an onnx file" * 10)
        status, error = post(live, "/v2/repository/models/tiny/load")
        assert status == 400 and "cannot load model 'tiny'" in error["error"]  # type: ignore[index]
        assert "keeps serving" in error["error"]  # type: ignore[index]
        assert first_logit(live) == before


def test_a_file_holding_another_model_is_refused(repo: Path, versions: dict[str, Path]) -> None:
    with live_server(models=[str(repo)]) as live:
        shutil.copy(versions["other"], repo / "wrong.onnx")
        status, error = post(live, "/v2/repository/models/wrong/load")
        assert status == 400 and "holds model 'other', not 'wrong'" in error["error"]  # type: ignore[index]
        assert request(live.port, "GET", "/v2/models/wrong").status == 404


def test_concurrent_loads_of_one_model_load_it_once(
    repo: Path, versions: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[Path] = []
    original = service.repository.load_model

    def counting(path: Path, *args: object) -> object:
        loads.append(path)
        time.sleep(0.3)  # a load that takes a while, so that the others arrive during it
        return original(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(service.repository, "load_model", counting)
    with live_server(models=[str(repo)]) as live:
        shutil.copy(versions["tiny v2"], repo / "tiny.onnx")
        results: list[tuple[int, object]] = []
        threads = [threading.Thread(target=lambda: results.append(post(live, "/v2/repository/models/tiny/load")))
                   for _ in range(4)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [(200, {})] * 4
        assert len(loads) == 1


def test_unload_waits_for_the_queued_requests_and_refuses_new_ones(repo: Path) -> None:
    with live_server(models=[str(repo)], max_batch_size=1, max_queue_delay_ms=0) as live:
        gated = GatedRun.stuck(live.model("tiny").batcher)
        replies: list[int] = []
        clients = [threading.Thread(target=lambda i=i: replies.append(classify(live.port, marked_png(i)).status))
                   for i in range(4)]  # fmt: skip
        for thread in clients:
            thread.start()
        model = live.model("tiny")
        wait_until(lambda: model.batcher.depth == 3, what="requests to queue")
        unloaded: list[tuple[int, object]] = []
        unloading = threading.Thread(target=lambda: unloaded.append(post(live, "/v2/repository/models/tiny/unload")))
        unloading.start()
        wait_until(lambda: "tiny" not in live.state.registry.models, what="the unload to start")  # type: ignore[union-attr]
        assert classify(live.port, marked_png(9)).status == 404  # out of the routes at once
        assert not unloaded  # still draining
        gated.gate.set()
        unloading.join(30)
        for thread in clients:
            thread.join(30)
        assert unloaded == [(200, {})] and replies == [200] * 4


def test_watch_loads_a_copied_file_and_unloads_a_removed_one(repo: Path, versions: dict[str, Path]) -> None:
    with live_server(models=[str(repo)], watch=True, watch_interval_s=0.2) as live:
        partial = repo / "other.onnx"
        partial.write_bytes(versions["other"].read_bytes()[:1000])  # a copy in progress: left alone
        time.sleep(0.5)
        shutil.copy(versions["other"], partial)  # complete
        wait_until(lambda: request(live.port, "GET", "/v2/models/other/ready").status == 200, 20, "other to load")
        first_logit(live, "other")
        partial.unlink()
        wait_until(lambda: request(live.port, "GET", "/v2/models/other/ready").status == 404, 20, "other to unload")
        assert request(live.port, "GET", "/v2/models/tiny/ready").status == 200
