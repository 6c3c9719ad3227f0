"""Report writing and target checks from a results document, and the parts of the runner that need
no server: metrics parsing, batch-size deltas, the /v2 request format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bench import report, servers
from bench.loadgen import summarize


def level(
    concurrency: int, throughput: float, p99: float, batch: float | None = None, errors: int = 0, p50: float = 1.0
) -> dict[str, Any]:
    data = summarize(concurrency, 1.0, [p50 / 1000] * int(throughput), {"200": int(throughput)}).to_dict()
    data["latency_ms"]["p99"] = p99
    data["errors"] = errors
    data["mean_batch"] = batch
    return data


def workload(preset: str, limit: float, systems: dict[str, list[dict[str, Any]]], chosen: int = 4) -> dict[str, Any]:
    return {
        "preset": preset,
        "image_size": 32,
        "limit": {"provider": "CPUExecutionProvider", "per_batch": {"1": {"images_per_s": limit * 0.8},
                  "8": {"images_per_s": limit}}, "best_batch": 8, "images_per_s": limit},
        "decode": {"ms_per_image": 2.0, "images_per_s": 500.0, "study": {"oversample": 2.0, "resize_to": 36, "sets": {
            "bench photos": {"source": "synthetic", "sizes": ["500x375"],
                             "ms_per_image": {"exact": 3.0, "fast": 2.0, "plain (own decode)": 1.5},
                             "vs_exact": {"fast": {"images": 8, "identical": 8, "psnr_min_db": None,
                                                   "psnr_mean_db": None, "max_abs": 0},
                                          "plain (own decode)": {"images": 8, "identical": 0, "psnr_min_db": 38.5,
                                                                 "psnr_mean_db": 41.0, "max_abs": 40}}}}}},
        "serving": {name: {"startup_s": 1.0, "levels": levels} for name, levels in systems.items()},
        "batch_size": {"chosen": chosen, "chosen_per_start": [chosen, chosen], "measured": True,
                       "server_images_per_s": {"1": 10.0, str(chosen): 12.0}, "limit_at_chosen": limit * 0.9,
                       "limit_at_1": limit * 0.8},
        "skipped": {},
    }  # fmt: skip


def results(pool16: float = 90.0, cifar64: float = 300.0, lit: float = 0.8, int8: float = 40.0) -> dict[str, Any]:
    pool = workload(
        "poolformer_s12",
        100.0,
        {
            servers.OURS_V1: [level(1, 30, 40, 1.0, p50=33), level(16, pool16, 200, 12.0), level(64, 92, 700, 14.0)],
            servers.OURS_V2: [level(1, 35, 35, 1.0), level(16, 95, 190, 13.0), level(64, 95, 650, 14.0)],
            servers.OURS_GRPC: [level(1, 28, 45, 1.0), level(16, 114, 180, 13.0), level(64, 76, 700, 14.0)],
            servers.PLAIN_OWN: [level(1, 30, 50, p50=31), level(16, 80, 900), level(64, 85, 3000)],
            servers.PLAIN: [level(1, 25, 50), level(16, 40, 900), level(64, 40, 3000)],
            servers.LITSERVE: [level(1, 30 * lit, 60), level(16, pool16 * lit, 250, 8.0), level(64, 92 * lit, 800)],
        },
    )
    cifar = workload(
        "xformers_cifar_metaformer",
        1000.0,
        {
            servers.OURS_V1: [level(1, 200, 10, 1.0, p50=5), level(16, 400, 60, 8.0), level(64, cifar64, 250, 30.0)],
            servers.PLAIN_OWN: [level(1, 210, 12, p50=5), level(16, 150, 200), level(64, 150, 400)],
            servers.LITSERVE: [level(1, 200 * lit, 20), level(16, 400 * lit, 70), level(64, cifar64 * lit, 300, 20.0)],
        },
        chosen=32,
    )
    limit8 = {"provider": "CPUExecutionProvider", "best_batch": 4, "measurements": 2}
    return {
        "meta": {
            "started": "2026-01-01T00:00:00+00:00",
            "duration_s": 12.0,
            "command": "python -m bench",
            "machine": {"cpu": "Test CPU", "cores": 2, "memory_gib": 4.0, "gpus": [], "os": "Linux", "python": "3.11",
                        "versions": {"onnxruntime": "1.0"}, "load_average_at_start": [0.1, 0.2, 0.3]},
            "config": {"warmup_s": 1.0, "duration_s": 5.0, "serve_args": []},
            "images": {"source": "synthetic", "names": ["a.jpg"], "sizes": [[500, 375]], "mean_bytes": 40000},
        },
        "engine": [
            {"workload": "poolformer_s12@224", "engine": "PyTorch eager, CPU", "batch": 1, "images_per_s": 10.0,
             "ms_per_call": 100.0, "calls": 3},
            {"workload": "poolformer_s12@224", "engine": "ONNX Runtime, CPU", "batch": 1, "images_per_s": 25.0,
             "ms_per_call": 40.0, "calls": 3},
        ],
        "workloads": {"poolformer_s12@224": pool, "xformers_cifar_metaformer@32": cifar},
        "threads": {
            "variants": {"defaults": [], "threads 1": ["--threads", "1"]},
            "concurrency": [1, 16],
            "workloads": {"poolformer_s12@224": {
                "defaults": {"startup_s": 1.0, "levels": [level(1, 20, 60), level(16, 25, 900)],
                             "server": [{"max_batch_size": 2}]},
                "threads 1": {"startup_s": 1.0, "flags": ["--threads", "1"],
                              "levels": [level(1, 15, 80), level(16, 27, 800)], "server": [{"max_batch_size": 4}]},
            }},
        },
        "int8": {
            "workload": "poolformer_s12@224",
            "calibration": {"folder": "x", "images": 48},
            "agreement": {"images": 56, "top1_agreement": 1.0, "max_abs_softmax_diff": 0.01},
            "onnx_mb": {"fp32": 47.0, "int8": 12.5},
            "limit": {"fp32": {**limit8, "per_batch": {"1": {"images_per_s": 25.0}, "4": {"images_per_s": 30.0}},
                               "images_per_s": 30.0},
                      "int8": {**limit8, "per_batch": {"1": {"images_per_s": int8 * 0.9}, "4": {"images_per_s": int8}},
                               "images_per_s": int8}},
            "serving": {"stageformer /v1 fp32": {"startup_s": 1.0, "levels": [level(16, 20, 900)]},
                        "stageformer /v1 int8": {"startup_s": 1.0, "levels": [level(16, 30, 700)]}},
        },
    }  # fmt: skip


def test_targets_met() -> None:
    rows = report.targets(results())
    assert [r["met"] for r in rows] == [True] * 8, rows
    assert rows[0]["measured"] == "c=16: 0.90 of the limit"
    assert rows[1]["measured"].startswith("c=16: 1.12x, p99 200.0 ms vs 900.0 ms; c=64: 1.08x")
    assert rows[3]["measured"].startswith("c=16: 2.67x")
    assert "lowest 1.25x" in rows[5]["measured"]
    assert rows[7]["measured"].startswith("1.33x (40.0 images/s at batch 4")


def test_targets_missed() -> None:
    rows = report.targets(results(pool16=76.0, cifar64=200.0, lit=1.1, int8=35.0))
    assert [r["met"] for r in rows] == [False, False, True, False, True, False, True, False], rows
    assert rows[0]["measured"].startswith("c=16: 0.76")
    assert rows[1]["measured"].startswith("c=16: 0.95x")
    assert rows[3]["measured"].endswith("c=64: 1.33x, p99 250.0 ms vs 400.0 ms")
    assert "missed at poolformer_s12@224 c=1" in rows[5]["measured"]


def test_latency_bounds() -> None:
    data = results()
    data["workloads"]["xformers_cifar_metaformer@32"]["serving"][servers.OURS_V1]["levels"][2]["latency_ms"]["p99"] = (
        500
    )
    pool_v1 = data["workloads"]["poolformer_s12@224"]["serving"][servers.OURS_V1]["levels"]
    pool_v1[0] = level(1, 30, 40, 1.0, p50=35)  # more than 10% over plain's 31 ms
    rows = report.targets(data)
    assert rows[3]["met"] is False and rows[5]["met"] is False  # p99 worse than plain's and LitServe's at 64
    assert rows[4]["met"] is False and "35.0 ms vs 31.0 ms" in rows[4]["measured"]


def test_targets_not_measured() -> None:
    data = results()
    del data["workloads"]["poolformer_s12@224"]
    del data["int8"]
    for system in (servers.PLAIN_OWN, servers.LITSERVE):
        del data["workloads"]["xformers_cifar_metaformer@32"]["serving"][system]
    states = [r["met"] for r in report.targets(data)]
    assert states == [None, None, None, None, None, None, True, None]


def test_report_and_plots(tmp_path: Path) -> None:
    data = results()
    json.dumps(data)  # the document is plain JSON
    path = report.write(data, tmp_path, "python -m bench")
    text = path.read_text()
    assert "Test CPU, 2 cores" in text and "onnxruntime 1.0" in text
    assert "## Serving: poolformer_s12@224" in text and "## Serving: xformers_cifar_metaformer@32" in text
    # the row of our server at 16 clients: throughput, p99, batch, × plain (own), × LitServe, fraction of the limit
    row = next(line for line in text.splitlines() if line.startswith(f"| {servers.OURS_V1} | 16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "90.0" and cells[5] == "200.0" and cells[6] == "12.0"
    assert cells[8] == "1.12x" and cells[9] == "1.25x" and cells[10] == "0.90"
    summary = next(line for line in text.splitlines() if line.startswith("| poolformer_s12@224 | 16 |"))
    assert "0.90 ✓ (≥ 0.90)" in summary and "1.12x ✓ (≥ 1.00x)" in summary and "200 ✓ (≤ 900)" in summary
    assert "| ONNX Runtime / PyTorch, CPU | 2.50x |" in text
    assert "## Decoding" in text and "38.5 / 41.0" in text and "| identical |" in text
    assert "our server chose 4 at every one of its 2 starts" in text
    assert "## Threads" in text and "| threads 1 (`--threads 1`) | 15.0 |" in text
    assert "most requests/s at 16 clients: threads 1 (27.0; defaults 25.0)" in text
    assert "## int8" in text and "| int8 / fp32 | 1.44x | 1.33x |" in text
    assert "### `/v2` tensors: HTTP against gRPC" in text and f"| {servers.OURS_GRPC} | 16 | 114.0 |" in text
    for name in ("serving-poolformer_s12-224.png", "serving-xformers_cifar_metaformer-32.png", "engines.png"):
        assert f"]({name})" in text
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 400


def test_protocols_table() -> None:
    data = results()
    serving = data["workloads"]["poolformer_s12@224"]["serving"]
    serving[servers.OURS_V2]["levels"][1]["extra"] = {"cpu_ms_per_request": 30.0, "client_cpu_ms_per_request": 0.1}
    serving[servers.OURS_GRPC]["levels"][1]["extra"] = {"cpu_ms_per_request": 31.5, "client_cpu_ms_per_request": 0.3}
    lines = report.protocols_section(data)
    text = "\n".join(lines)
    assert "one channel (one HTTP/2 connection) per client" in text
    assert "0.80x to 1.20x, geometric mean 0.92x" in text  # 28/35, 114/95, 76/95
    row = next(line for line in lines if line.startswith("| poolformer_s12@224 | 16 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:] == ["95.0", "114.0", "1.20x", "1.0 / 1.0", "190.0 / 180.0", "30.0 / 31.5", "0.10 / 0.30"]
    assert not any(line.startswith("| xformers") for line in lines)  # no gRPC row there: no comparison
    data["meta"]["config"]["grpc_channels"] = 2
    assert "2 shared channel(s)" in "\n".join(report.protocols_section(data))
    del serving[servers.OURS_GRPC]
    assert report.protocols_section(data) == []


def test_parse_metrics_and_batch_deltas(tmp_path: Path) -> None:
    text = "\n".join(
        [
            "# HELP stageformer_batch_size images per inference call",
            'stageformer_batch_size_bucket{le="1.0",model="m"} 3.0',
            'stageformer_batch_size_count{model="m"} 10.0',
            'stageformer_batch_size_sum{model="m"} 45.0',
            'stageformer_batch_size_count{model="other"} 99.0',
            'stageformer_inference_seconds_sum{model="m"} 1.5',
        ]
    )
    assert servers.parse_metrics(text, "m") == {
        "stageformer_batch_size_count": 10.0,
        "stageformer_batch_size_sum": 45.0,
        "stageformer_inference_seconds_sum": 1.5,
    }
    counters = servers.Counters("stageformer", 1, "m", tmp_path / "none.txt")
    counters.before = {"stageformer_batch_size_count": 10.0, "stageformer_batch_size_sum": 45.0}
    counters.after = {"stageformer_batch_size_count": 14.0, "stageformer_batch_size_sum": 77.0}
    assert counters.mean_batch() == pytest.approx(8.0)
    assert servers.Counters("plain", 1, "m", tmp_path).mean_batch() == 1.0


async def test_litserve_batch_log(tmp_path: Path) -> None:
    log = tmp_path / "batches.txt"
    log.write_text("4\n4\n")
    counters = servers.Counters("litserve", 1, "m", log)
    start, end = counters.hooks()
    await start()
    log.write_text("4\n4\n16\n8\n")
    await end()
    assert counters.mean_batch() == pytest.approx(12.0)


def test_v2_request_is_binary_tensor() -> None:
    pixels = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 3)
    raw = servers.v2_request(8000, "m", pixels).raw
    head, body = raw.split(b"\r\n\r\n", 1)
    length = int(
        next(h for h in head.decode().split("\r\n") if h.startswith("Inference-Header-Content-Length")).split(":")[1]
    )
    header = json.loads(body[:length])
    assert header["inputs"][0]["shape"] == [1, 2, 2, 3] and header["inputs"][0]["datatype"] == "UINT8"
    assert header["inputs"][0]["parameters"]["binary_data_size"] == 12
    assert body[length:] == pixels.tobytes()
    assert head.startswith(b"POST /v2/models/m/infer HTTP/1.1")


def test_group_cpu_seconds_counts_this_process_group() -> None:
    import os
    import time

    pgid = os.getpgid(0)
    before = servers.group_cpu_seconds(pgid)
    if before is None:
        pytest.skip("no /proc on this system")
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn 0.3 s of CPU in this process
        pass
    after = servers.group_cpu_seconds(pgid)
    assert after is not None and after - before >= 0.25
    assert servers.group_cpu_seconds(0) is None


def test_combine_adds_windows() -> None:
    windows = [{"images": 30.0, "batches": 10.0, "cpu_s": 1.0}, {"images": 10.0, "batches": 10.0, "cpu_s": 0.5}]
    total = servers.Counters.combine(windows)
    assert total == {"images": 40.0, "batches": 20.0, "cpu_s": 1.5, "mean_batch": 2.0}
    assert servers.Counters.combine([{"cpu_s": 1.0}, {}]) == {}  # only what every window measured


def test_limits_of_the_rounds_are_averaged() -> None:
    from bench.engine import combine_limits

    def one(rates: dict[int, float]) -> dict[str, Any]:
        return {"provider": "CPUExecutionProvider", "per_batch": {b: {"images_per_s": r} for b, r in rates.items()}}

    combined = combine_limits([one({1: 10.0, 8: 30.0}), one({1: 20.0, 8: 20.0})])
    assert combined["per_batch"][1] == {"images_per_s": 15.0, "rounds": [10.0, 20.0]}
    assert combined["best_batch"] == 8 and combined["images_per_s"] == 25.0 and combined["measurements"] == 2
    with pytest.raises(ValueError):
        combine_limits([])
