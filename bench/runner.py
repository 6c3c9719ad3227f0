"""The whole benchmark, in order: machine, engines, then per workload the decoding figures, every system under
load at every concurrency and the in-process limit; then the threads study and int8 against fp32. Results go to
one JSON document; ``bench.report`` turns it into Markdown and plots."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import decoding, engine, machine, servers
from bench.images import ImageSet, load_images, load_mosaics
from bench.loadgen import LevelResult, LoadPlan, merge
from bench.servers import System
from bench.workloads import PARTS, THREAD_VARIANTS, THREAD_WORKLOADS, Workload, export_workload, pick_workloads

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent

# Params of our server as read at each start, by system name; the after-round hook gets them.
ServerParams = dict[str, list[dict[str, Any]]]


def variant_flags(spec: str) -> tuple[str, ...]:
    """``"threads=1,instances=2"`` -> ``("--threads", "1", "--instances", "2")``; ``"defaults"`` -> ``()``."""
    if spec.strip() in ("", "defaults"):
        return ()
    flags: list[str] = []
    for pair in spec.split(","):
        name, sep, value = pair.strip().partition("=")
        if not sep or not re.fullmatch(r"[a-z][a-z0-9-]*", name) or not value:
            raise ValueError(f"thread variant {spec!r}: expected name=value pairs such as threads=1,instances=2")
        flags += [f"--{name}", value]
    return tuple(flags)


def variant_label(spec: str) -> str:
    """``"threads=1,decode-workers=2"`` -> ``"threads 1, decode workers 2"``."""
    if spec.strip() in ("", "defaults"):
        return "defaults"
    return ", ".join(f"{n.replace('-', ' ')} {v}" for n, _, v in (p.strip().partition("=") for p in spec.split(",")))


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
    parts: tuple[str, ...] = PARTS  # which parts of the benchmark run
    engine_batch_sizes: tuple[int, ...] = engine.ENGINE_BATCH_SIZES
    limit_batch_sizes: tuple[int, ...] = engine.LIMIT_BATCH_SIZES
    budget_s: float = 2.0  # per engine or limit figure
    images: int = 8
    synthetic_images: bool = False
    mosaics: int = 2  # camera-sized JPEGs for the decoding figures
    decode_oversample: float = 2.0  # as the server's --decode-oversample default
    serve_args: tuple[str, ...] = ()  # extra `stageformer serve` flags, for every start of our server
    litserve_batch_timeout_ms: float = 2.0
    grpc_channels: int = 0  # gRPC channels the clients share; 0: one per client
    thread_workloads: tuple[str, ...] = THREAD_WORKLOADS
    thread_variants: tuple[str, ...] = THREAD_VARIANTS
    thread_concurrency: tuple[int, ...] = (1, 16)
    thread_duration_s: float = 6.0  # per level and variant, split into `rounds` windows
    int8_workload: str = "poolformer_s12"
    int8_concurrency: tuple[int, ...] = (1, 16)
    calibration_images: int = 48  # JPEGs derived from the photos for int8 calibration
    cache_dir: Path = BENCH_DIR / ".cache"
    parity_batch_sizes: tuple[int, ...] = (1, 3)

    def __post_init__(self) -> None:
        unknown = [s for s in self.systems if s not in servers.SYSTEMS]
        if unknown:
            raise ValueError(f"unknown system(s) {unknown}; choose from {', '.join(servers.SYSTEMS)}")
        unknown = [p for p in self.parts if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
        levels = (*self.concurrency, *self.thread_concurrency, *self.int8_concurrency)
        if not self.concurrency or min(levels) < 1:
            raise ValueError("concurrency levels must be >= 1")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.budget_s <= 0 or self.images < 1 or self.rounds < 1:
            raise ValueError("duration and budget must be > 0, warm-up >= 0, images and rounds >= 1")
        if self.mosaics < 0 or self.calibration_images < 1 or self.thread_duration_s <= 0:
            raise ValueError("mosaics must be >= 0, calibration images >= 1 and the threads' duration > 0")
        if self.grpc_channels < 0:
            raise ValueError("gRPC channels must be >= 0 (0: one per client)")
        for spec in self.thread_variants:
            variant_flags(spec)
        pick_workloads(list(self.workloads))  # unknown names fail here, before anything runs
        if "threads" in self.parts:
            pick_workloads(list(self.thread_workloads))
        if "int8" in self.parts:
            pick_workloads([self.int8_workload])

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["cache_dir"] = str(self.cache_dir)
        return data


@dataclass
class Run:
    config: BenchConfig
    progress: Callable[[str], None] = logger.info
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> Path:
        return self.config.cache_dir / "models"

    def execute(self) -> dict[str, Any]:
        started = time.perf_counter()
        config = self.config
        self.results = {
            "meta": {
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": machine.describe(),
                "config": config.to_dict(),
            },
            "engine": [],
            "workloads": {},
        }
        images = load_images(config.images, synthetic=config.synthetic_images)
        self.results["meta"]["images"] = {
            "source": images.source,
            "names": list(images.names),
            "sizes": [list(s) for s in images.sizes],
            "mean_bytes": round(images.mean_bytes),
        }
        workloads = pick_workloads(list(config.workloads))
        for workload in workloads:
            self._export(workload)
        if "engine" in config.parts:
            for workload in workloads:
                self.results["engine"] += engine.engine_rows(
                    workload, self.models, batch_sizes=config.engine_batch_sizes, budget_s=config.budget_s,
                    progress=self.progress,
                )  # fmt: skip
        if "serving" in config.parts:
            mosaics = load_mosaics(config.mosaics, synthetic=config.synthetic_images) if config.mosaics else None
            for workload in workloads:
                self.results["workloads"][workload.name] = self.serve_workload(workload, images, mosaics)
        if "threads" in config.parts:
            self.results["threads"] = self.threads_study(images)
        if "int8" in config.parts:
            self.results["int8"] = self.int8_study(images)
        self.results["meta"]["load_average_at_end"] = machine.load_average()
        self.results["meta"]["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.results["meta"]["duration_s"] = round(time.perf_counter() - started, 1)
        return self.results

    def _export(self, workload: Workload, **kwargs: Any) -> Path:
        return export_workload(
            workload, self.models, parity_batch_sizes=self.config.parity_batch_sizes, progress=self.progress, **kwargs
        )

    # --- the main comparison ---------------------------------------------------------------------

    def serve_workload(self, workload: Workload, images: ImageSet, mosaics: ImageSet | None) -> dict[str, Any]:
        config = self.config
        onnx_path = self._export(workload)
        info, pixels = servers.model_inputs(onnx_path, images)
        sets = {"bench photos": images, **({"12-megapixel photos": mosaics} if mosaics else {})}
        study = decoding.study(sets, info.preprocess, config.decode_oversample, budget_s=config.budget_s / 2)
        fast = study["sets"]["bench photos"]["ms_per_image"][decoding.FAST]
        result: dict[str, Any] = {
            "preset": workload.preset,
            "image_size": workload.image_size,
            "onnx_mb": round(onnx_path.stat().st_size / 1e6, 1),
            "decode": {"ms_per_image": fast, "images_per_s": 1000.0 / fast, "study": study},
            "serving": {},
            "skipped": {},
        }
        systems = []
        for name in config.systems:
            if name == servers.LITSERVE and not servers.litserve_available():
                result["skipped"][name] = "litserve is not installed (pip install -e '.[bench]')"
            else:
                systems.append(servers.STANDARD[name])
        limits: list[dict[str, Any]] = []

        def measure_limit(round_: int, params: ServerParams) -> None:  # after each round, beside the servers'
            chosen = {p["max_batch_size"] for runs in params.values() for p in runs if "max_batch_size" in p}
            sizes = tuple(sorted({*config.limit_batch_sizes, *(b for b in chosen if b <= 256)}))
            limits.append(
                engine.limit(
                    onnx_path, workload.image_size, batch_sizes=sizes, budget_s=config.budget_s / config.rounds,
                    progress=lambda m: self.progress(f"{workload.name} round {round_ + 1} {m}"),
                )
            )  # fmt: skip

        result["serving"] = self.serve_side_by_side(
            systems, workload, onnx_path, info.name, images, pixels,
            concurrency=config.concurrency, duration_s=config.duration_s, after_round=measure_limit,
        )  # fmt: skip
        result["limit"] = engine.combine_limits(limits)
        result["batch_size"] = batch_size_summary(result["serving"], result["limit"])
        self.progress(
            f"{workload.name}: limit {result['limit']['images_per_s']:.1f} images/s at batch "
            f"{result['limit']['best_batch']}; our server chose batch {result['batch_size'].get('chosen')}; "
            f"decoding {fast:.2f} ms/image"
        )
        return result

    def serve_side_by_side(
        self,
        systems: list[System],
        workload: Workload,
        onnx_path: Path,
        model: str,
        images: ImageSet,
        pixels: list[Any],
        *,
        concurrency: tuple[int, ...],
        duration_s: float,
        after_round: Callable[[int, ServerParams], None] | None = None,
    ) -> dict[str, Any]:
        """Each level of each system is measured in ``rounds`` windows. In every round each server process is
        started, runs one window per level for each of its systems, and is stopped; the processes take turns
        in a rotating order, so that a change in the machine's background load touches every system alike.
        ``after_round`` runs at the end of every round (the in-process limit is measured there). One server at
        a time: a large model's arena in several idle servers would not fit in memory together."""
        rounds = self.config.rounds
        processes = list(dict.fromkeys(s.process for s in systems))
        windows: dict[tuple[str, int], list[LevelResult]] = {(s.name, c): [] for s in systems for c in concurrency}
        startup: dict[str, list[float]] = {s.name: [] for s in systems}
        params: ServerParams = {s.name: [] for s in systems}
        for round_ in range(rounds):
            shift = round_ % len(processes)
            for key in processes[shift:] + processes[:shift]:
                mine = [s for s in systems if s.process == key]
                seconds, found = self._serve_round(
                    mine, workload, onnx_path, model, images, pixels, concurrency, duration_s / rounds, round_, windows
                )
                for system in mine:
                    startup[system.name].append(seconds)
                    if found:
                        params[system.name].append(found)
            if after_round is not None:
                after_round(round_, params)
        out: dict[str, Any] = {}
        for system in systems:
            levels = []
            for level in (self._merged(windows[(system.name, c)], system) for c in concurrency):
                levels.append(level.to_dict())
                self._report_level(workload, system, level)
            out[system.name] = {"startup_s": round(max(startup[system.name]), 1), "levels": levels}
            if system.serve_args:
                out[system.name]["flags"] = list(system.serve_args)
            if params[system.name]:
                out[system.name]["server"] = params[system.name]
        return out

    def _serve_round(
        self,
        mine: list[System],
        workload: Workload,
        onnx_path: Path,
        model: str,
        images: ImageSet,
        pixels: list[Any],
        concurrency: tuple[int, ...],
        window_s: float,
        round_: int,
        windows: dict[tuple[str, int], list[LevelResult]],
    ) -> tuple[float, dict[str, Any]]:
        """Start the server process of ``mine``, run one window per level and system, stop it. Returns the start-up
        seconds and, for our server, the batching parameters it reported."""
        config = self.config
        first = mine[0]
        logs = config.cache_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        tag = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{workload.preset}-{first.server}-{'-'.join(first.serve_args)}")
        tag = tag.strip("-") + ("-" + first.model.stem if first.model else "")
        batch_log = logs / f"{tag}-batches.txt"
        batch_log.write_text("")
        ports = servers.ports_for(mine)
        port = ports.http
        flags = [*config.serve_args, *first.serve_args]
        model_file = first.model or onnx_path
        argv, health = servers.start_command(first.server, model_file, port, flags, batch_log, ports.grpc)
        if first.server == "litserve":
            argv += ["--batch-timeout-ms", str(config.litserve_batch_timeout_ms)]
        process = servers.ServerProcess(first.server, argv, port, health, logs / f"{tag}.log")
        seconds = process.start()
        found = servers.model_parameters(port, model) if first.server == "stageformer" else {}
        chosen = f", batch size {found['max_batch_size']}" if "max_batch_size" in found else ""
        names = ", ".join(s.name for s in mine)
        where = f"port {port}" + (f" (gRPC {ports.grpc})" if ports.grpc else "")
        self.progress(f"{workload.name}: round {round_ + 1}, {names} ready on {where} in {seconds:.1f} s{chosen}")
        try:
            loads = {s.name: servers.load_for(s, ports, model, images, pixels, config.grpc_channels) for s in mine}
            for level_concurrency in concurrency:
                for system in mine:
                    counters = servers.Counters(first.server, port, model, batch_log, process.pid)
                    plan = LoadPlan(
                        level_concurrency, window_s, config.warmup_s, config.max_requests, config.request_timeout_s
                    )
                    level = asyncio.run(loads[system.name].run(plan, *counters.hooks()))
                    level.extra = counters.totals()
                    windows[(system.name, level_concurrency)].append(level)
                    if process.process is not None and process.process.poll() is not None:
                        raise servers.ServerError(f"{first.server} died during the run:\n{process.log_tail()}")
        finally:
            process.stop()
        return seconds, found

    def _report_level(self, workload: Workload, system: System, level: LevelResult) -> None:
        batch = f", mean batch {level.mean_batch:.1f}" if level.mean_batch else ""
        if "cpu_ms_per_request" in level.extra:
            batch += f", server CPU {level.extra['cpu_ms_per_request']:.1f} ms/request"
        self.progress(
            f"{workload.name} {system.name} c={level.concurrency}: {level.throughput:.1f} req/s, "
            f"p50 {level.latency_ms['p50']:.1f} ms, p99 {level.latency_ms['p99']:.1f} ms{batch}, "
            f"{level.errors} errors"
        )

    @staticmethod
    def _merged(windows: list[LevelResult], system: System) -> LevelResult:
        level = merge(windows)
        level.extra = servers.Counters.combine([w.extra for w in windows])
        level.mean_batch = level.extra.get("mean_batch") if system.batches else 1.0
        if "inference_s" in level.extra:
            level.extra["inference_busy"] = level.extra["inference_s"] / level.seconds
        if "cpu_s" in level.extra and level.ok:
            level.extra["cpu_ms_per_request"] = level.extra["cpu_s"] * 1000.0 / level.ok
        if level.client_cpu_s is not None and level.ok:
            level.extra["client_cpu_ms_per_request"] = level.client_cpu_s * 1000.0 / level.ok
        return level

    def _tagged(self, tag: str, message: str) -> None:
        self.progress(f"{tag} {message}")

    # --- threads --------------------------------------------------------------------------------

    def threads_study(self, images: ImageSet) -> dict[str, Any]:
        """Our server's ``/v1`` under each thread variant, side by side in rotating rounds, per thread workload."""
        config = self.config
        out: dict[str, Any] = {
            "variants": {variant_label(v): list(variant_flags(v)) for v in config.thread_variants},
            "concurrency": list(config.thread_concurrency),
            "workloads": {},
        }
        for workload in pick_workloads(list(config.thread_workloads)):
            onnx_path = self._export(workload)
            info, pixels = servers.model_inputs(onnx_path, images)
            systems = [System(variant_label(v), "stageformer", "v1", variant_flags(v)) for v in config.thread_variants]
            out["workloads"][workload.name] = self.serve_side_by_side(
                systems, workload, onnx_path, info.name, images, pixels,
                concurrency=config.thread_concurrency, duration_s=config.thread_duration_s,
            )  # fmt: skip
        return out

    # --- int8 -----------------------------------------------------------------------------------

    def int8_study(self, images: ImageSet) -> dict[str, Any]:
        """int8 against fp32 for one workload: in-process at each batch size, top-1 agreement, and served."""
        from bench import int8

        config = self.config
        workload = pick_workloads([config.int8_workload])[0]
        out: dict[str, Any] = {"workload": workload.name}
        missing = int8.unsupported()
        if missing:
            self.progress(f"int8: skipped: {missing}")
            return {**out, "skipped": missing}
        calibration = int8.write_calibration(config.cache_dir / "calibration", images, config.calibration_images)
        fp32 = self._export(workload)
        try:
            quantized = self._export(workload, quantize="int8", calibration=calibration)
        except Exception as exc:  # the export's gate or the quantizer said no: report it, keep the rest
            self.progress(f"int8: the export failed: {exc}")
            return {**out, "skipped": f"the int8 export failed: {type(exc).__name__}: {exc}"}
        info, pixels = servers.model_inputs(fp32, images)
        out["calibration"] = {"folder": str(calibration), "images": len(int8.calibration_files(calibration))}
        out["export_gate"] = int8.quantization_metadata(quantized)
        out["agreement"] = int8.top1_agreement(fp32, quantized, [*pixels, *int8.calibration_pixels(calibration, info)])
        out["onnx_mb"] = {"fp32": fp32.stat().st_size / 1e6, "int8": quantized.stat().st_size / 1e6}
        limits: dict[str, list[dict[str, Any]]] = {"fp32": [], "int8": []}

        def measure(round_: int, params: ServerParams) -> None:  # the two files in turn, first one then the other
            for precision, path in (("fp32", fp32), ("int8", quantized))[:: 1 if round_ % 2 == 0 else -1]:
                tag = f"int8 study {precision} round {round_ + 1}"
                limits[precision].append(
                    engine.limit(
                        path, workload.image_size, batch_sizes=config.limit_batch_sizes,
                        budget_s=config.budget_s / config.rounds, progress=functools.partial(self._tagged, tag),
                    )
                )  # fmt: skip

        systems = [
            System(f"{servers.OURS_V1} fp32", "stageformer", "v1"),
            System(f"{servers.OURS_V1} int8", "stageformer", "v1", model=quantized),
        ]
        out["serving"] = self.serve_side_by_side(
            systems, workload, fp32, info.name, images, pixels,
            concurrency=config.int8_concurrency, duration_s=config.duration_s, after_round=measure,
        )  # fmt: skip
        out["limit"] = {precision: engine.combine_limits(runs) for precision, runs in limits.items()}
        return out


