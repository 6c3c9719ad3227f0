"""The whole benchmark, in order: machine, engines, then per workload the limit, the decoding cost and
every system under load at every concurrency. Results go to one JSON document; ``bench.report``
turns it into Markdown and plots."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import engine, machine, servers
from bench.images import ImageSet, load_images
from bench.loadgen import LevelResult, LoadPlan, merge, run_level
from bench.workloads import Workload, export_workload, pick_workloads
from stageformer.local import free_port

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures and for how long."""

    workloads: tuple[str, ...] = ()  # preset names; empty: all
    systems: tuple[str, ...] = servers.SYSTEMS
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    duration_s: float = 10.0  # measured seconds per level and system, split into `rounds` windows
    rounds: int = 2  # windows per level and system, the systems taking turns
    warmup_s: float = 2.0  # per level, before the window
    max_requests: int = 200_000  # per level
    request_timeout_s: float = 60.0
    run_engine: bool = True  # run the engine comparison
    engine_batch_sizes: tuple[int, ...] = engine.ENGINE_BATCH_SIZES
    limit_batch_sizes: tuple[int, ...] = engine.LIMIT_BATCH_SIZES
    budget_s: float = 2.0  # per engine or limit figure
    images: int = 8
    synthetic_images: bool = False
    serve_args: tuple[str, ...] = ()  # extra `stageformer serve` flags
    litserve_batch_timeout_ms: float = 2.0
    cache_dir: Path = BENCH_DIR / ".cache"
    parity_batch_sizes: tuple[int, ...] = (1, 3)

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in servers.SYSTEMS]
        if unknown:
            raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(servers.SYSTEMS)}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise ValueError("concurrency levels must be >= 1")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.budget_s <= 0 or self.images < 1 or self.rounds < 1:
            raise ValueError("duration and budget must be > 0, warm-up >= 0, images and rounds >= 1")
        pick_workloads(list(self.workloads))  # unknown names fail here, before anything runs

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cache_dir"] = str(self.cache_dir)
        return data


