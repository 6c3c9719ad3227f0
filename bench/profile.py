"""Profile one system under load: start it, drive it at one concurrency, and record it with py-spy
(all threads, native frames of ONNX Runtime included where py-spy can read them). Writes a flame
graph (SVG) and prints the functions with the most samples.

    python -m bench.profile xformers_cifar_metaformer --system "stageformer /v1" --concurrency 16 --seconds 15

Needs ``py-spy`` (the ``bench`` extra) and permission to attach to processes (root, or ptrace allowed).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from bench import servers
from bench.images import load_images
from bench.loadgen import LoadPlan
from bench.runner import BENCH_DIR
from bench.workloads import WORKLOADS, export_workload, pick_workloads


def top_frames(collapsed: str, count: int = 25) -> list[tuple[str, float]]:
    """(frame, share of samples) of the leaf frames with the most samples, from py-spy's raw output
    (``stack;frames;... N`` per line)."""
    totals: collections.Counter[str] = collections.Counter()
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            totals[stack.split(";")[-1]] += int(n)
    all_samples = sum(totals.values()) or 1
    return [(frame, n / all_samples) for frame, n in totals.most_common(count)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", help=f"a model preset, e.g. {', '.join(WORKLOADS)}")
    parser.add_argument("--system", default=servers.OURS_V1, choices=list(servers.SYSTEMS))
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--serve-arg", action="append", default=[], metavar="FLAG")
    parser.add_argument("--native", action="store_true", help="also sample native (C/C++) frames")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / ".cache" / "profiles")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        print("bench.profile: py-spy is not installed; pip install -e '.[bench]'", file=sys.stderr)
        return 2
    workload = pick_workloads([args.workload])[0]
    cache = BENCH_DIR / ".cache"
    onnx_path = export_workload(workload, cache / "models")
    images = load_images(8)
    info, pixels = servers.model_inputs(onnx_path, images)
    system = servers.STANDARD[args.system]
    server = system.server
    ports = servers.ports_for([system])
    port = ports.http
    batch_log = cache / "logs" / "profile-batches.txt"
    argv_, health = servers.start_command(server, onnx_path, port, args.serve_arg, batch_log, ports.grpc)
    process = servers.ServerProcess(server, argv_, port, health, cache / "logs" / "profile-server.log")
    process.start()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{workload.preset}-{server}-c{args.concurrency}"
    raw = args.out / f"{stem}.txt"
    try:
        assert process.process is not None
        record = [py_spy, "record", "--pid", str(process.process.pid), "--subprocesses", "--threads"]
        record += ["--duration", str(int(args.seconds)), "--rate", "200", "--format", "raw", "--output", str(raw)]
        if args.native:
            record.append("--native")
        load = servers.load_for(system, ports, info.name, images, pixels)
        plan = LoadPlan(args.concurrency, args.seconds + 2.0, warmup_s=1.0)
        spy = threading.Thread(target=lambda: subprocess.run(record, check=False, capture_output=True))
        spy.start()
        level = asyncio.run(load.run(plan))
        spy.join()
    finally:
        process.stop()
    p99 = level.latency_ms["p99"]
    print(f"{args.system} at {args.concurrency} clients: {level.throughput:.1f} req/s, p99 {p99:.0f} ms")
    if raw.exists():
        for frame, share in top_frames(raw.read_text()):
            print(f"{share * 100:5.1f}%  {frame}")
        print(f"collapsed stacks: {raw}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
