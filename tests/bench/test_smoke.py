"""The whole benchmark, end to end, with very small counts: export, engines, the limit, every system
as a real server process under a real closed loop, the report. Figures this short mean nothing; the
test checks that every part runs and that the report holds what it should."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import servers
from bench.cli import main

QUICK = ["--workloads", "tiny", "--concurrency", "1,3", "--duration", "0.6", "--warmup", "0.2", "--budget", "0.05"]
QUICK += ["--engine-batch-sizes", "1,2", "--limit-batch-sizes", "1,2", "--images", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    systems = [s for s in servers.SYSTEMS if s != servers.LITSERVE or servers.litserve_available()]
    status = main([*QUICK, "--systems", *systems, "--out", str(out / "results"), "--cache-dir", str(out / "cache")])
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
    assert workload["limit"]["best_batch"] in (1, 2) and workload["limit"]["images_per_s"] > 0
    assert workload["decode"]["ms_per_image"] > 0


@pytest.mark.parametrize("system", [servers.OURS_V1, servers.OURS_V2, servers.PLAIN])
def test_served_without_errors(run: tuple[Path, dict[str, Any]], system: str) -> None:
    _, results = run
    for level in _levels(results, system):
        assert level["ok"] > 0 and level["errors"] == 0, level
        assert 0 < level["latency_ms"]["p50"] <= level["latency_ms"]["p99"]
        assert level["mean_batch"] is not None and level["mean_batch"] >= 1.0
        assert level["extra"]["cpu_ms_per_request"] > 0


def test_litserve_peer(run: tuple[Path, dict[str, Any]]) -> None:
    if not servers.litserve_available():
        pytest.skip("litserve is not installed (it is in the bench and dev extras)")
    _, results = run
    for level in _levels(results, servers.LITSERVE):
        assert level["ok"] > 0 and level["errors"] == 0, level
        assert level["mean_batch"] is not None and level["mean_batch"] >= 1.0


def test_report_only_rewrites_from_json(run: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    folder, _ = run
    assert main(["--report-only", str(folder / "results.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == (folder / "report.md").read_text()


def test_bad_options_are_clear_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workloads", "no_such_model", "--no-engine"]) == 2
    assert "unknown workload(s) no_such_model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--concurrency", "0"])