@dataclass
class Run:
    config: BenchConfig
    progress: Callable[[str], None] = logger.info
    results: dict[str, Any] = field(default_factory=dict)

    def execute(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.results = {
            "meta": {
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": machine.describe(),
                "config": self.config.to_dict(),
            },
            "engine": [],
            "workloads": {},
        }
        images = load_images(self.config.images, synthetic=self.config.synthetic_images)
        self.results["meta"]["images"] = {
            "source": images.source,
            "names": list(images.names),
            "sizes": [list(s) for s in images.sizes],
            "mean_bytes": round(images.mean_bytes),
        }
        workloads = pick_workloads(list(self.config.workloads))
        models = self.config.cache_dir / "models"
        for workload in workloads:
            export_workload(workload, models, parity_batch_sizes=self.config.parity_batch_sizes, progress=self.progress)
        if self.config.run_engine:
            for workload in workloads:
                self.results["engine"] += engine.engine_rows(
                    workload,
                    models,
                    batch_sizes=self.config.engine_batch_sizes,
                    budget_s=self.config.budget_s,
                    progress=self.progress,
                )
        for workload in workloads:
            self.results["workloads"][workload.name] = self.serve_workload(workload, models, images)
        self.results["meta"]["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.results["meta"]["duration_s"] = round(time.perf_counter() - started, 1)
        return self.results

    def serve_workload(self, workload: Workload, models: Path, images: ImageSet) -> dict[str, Any]:
        config = self.config
        onnx_path = export_workload(workload, models, progress=self.progress)
        info, pixels = servers.model_inputs(onnx_path, images)
        result: dict[str, Any] = {
            "preset": workload.preset,
            "image_size": workload.image_size,
            "onnx_mb": round(onnx_path.stat().st_size / 1e6, 1),
            "decode": engine.decode_cost(images, info.preprocess),
            "serving": {},
            "skipped": {},
        }
        limits: list[dict[str, Any]] = []

        def measure_limit(round_: int) -> None:  # once per round, beside the servers' windows
            limits.append(
                engine.limit(
                    onnx_path,
                    workload.image_size,
                    batch_sizes=config.limit_batch_sizes,
                    budget_s=config.budget_s / config.rounds,
                    progress=lambda m: self.progress(f"{workload.name} round {round_ + 1} {m}"),
                )
            )

        systems = []
        for system in config.systems:
            if system == servers.LITSERVE and not servers.litserve_available():
                result["skipped"][system] = "litserve is not installed (pip install -e '.[bench]')"
            else:
                systems.append(system)
        result["serving"] = self.serve_side_by_side(
            systems, onnx_path, info.name, images, pixels, workload, measure_limit
        )
        result["limit"] = engine.combine_limits(limits)
        self.progress(
            f"{workload.name}: limit {result['limit']['images_per_s']:.1f} images/s at batch "
            f"{result['limit']['best_batch']}; decoding {result['decode']['ms_per_image']:.2f} ms/image"
        )
        return result

    def serve_side_by_side(
        self,
        systems: list[str],
        onnx_path: Path,
        model: str,
        images: ImageSet,
        pixels: list[Any],
        workload: Workload,
        on_round: Callable[[int], None] = lambda round_: None,
    ) -> dict[str, Any]:
        """Each level of each system is measured in ``rounds`` windows. ``on_round`` runs first in every
        round (the in-process limit is measured there). In every round each server is
        started, runs one window per level for each of its systems, and is stopped; the servers take
        turns in a rotating order, so that a change in the machine's background load while the workload
        runs touches every system alike. One server at a time: a large model's arena in each of three
        idle servers would not fit in memory together."""
        config = self.config
        logs = config.cache_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        kinds = list(dict.fromkeys(servers.SERVERS[s] for s in systems))
        windows: dict[tuple[str, int], list[LevelResult]] = {(s, c): [] for s in systems for c in config.concurrency}
        startup: dict[str, list[float]] = {s: [] for s in systems}
        window = config.duration_s / config.rounds
        for round_ in range(config.rounds):
            on_round(round_)
            for server in kinds[round_ % len(kinds) :] + kinds[: round_ % len(kinds)]:
                mine = [s for s in systems if servers.SERVERS[s] == server]
                port = free_port()
                batch_log = logs / f"{workload.preset}-{server}-batches.txt"
                batch_log.write_text("")
                argv, health = servers.start_command(server, onnx_path, port, list(config.serve_args), batch_log)
                if server == "litserve":
                    argv += ["--batch-timeout-ms", str(config.litserve_batch_timeout_ms)]
                process = servers.ServerProcess(server, argv, port, health, logs / f"{workload.preset}-{server}.log")
                seconds = process.start()
                self.progress(f"{workload.name}: round {round_ + 1}, {server} ready on port {port} in {seconds:.1f} s")
                try:
                    requests = {s: servers.requests_for(s, port, model, images, pixels) for s in mine}
                    for concurrency in config.concurrency:
                        for system in mine:
                            counters = servers.Counters(server, port, model, batch_log, process.pid)
                            plan = LoadPlan(
                                concurrency, window, config.warmup_s, config.max_requests, config.request_timeout_s
                            )
                            level = asyncio.run(
                                run_level(servers.HOST, port, requests[system], plan, *counters.hooks())
                            )
                            level.extra = counters.totals()
                            windows[(system, concurrency)].append(level)
                            startup[system].append(seconds)
                            if process.process is not None and process.process.poll() is not None:
                                raise servers.ServerError(f"{server} died during the run:\n{process.log_tail()}")
                finally:
                    process.stop()
        out: dict[str, Any] = {}
        for system in systems:
            levels = []
            for concurrency in config.concurrency:
                level = self._merged(windows[(system, concurrency)], system)
                levels.append(level.to_dict())
                batch = f", mean batch {level.mean_batch:.1f}" if level.mean_batch else ""
                if "cpu_ms_per_request" in level.extra:
                    batch += f", server CPU {level.extra['cpu_ms_per_request']:.1f} ms/request"
                self.progress(
                    f"{workload.name} {system} c={concurrency}: {level.throughput:.1f} req/s, "
                    f"p50 {level.latency_ms['p50']:.1f} ms, p99 {level.latency_ms['p99']:.1f} ms{batch}, "
                    f"{level.errors} errors"
                )
            out[system] = {"startup_s": round(max(startup[system]), 1), "levels": levels}
        return out

    @staticmethod
    def _merged(windows: list[LevelResult], system: str) -> LevelResult:
        level = merge(windows)
        level.extra = servers.Counters.combine([w.extra for w in windows])
        level.mean_batch = 1.0 if servers.SERVERS[system] == "plain" else level.extra.get("mean_batch")
        if "inference_s" in level.extra:
            level.extra["inference_busy"] = level.extra["inference_s"] / level.seconds
        if "cpu_s" in level.extra and level.ok:
            level.extra["cpu_ms_per_request"] = level.extra["cpu_s"] * 1000.0 / level.ok
        return level


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
