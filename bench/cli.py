"""``python -m bench``: run the benchmark and write ``report.md``, ``results.json`` and PNG plots.

``add_arguments`` and ``run`` are the whole interface, so the same options can hang under another
command (``stageformer bench``)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench import servers
from bench.workloads import PARTS, THREAD_VARIANTS, THREAD_WORKLOADS, WORKLOADS

if TYPE_CHECKING:
    from bench.runner import BenchConfig

BENCH_DIR = Path(__file__).resolve().parent

DESCRIPTION = (
    "Measure engines (PyTorch eager vs ONNX Runtime), decoding, serving under load (stageformer /v1, /v2 and gRPC "
    "against plain FastAPI endpoints and LitServe, on the same ONNX file and JPEG files) and the in-process limit, our "
    "server's thread settings, and int8 against fp32; write report.md, results.json and PNG plots. The full run "
    "took 35 minutes on 2 CPU cores with the models already exported; --quick is a check, not figures. "
    "`python -m bench gpu` checks the GPU path instead (see bench/gpu.py)."
)

QUICK = {
    "duration_s": 3.0,
    "warmup_s": 1.0,
    "budget_s": 0.5,
    "engine_batch_sizes": (1, 8),
    "limit_batch_sizes": (1, 8, 16),
    "thread_variants": ("defaults", "threads=1,instances=2", "threads=2,decode-workers=1"),
    "thread_duration_s": 3.0,
    "int8_concurrency": (16,),
    "calibration_images": 16,
}


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workloads",
        nargs="+",
        metavar="PRESET",
        help=f"model presets (default: {', '.join(WORKLOADS)}); others run at their own size, e.g. tiny for a check",
    )
    parser.add_argument(
        "--systems", nargs="+", metavar="SYSTEM", choices=list(servers.SYSTEMS),
        help=f"default: all ({', '.join(repr(s) for s in servers.SYSTEMS)})",
    )  # fmt: skip
    parser.add_argument("--concurrency", type=_ints, default=(1, 4, 16, 64), help="client counts (default 1,4,16,64)")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per level and system (default 10)"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="windows the duration is split into, systems taking turns (default 2)"
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per level (default 2)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per engine or limit figure (default 2)")
    parser.add_argument("--max-requests", type=int, default=200_000, help="most requests per level (default 200000)")
    parser.add_argument("--engine-batch-sizes", type=_ints, default=(1, 8, 32), help="default 1,8,32")
    parser.add_argument("--limit-batch-sizes", type=_ints, default=(1, 2, 4, 8, 16), help="default 1,2,4,8,16")
    parser.add_argument("--no-engine", action="store_true", help="skip the PyTorch/ONNX Runtime engine comparison")
    parser.add_argument(
        "--skip", nargs="+", default=[], choices=PARTS, metavar="PART",
        help=f"parts not to run, of {', '.join(PARTS)}",
    )  # fmt: skip
    parser.add_argument("--only", nargs="+", choices=PARTS, metavar="PART", help="run only these parts")
    parser.add_argument(
        "--thread-variants", nargs="+", metavar="SPEC",
        help="server thread settings for the threads study, e.g. defaults threads=1,instances=2 "
        f"(default: {' '.join(THREAD_VARIANTS)})",
    )  # fmt: skip
    parser.add_argument(
        "--thread-workloads", nargs="+", metavar="PRESET", help=f"default: {', '.join(THREAD_WORKLOADS)}"
    )
    parser.add_argument(
        "--thread-concurrency", type=_ints, default=(1, 16), help="client counts of the threads study (default 1,16)"
    )
    parser.add_argument(
        "--thread-duration", type=float, default=6.0, help="measured seconds per level and variant (default 6)"
    )
    parser.add_argument(
        "--mosaics", type=int, default=2, help="12-megapixel JPEGs for the decoding figures (default 2; 0: none)"
    )
    parser.add_argument("--int8-workload", default="poolformer_s12", metavar="PRESET", help="default poolformer_s12")
    parser.add_argument(
        "--calibration-images", type=int, help="int8 calibration images made from the photos (default 48)"
    )
    parser.add_argument(
        "--int8-concurrency", type=_ints, default=(1, 16), help="client counts of the int8 rows (default 1,16)"
    )
    parser.add_argument(
        "--grpc-channels", type=int, default=0, metavar="N",
        help="gRPC channels the clients of stageformer gRPC share (default 0: one channel per client)",
    )  # fmt: skip
    parser.add_argument("--images", type=int, default=8, help="how many JPEG files to send in turn (default 8)")
    parser.add_argument("--synthetic-images", action="store_true", help="synthetic pictures instead of photos")
    parser.add_argument(
        "--serve-arg", action="append", default=[], metavar="FLAG",
        help="extra `stageformer serve` flag, e.g. --serve-arg=--max-batch-size=32 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="short levels and budgets: a check, not figures")
    parser.add_argument(
        "--out", type=Path, default=BENCH_DIR / "results", help="folder for the report (default bench/results)"
    )
    parser.add_argument("--cache-dir", type=Path, default=BENCH_DIR / ".cache", help="exported models and logs")
    parser.add_argument(
        "--report-only", type=Path, metavar="RESULTS.json", help="rewrite the report from saved results"
    )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    from bench.runner import BenchConfig

    values = {
        "workloads": tuple(args.workloads or ()),
        "systems": tuple(args.systems or servers.SYSTEMS),
        "concurrency": args.concurrency,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "warmup_s": args.warmup,
        "budget_s": args.budget,
        "max_requests": args.max_requests,
        "parts": _parts(args),
        "thread_workloads": tuple(args.thread_workloads or THREAD_WORKLOADS),
        "thread_concurrency": args.thread_concurrency,
        "thread_duration_s": args.thread_duration,
        "int8_workload": args.int8_workload,
        "int8_concurrency": args.int8_concurrency,
        "mosaics": args.mosaics,
        "engine_batch_sizes": args.engine_batch_sizes,
        "limit_batch_sizes": args.limit_batch_sizes,
        "images": args.images,
        "synthetic_images": args.synthetic_images,
        "serve_args": tuple(args.serve_arg),
        "grpc_channels": args.grpc_channels,
        "cache_dir": args.cache_dir,
    }
    given = {"thread_variants": args.thread_variants, "calibration_images": args.calibration_images}
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in given.items() if v is not None})
    if args.quick:
        values.update({k: v for k, v in QUICK.items() if given.get(k) is None})
    return BenchConfig(**values)


def _parts(args: argparse.Namespace) -> tuple[str, ...]:
    skipped = {*args.skip, *(["engine"] if args.no_engine else [])}
    return tuple(p for p in (args.only or PARTS) if p not in skipped)


def run(args: argparse.Namespace) -> int:
    """Run the benchmark as ``args`` say (or only rewrite the report); 0 on success."""
    from bench import report
    from bench.runner import Run, save

    argv = getattr(args, "argv", None)  # set by main(); absent when another command's parser called run()
    words = ["python", "-m", "bench", *argv] if argv is not None else ["stageformer", *sys.argv[1:]]
    command = " ".join(shlex.quote(w) for w in words)
    if args.report_only:
        results = json.loads(args.report_only.read_text())
        path = report.write(results, args.out, results["meta"].get("command", command))
        print(path)
        return 0
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 2

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    bench = Run(config, progress)
    try:
        results = bench.execute()
    except servers.ServerError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    results["meta"]["command"] = command
    save(results, args.out / "results.json")
    path = report.write(results, args.out, command)
    for target in report.targets(results):
        state = {True: "met", False: "MISSED", None: "not measured"}[target["met"]]
        progress(f"{state}: {target['target']} ({target['measured']})")
    print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=DESCRIPTION)
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)