def batch_size_summary(serving: dict[str, Any], limit: dict[str, Any]) -> dict[str, Any]:
    """The batch size our server chose at each start (from ``/v2/models/{m}``), its own images/s table, and the
    bench's independent in-process figures at the chosen size and at batch 1."""
    ours = next((s for s in serving.values() if s.get("server")), None)  # /v1 and /v2 share one process
    starts: list[dict[str, Any]] = ours["server"] if ours else []
    chosen = [p["max_batch_size"] for p in starts if "max_batch_size" in p]
    if not chosen:
        return {}
    per_batch = {int(b): v["images_per_s"] for b, v in limit["per_batch"].items()}
    most = max(set(chosen), key=chosen.count)
    first = next(p for p in starts if p.get("max_batch_size") == most)
    return {
        "chosen": most,
        "chosen_per_start": chosen,
        "measured": all(p.get("max_batch_size_measured", False) for p in starts),
        "server_images_per_s": first.get("images_per_second_by_batch_size", {}),
        "limit_at_chosen": per_batch.get(most),
        "limit_at_1": per_batch.get(1),
        "lanes_per_start": [p.get("lanes", 0) for p in starts],
        "server_lane_images_per_s": first.get("images_per_second_full_session_vs_lanes", {}),
    }


def save(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=_jsonable) + "\n")


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
