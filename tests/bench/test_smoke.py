"""The whole benchmark, end to end, with very small counts: export, engines, decoding, the limit, every system
as a real server process under a real closed loop, the threads study, int8 against fp32, the report. Figures
this short mean nothing; the test checks that every part runs and that the report holds what it should."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import servers
from bench.cli import main

QUICK = ["--workloads", "tiny", "--concurrency", "1,3", "--duration", "0.6", "--warmup", "0.2", "--budget", "0.05"]
QUICK += ["--engine-batch-sizes", "1,2", "--limit-batch-sizes", "1,2", "--images", "2"]
QUICK += ["--serve-arg=--auto-batch-budget-s=0.3", "--mosaics", "1"]
STUDIES = ["--only", "threads", "int8", "--thread-workloads", "tiny", "--int8-workload", "tiny", "--rounds", "1"]
STUDIES += ["--thread-variants", "defaults", "threads=1,instances=2", "--thread-concurrency", "2"]
STUDIES += ["--thread-duration", "0.6", "--int8-concurrency", "2", "--calibration-images", "10"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for both runs: the tiny model is exported once."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    systems = [s for s in servers.SYSTEMS if s != servers.LITSERVE or servers.litserve_available()]
    where = ["--out", str(out / "results"), "--cache-dir", str(cache)]
    status = main([*QUICK, "--systems", *systems, "--skip", "threads", "int8", *where])
    assert status == 0
    return out / "results", json.loads((out / "results" / "results.json").read_text())


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench-studies")
    status = main([*QUICK, *STUDIES, "--out", str(out / "results"), "--cache-dir", str(cache)])
    assert status == 0
    return out / "results", json.loads((out / "results" / "results.json").read_text())


def _levels(results: dict[str, Any], system: str) -> list[dict[str, Any]]:
    levels: list[dict[str, Any]] = results["workloads"]["tiny@32"]["serving"][system]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    return levels


def test_files_and_machine(run: tuple[Path, dict[str, Any]]) -> None:
    folder, results = run
    assert {p.name for p in folder.iterdir()} >= {"report.md", "results.json", "serving-tiny-32.png", "engines.png"}
    assert results["meta"]["machine"]["cores"] >= 1 and "onnxruntime" in results["meta"]["machine"]["versions"]
    text = (folder / "report.md").read_text()
    assert "## Serving: tiny@32" in text and "## Targets" in text and "![engines](engines.png)" in text


def test_engines_and_limit(run: tuple[Path, dict[str, Any]]) -> None:
    _, results = run
    engines = {(r["engine"], r["batch"]) for r in results["engine"]}
    assert {("PyTorch eager, CPU", 1), ("ONNX Runtime, CPU", 2)} <= engines
    assert all(r["images_per_s"] > 0 for r in results["engine"])
    workload = results["workloads"]["tiny@32"]
    chosen = workload["batch_size"]["chosen"]
    # The limit is measured at the sizes asked for and at every size a server start chose (starts may differ).
    measured_sizes = {1, 2, *workload["batch_size"]["chosen_per_start"]}
    assert {int(b) for b in workload["limit"]["per_batch"]} == measured_sizes
    assert workload["limit"]["best_batch"] in measured_sizes and workload["limit"]["images_per_s"] > 0
    assert workload["batch_size"]["measured"] and str(chosen) in workload["batch_size"]["server_images_per_s"]
    assert workload["limit"]["per_batch"][str(chosen)]["images_per_s"] > 0  # the chosen size is measured too
    assert workload["decode"]["ms_per_image"] > 0


def test_decoding_figures(run: tuple[Path, dict[str, Any]]) -> None:
    _, results = run
    sets = results["workloads"]["tiny@32"]["decode"]["study"]["sets"]
    assert set(sets) == {"bench photos", "12-megapixel photos"}  # one 4032x3024 mosaic here
    big = sets["12-megapixel photos"]
    assert big["sizes"] == ["4032x3024"]
    assert big["ms_per_image"]["fast"] < big["ms_per_image"]["exact"]  # 1/8 scale: far fewer pixels
    assert big["vs_exact"]["fast"]["psnr_min_db"] > 30 and big["vs_exact"]["fast"]["max_abs"] < 64


@pytest.mark.parametrize(
    "system", [servers.OURS_V1, servers.OURS_V2, servers.OURS_GRPC, servers.PLAIN_OWN, servers.PLAIN]
)
def test_served_without_errors(run: tuple[Path, dict[str, Any]], system: str) -> None:
    _, results = run
    for level in _levels(results, system):
        assert level["ok"] > 0 and level["errors"] == 0, level
        assert 0 < level["latency_ms"]["p50"] <= level["latency_ms"]["p99"]
        assert level["mean_batch"] is not None and level["mean_batch"] >= 1.0
        assert level["extra"]["cpu_ms_per_request"] > 0 and level["extra"]["client_cpu_ms_per_request"] > 0


def test_grpc_beside_http(run: tuple[Path, dict[str, Any]]) -> None:
    folder, results = run
    served = results["workloads"]["tiny@32"]["serving"]
    assert served[servers.OURS_GRPC]["levels"][0]["statuses"].keys() == {"OK"}
    assert served[servers.OURS_GRPC]["server"] == served[servers.OURS_V2]["server"]  # one process, one start each
    text = (folder / "report.md").read_text()
    assert "### `/v2` tensors: HTTP against gRPC" in text and f"| {servers.OURS_GRPC} | 3 |" in text


def test_litserve_peer(run: tuple[Path, dict[str, Any]]) -> None:
    if not servers.litserve_available():
        pytest.skip("litserve is not installed (it is in the bench and dev extras)")
    _, results = run
    for level in _levels(results, servers.LITSERVE):
        assert level["ok"] > 0 and level["errors"] == 0, level
        assert level["mean_batch"] is not None and level["mean_batch"] >= 1.0


def test_threads_and_int8(studies: tuple[Path, dict[str, Any]]) -> None:
    folder, results = studies
    variants = results["threads"]["workloads"]["tiny@32"]
    assert set(variants) == {"defaults", "threads 1, instances 2"}
    assert variants["threads 1, instances 2"]["flags"] == ["--threads", "1", "--instances", "2"]
    for served in variants.values():
        assert served["levels"][0]["ok"] > 0 and served["levels"][0]["errors"] == 0
    int8 = results["int8"]
    if "skipped" in int8:
        pytest.skip(f"int8: {int8['skipped']}")
    assert int8["agreement"]["images"] > 0 and 0 <= int8["agreement"]["top1_agreement"] <= 1
    assert int8["limit"]["int8"]["images_per_s"] > 0
    for served in int8["serving"].values():
        assert served["levels"][0]["ok"] > 0 and served["levels"][0]["errors"] == 0
    text = (folder / "report.md").read_text()
    assert "## Threads" in text and "## int8" in text


def test_report_only_rewrites_from_json(run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    folder, _ = run
    assert main(["--report-only", str(folder / "results.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == (folder / "report.md").read_text()


def test_bad_options_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workloads", "no_such_model", "--no-engine"]) == 2
    assert "unknown workload(s) no_such_model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--concurrency", "0"])
    assert main(["--thread-variants", "threads", "--only", "threads"]) == 2
    assert "thread variant 'threads'" in capsys.readouterr().err
