"""Results JSON -> Markdown report, target checks and PNG plots. Works from the JSON alone, so a report
can be rewritten without measuring again (``python -m bench --report-only results.json``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.grpc_load import describe_channels
from bench.servers import LITSERVE, OURS_GRPC, OURS_V1, OURS_V2, PLAIN, PLAIN_OWN
from bench.targets import Check, level, ratio, summary, targets

__all__ = ["markdown", "plot_files", "targets", "write"]

COLOURS = {
    OURS_V1: "tab:blue",
    OURS_V2: "tab:cyan",
    OURS_GRPC: "tab:purple",
    PLAIN_OWN: "tab:orange",
    PLAIN: "tab:red",
    LITSERVE: "tab:green",
}
STATE = {True: "met", False: "missed", None: "not measured"}


# --- Markdown -----------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = ["---:" if a == "r" else "---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _marked(check: Check, digits: int = 2, suffix: str = "") -> str:
    """A figure, with ✓ or ✗ and its bound where a target sets one."""
    text = _fmt(check.value, digits, suffix)
    if check.met is None:
        return text
    sign = "≤" if check.at_most else "≥"
    return f"{text} {'✓' if check.met else '✗'} ({sign} {_fmt(check.bound, digits, suffix)})"


def machine_lines(meta: dict[str, Any]) -> list[str]:
    m = meta["machine"]
    gpu = ", ".join(m["gpus"]) if m["gpus"] else "none"
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    load = m.get("load_average_at_start")
    end = meta.get("load_average_at_end")
    lines = [
        f"- CPU: {m['cpu']}, {m['cores']} cores, {_fmt(m.get('memory_gib'))} GiB memory; GPU: {gpu}",
        f"- {m['os']}, Python {m['python']}; {versions}",
        f"- load average when the run started: {', '.join(map(str, load)) if load else 'unknown'}"
        + (f"; when it ended: {', '.join(map(str, end))}" if end else ""),
    ]
    return lines


def summary_section(results: dict[str, Any]) -> list[str]:
    """Per workload and level: our /v1 against the limit and the peers, with each target's mark."""
    rows = []
    for row in summary(results):
        checks, ours = row["checks"], row["ours"]
        rows.append(
            [
                row["workload"],
                str(row["concurrency"]),
                _fmt(ours["throughput"]),
                _marked(checks["of_limit"]),
                _marked(checks["x_plain"], suffix="x"),
                _marked(checks["p99_vs_plain"], 0),
                _marked(checks["x_litserve"], suffix="x"),
                _marked(checks["p99_vs_litserve"], 0),
                _marked(checks["p50_vs_plain"], 1) if checks["p50_vs_plain"].bound is not None else "",
            ]
        )
    if not rows:
        return []
    header = [
        "workload",
        "clients",
        f"{OURS_V1} req/s",
        "of limit",
        f"× {PLAIN_OWN}",
        "p99 ms vs plain",
        "× LitServe",
        "p99 ms vs LitServe",
        "p50 ms vs plain",
    ]
    lines = [
        "## Summary",
        "",
        f"Our `/v1` (JPEG files) against the in-process limit, the idiomatic endpoint ({PLAIN_OWN}) and LitServe, "
        "measured side by side. Where a target applies, the cell says ✓ or ✗ and the bound: a ratio's least "
        "value, or the peer's latency (for p50 at 1 client: plain's plus 10%).",
        "",
        *_table(header, rows, "lrrrrrrrr"),
        "",
        *protocols_section(results),
        "## Targets",
        "",
    ]
    items = [[t["target"], t["measured"], STATE[t["met"]]] for t in targets(results)]
    return [*lines, *_table(["target", "measured", ""], items, "lll"), ""]


def protocols_section(results: dict[str, Any]) -> list[str]:
    """Our ``/v2`` over HTTP (binary tensors) against the same tensors over gRPC, per workload and level."""
    rows, ratios = [], []
    for name, data in results.get("workloads", {}).items():
        doc = {"workloads": {name: data}}
        for lv in data.get("serving", {}).get(OURS_V2, {}).get("levels", []):
            c = lv["concurrency"]
            grpc = level(doc, name, OURS_GRPC, c)
            if grpc is None:
                continue
            speed = ratio(grpc["throughput"], lv["throughput"])
            if speed is not None:
                ratios.append(speed)
            rows.append([name, str(c), *_side_by_side(lv, grpc, speed)])
    if not rows:
        return []
    channels = _channels(results["meta"]["config"])
    header = ["workload", "clients", "HTTP req/s", "gRPC req/s", "gRPC ÷ HTTP", "p50 ms HTTP / gRPC"]
    header += ["p99 ms HTTP / gRPC", "server CPU ms/req HTTP / gRPC", "client CPU ms/req HTTP / gRPC"]
    spread = f"{min(ratios):.2f}x to {max(ratios):.2f}x, geometric mean {_geomean(ratios):.2f}x" if ratios else "–"
    return [
        "### `/v2` tensors: HTTP against gRPC",
        "",
        f"The same decoded `uint8` tensors to the same server process, side by side: {OURS_V2} (binary tensor "
        f"extension over HTTP/1.1, one keep-alive connection per client) and {OURS_GRPC} (`ModelInfer` with "
        f"`raw_input_contents`, {channels}). gRPC's requests/s against HTTP's: {spread}. `client CPU` is the load "
        "generator's own CPU time per request: one Python process for both, on the same cores as the server, so "
        "what the client spends the server cannot.",
        "",
        *_table(header, rows),
        "",
    ]


def _side_by_side(http: dict[str, Any], grpc: dict[str, Any], speed: float | None) -> list[str]:
    """The cells of one level: both throughputs, their ratio, and each latency and CPU figure as "HTTP / gRPC"."""

    def pair(get: Callable[[dict[str, Any]], float | None], digits: int = 1) -> str:
        return f"{_fmt(get(http), digits)} / {_fmt(get(grpc), digits)}"

    return [
        _fmt(http["throughput"]),
        _fmt(grpc["throughput"]),
        _fmt(speed, 2, "x"),
        pair(lambda lv: lv["latency_ms"]["p50"]),
        pair(lambda lv: lv["latency_ms"]["p99"]),
        pair(lambda lv: lv.get("extra", {}).get("cpu_ms_per_request")),
        pair(lambda lv: lv.get("extra", {}).get("client_cpu_ms_per_request"), 2),
    ]


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def engine_section(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    lines = ["## Engines", "", "Images/s in-process on random pixels, median of timed calls after a warm-up call.", ""]
    for workload in dict.fromkeys(r["workload"] for r in rows):
        mine = [r for r in rows if r["workload"] == workload]
        batches = sorted({r["batch"] for r in mine})
        engines = list(dict.fromkeys(r["engine"] for r in mine))
        table = []
        for name in engines:
            cells = {r["batch"]: r["images_per_s"] for r in mine if r["engine"] == name}
            table.append([name] + [_fmt(cells.get(b)) for b in batches])
        torch_cpu = {r["batch"]: r["images_per_s"] for r in mine if r["engine"] == "PyTorch eager, CPU"}
        ort_cpu = {r["batch"]: r["images_per_s"] for r in mine if r["engine"] == "ONNX Runtime, CPU"}
        if torch_cpu and ort_cpu:
            table.append(
                ["ONNX Runtime / PyTorch, CPU"]
                + [_fmt(ratio(ort_cpu.get(b), torch_cpu.get(b)), 2, "x") for b in batches]
            )
        lines += [f"### {workload}", "", *_table(["engine"] + [f"batch {b}" for b in batches], table), ""]
    return lines


def decoding_section(results: dict[str, Any]) -> list[str]:
    """Decoding cost and the model input's difference from the exact path, per workload and image set."""
    rows = []
    oversample = None
    unreduced = []
    for name, data in results.get("workloads", {}).items():
        study = data.get("decode", {}).get("study")
        if not study:
            continue
        oversample = study["oversample"]
        for label, figures in study["sets"].items():
            ms = figures["ms_per_image"]
            fast = figures["vs_exact"].get("fast", {})
            if fast and fast.get("identical") == fast.get("images"):
                unreduced.append(f"{label} at {name} (a short side under {2 * oversample * study['resize_to']:g} px)")
            for way, value in ms.items():
                diff = figures["vs_exact"].get(way)
                rows.append(
                    [
                        f"{name} (resize to {study['resize_to']})",
                        f"{label} ({_sizes(figures['sizes'])})",
                        way,
                        _fmt(value, 2),
                        _fmt(ratio(ms["exact"], value), 2, "x") if way != "exact" else "",
                        _psnr(diff),
                        "" if diff is None else str(diff["max_abs"]),
                    ]
                )
    if not rows:
        return []
    header = ["workload", "images", "decoding", "ms/image", "speed-up", "PSNR dB (min / mean)", "max |Δ|"]
    return [
        "## Decoding",
        "",
        "From JPEG bytes to the model's `uint8` input on one thread: `exact` decodes every pixel (`--decode exact`), "
        f"`fast` lets libjpeg decode at 1/2, 1/4 or 1/8 scale while the short side stays at least {oversample:g} "
        "times the resize target (`--decode fast`, the default), and `plain (own decode)` is the idiomatic peer's "
        "`draft()` to the resize target itself. PSNR and the largest difference of one pixel value compare the "
        "model input with the exact path's, image by image (`identical`: equal on every image). The 12-megapixel "
        "photos are mosaics of tiles cut from the same photos at full resolution (4032x3024, a phone camera's "
        "frame).",
        "",
        *_table(header, rows, "lllrrrr"),
        "",
    ] + ([f"`fast` decodes these exactly, being too small to reduce: {'; '.join(unreduced)}.", ""] if unreduced else [])


def _sizes(sizes: list[str]) -> str:
    if len(sizes) < 3:
        return ", ".join(sizes)
    sides = [int(side) for size in sizes for side in size.split("x")]
    return f"{len(sizes)} sizes, up to {max(sides)} px"


def _psnr(diff: dict[str, Any] | None) -> str:
    if diff is None:
        return ""
    if diff["psnr_min_db"] is None:
        return "identical"
    same = f"; {diff['identical']} identical" if diff["identical"] else ""
    return f"{diff['psnr_min_db']:.1f} / {diff['psnr_mean_db']:.1f}{same}"


def _batch_line(data: dict[str, Any]) -> str:
    batch = data.get("batch_size") or {}
    if not batch:
        return ""
    per_start = batch.get("chosen_per_start", [])
    own = ", ".join(f"{b}: {v:.1f}" for b, v in batch.get("server_images_per_s", {}).items())
    starts = (
        f"at every one of its {len(per_start)} starts"
        if len(set(per_start)) == 1
        else f"at its starts: {', '.join(map(str, per_start))}"
    )
    line = (
        f"- batch size (`--max-batch-size auto`): our server chose {batch['chosen']} {starts} (its start-up "
        f"measurement, images/s by batch size: {own}); in-process here: {_fmt(batch.get('limit_at_chosen'))} images/s "
        f"at batch {batch['chosen']}, {_fmt(batch.get('limit_at_1'))} at batch 1"
    )
    lanes = batch.get("lanes_per_start", [])
    if not lanes:
        return line
    rates = batch.get("server_lane_images_per_s", {})
    measured = (
        f" (its start-up measurement at the chosen batch size: full session {_fmt(rates.get('full_session'))}, lanes "
        f"side by side {_fmt(rates.get('lanes'))} images/s)"
        if rates
        else ""
    )
    return f"{line}\n- lanes (`--lanes auto`): {', '.join(map(str, lanes))} at its starts{measured}"


def workload_section(name: str, data: dict[str, Any], plot: str | None) -> list[str]:
    limit = data["limit"]
    decode = data["decode"]
    per_batch = ", ".join(f"{b}: {v['images_per_s']:.1f}" for b, v in limit["per_batch"].items())
    lines = [
        f"## Serving: {name}",
        "",
        f"- limit: {limit['images_per_s']:.1f} images/s ({limit['provider']}, in-process, decoded inputs, the faster "
        "of one session and of single-thread sessions side by side, one per core; best batch "
        f"{limit['best_batch']}, mean of {limit.get('measurements', 1)} measurements taken between the serving "
        f"rounds; by batch size {per_batch})",
        f"- JPEG decoding and preprocessing as the server does by default: {decode['ms_per_image']:.2f} ms per image "
        f"on one thread ({decode['ms_per_image'] * limit['images_per_s'] / 1000:.2f} of a core at the limit's rate)",
    ]
    batch = _batch_line(data)
    lines += [batch, ""] if batch else [""]
    lines += serving_table(name, data)
    for system, reason in data.get("skipped", {}).items():
        lines += ["", f"{system}: not run: {reason}."]
    errors = [
        f"- {system} at {lv['concurrency']} clients: {lv['first_error']}"
        for system, served in data["serving"].items()
        for lv in served["levels"]
        if lv["errors"] and lv.get("first_error")
    ]
    if errors:
        lines += ["", "First error per level that had errors:", "", *errors]
    if plot:
        lines += ["", f"![{name}: throughput and p99 latency against concurrency]({plot})"]
    return [*lines, ""]


def serving_table(name: str, data: dict[str, Any]) -> list[str]:
    header = ["system", "clients", "req/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "errors"]
    header += ["× plain (own)", "× LitServe", "of limit", "CPU ms/req"]
    doc = {"workloads": {name: data}}
    rows = []
    for system, served in data["serving"].items():
        for lv in served["levels"]:
            c = lv["concurrency"]
            plain = level(doc, name, PLAIN_OWN, c)
            lit = level(doc, name, LITSERVE, c)
            rows.append(
                [
                    system,
                    str(c),
                    _fmt(lv["throughput"]),
                    _fmt(lv["latency_ms"]["p50"]),
                    _fmt(lv["latency_ms"]["p95"]),
                    _fmt(lv["latency_ms"]["p99"]),
                    _fmt(lv.get("mean_batch"), 1),
                    str(lv["errors"]),
                    _fmt(ratio(lv["throughput"], plain["throughput"] if plain else None), 2, "x"),
                    _fmt(ratio(lv["throughput"], lit["throughput"] if lit else None), 2, "x"),
                    _fmt(ratio(lv["throughput"], data["limit"]["images_per_s"]), 2),
                    _fmt(lv.get("extra", {}).get("cpu_ms_per_request")),
                ]
            )
    return _table(header, rows, "lrrrrrrrrrrr")


def serving_intro(meta: dict[str, Any]) -> list[str]:
    config = meta["config"]
    images = meta["images"]
    lines = [
        "## Serving under load",
        "",
        "A closed loop: each client holds one keep-alive connection (gRPC: a channel) and sends its next request "
        "when the answer to the last one has arrived. Each level is measured for "
        f"{config['duration_s']:g} s per system in {config.get('rounds', 1)} windows: in each round every server "
        "in turn (in a rotating order) is started, runs one window per level, and is stopped, so that a change in "
        "the machine's background load touches every system alike and only one server holds memory at a time. "
        f"Each window starts after {config['warmup_s']:g} s of warm-up and once every client has had an answer; a "
        "request counts when it completes inside a window. Latency is the client's, from sending to the last byte "
        "of the answer. The load generator runs on the same machine and cores as the servers.",
        "",
        f"Images: {len(images['names'])} {images['source']} as JPEG files (mean {images['mean_bytes'] / 1000:.0f} kB; "
        f"{', '.join('x'.join(map(str, s)) for s in images['sizes'])}), sent in turn.",
        "",
        f"- **{OURS_V1}**: `stageformer serve` with its defaults (batch size measured at start-up, fast decoding), "
        "the JPEG files as multipart `file` parts to `/v1/models/{model}/classify` (decoding, preprocessing and "
        "top-5 in the server).",
        f"- **{OURS_V2}**: the same server, Open Inference Protocol with binary tensors: pixels the client decoded "
        "and preprocessed beforehand, as a KServe/Triton client sends them (no decoding in the server).",
        f"- **{OURS_GRPC}**: the same server process and the same tensors through gRPC (`inference."
        "GRPCInferenceService/ModelInfer`, Triton's protocol, on the server's `--grpc-port`) with the pixels in "
        "`raw_input_contents` and the top 5 asked for with the classification parameter; each distinct request "
        f"serialized once beforehand and sent with `grpc.aio`, {_channels(config)}. Servers whose systems do not "
        "use gRPC start with `--grpc-port 0`.",
        f"- **{PLAIN_OWN}**: `bench/peers/fastapi_own_decode.py`, what a competent engineer writes in twenty lines: "
        "a plain `def` endpoint with `UploadFile` (FastAPI's thread pool), its own Pillow decoding (`draft()` to the "
        "resize target, `convert('RGB')`, resize of the short side, centre crop, the model's sizes and filter), one "
        "`session.run` per request with ONNX Runtime's default options, no batching.",
        f"- **{PLAIN}**: `bench/peers/plain_fastapi.py`, the same kind of endpoint decoding with the server's own "
        "function (`service.images.prepare`, every pixel), so the two differ only in serving.",
        f"- **{LITSERVE}**: `bench/peers/litserve_peer.py`, LitServe with `max_batch_size=16`, "
        f"`batch_timeout={config.get('litserve_batch_timeout_ms', 2.0):g} ms`, one worker, decoding with the "
        "server's function.",
        "",
        "All systems serve the same ONNX file, answer with the top 5 classes, and get the same requests from the "
        f"same client. `× plain (own)` and `× LitServe` compare with {PLAIN_OWN} and LitServe at the same "
        "concurrency; `of limit` divides by the in-process limit. Mean batch comes from the server's `/metrics` "
        "(LitServe: from its batch log). `CPU ms/req` is the CPU time the server's whole process group used per "
        "answered request (all threads and worker processes), a measure of efficiency that other load on the "
        "machine moves far less than throughput.",
        "",
    ]
    if config.get("serve_args"):
        lines += [f"Server flags: `{' '.join(config['serve_args'])}`.", ""]
    return lines


def _channels(config: dict[str, Any]) -> str:
    return describe_channels(config.get("grpc_channels", 0))


def threads_section(data: dict[str, Any] | None) -> list[str]:
    """Our server's /v1 under each thread setting, per workload, and which setting did best."""
    if not data or not data.get("workloads"):
        return []
    levels = data["concurrency"]
    lines = [
        "## Threads",
        "",
        "Our server's `/v1` (JPEG files) under each split of the cores, side by side in rotating rounds like the "
        "serving comparison: `--lanes` (single-thread sessions that run side by side while requests queue; auto, "
        "the default, keeps them unless measured more than 5% slower at start-up; off with `--threads` or "
        "`--instances`), "
        "`--threads` (ONNX Runtime intra-op threads per session; 0 lets ONNX Runtime decide), "
        "`--instances` (sessions per model, each with its own inference thread), `--decode-workers` (the decode "
        "pool; 0 is one per CPU). uvicorn runs one event loop thread in every variant. `CPU` is the server's CPU "
        "time per request at the highest level.",
        "",
    ]
    header = ["variant"]
    for c in levels:
        header += [f"{c} client{'s' if c > 1 else ''} req/s", "p50 ms", "p99 ms"]
    header += ["CPU ms/req", "batch size"]
    for workload, systems in data["workloads"].items():
        rows = []
        for variant, served in systems.items():
            row = [f"{variant} (`{' '.join(served.get('flags', [])) or 'no flags'}`)"]
            for lv in served["levels"]:
                row += [_fmt(lv["throughput"]), _fmt(lv["latency_ms"]["p50"]), _fmt(lv["latency_ms"]["p99"])]
            row.append(_fmt(served["levels"][-1].get("extra", {}).get("cpu_ms_per_request")))
            chosen = sorted({p.get("max_batch_size") for p in served.get("server", [])} - {None})
            row.append(", ".join(map(str, chosen)))
            rows.append(row)
        lines += [f"### {workload}", "", *_table(header, rows, "l" + "r" * (len(header) - 1)), ""]
        lines += [f"- {line}" for line in best_variants(systems, levels)] + [""]
    overall = overall_variant(data)
    if overall:
        lines += [overall, ""]
    return lines


def best_variants(systems: dict[str, Any], levels: list[int]) -> list[str]:
    lines = []
    for i, c in enumerate(levels):
        tps = {v: s["levels"][i]["throughput"] for v, s in systems.items()}
        best = max(tps, key=lambda v: tps[v])
        lines.append(
            f"most requests/s at {c} client{'s' if c > 1 else ''}: {best} ({tps[best]:.1f}; defaults "
            f"{_fmt(tps.get('defaults'))})"
        )
    return lines


def overall_variant(data: dict[str, Any]) -> str:
    """The variant with the highest geometric mean, over every workload and level, of its throughput relative
    to the best variant's there."""
    scores: dict[str, list[float]] = {}
    for systems in data["workloads"].values():
        for i in range(len(data["concurrency"])):
            best = max(s["levels"][i]["throughput"] for s in systems.values()) or 1.0
            for variant, s in systems.items():
                scores.setdefault(variant, []).append(max(s["levels"][i]["throughput"], 1e-9) / best)
    if not scores:
        return ""
    geo = {v: math.exp(sum(math.log(x) for x in xs) / len(xs)) for v, xs in scores.items()}
    ranked = sorted(geo, key=lambda v: -geo[v])
    return (
        "Over all workloads and levels (geometric mean of each variant's throughput relative to the best one's "
        "at the same workload and level): " + ", ".join(f"{v} {geo[v]:.2f}" for v in ranked) + "."
    )


def int8_section(data: dict[str, Any] | None) -> list[str]:
    if not data:
        return []
    lines = ["## int8", ""]
    if "limit" not in data:
        return [*lines, f"int8 against fp32 for {data.get('workload')}: not measured: {data.get('skipped')}.", ""]
    fp32, int8 = data["limit"]["fp32"], data["limit"]["int8"]
    batches = sorted({int(b) for b in fp32["per_batch"]} & {int(b) for b in int8["per_batch"]})

    def at(limit: dict[str, Any], b: int) -> float | None:
        found = limit["per_batch"].get(b, limit["per_batch"].get(str(b)))
        return None if found is None else float(found["images_per_s"])

    rows = [
        ["fp32", *[_fmt(at(fp32, b)) for b in batches]],
        ["int8", *[_fmt(at(int8, b)) for b in batches]],
        ["int8 / fp32", *[_fmt(ratio(at(int8, b), at(fp32, b)), 2, "x") for b in batches]],
    ]
    agreement = data["agreement"]
    gate = data.get("export_gate", {})
    lines += [
        f"{data['workload']}, quantized by `stageformer export --quantize int8` (ONNX Runtime static quantization) "
        f"with {data['calibration']['images']} calibration images made from the bench photos (crops, mirrors, "
        "quarter turns). In-process images/s on random pixels by batch size, the two files measured in turn after "
        "every serving round:",
        "",
        *_table(["precision", *[f"batch {b}" for b in batches]], rows),
        "",
        f"- best batch: int8 {int8['images_per_s']:.1f} images/s (batch {int8['best_batch']}) against fp32 "
        f"{fp32['images_per_s']:.1f} (batch {fp32['best_batch']}): "
        f"{_fmt(ratio(int8['images_per_s'], fp32['images_per_s']), 2, 'x')}",
        f"- top-1 agreement of the int8 graph with the fp32 graph (ONNX Runtime): {agreement['top1_agreement']:.1%} of "
        f"{agreement['images']} images (the bench photos and the calibration images); largest softmax difference "
        f"{agreement['max_abs_softmax_diff']:.3f}",
        f"- file size: fp32 {data['onnx_mb']['fp32']:.1f} MB, int8 {data['onnx_mb']['int8']:.1f} MB",
    ]
    if gate:
        lines.append(f"- the export's own gate (against PyTorch fp32): `{_compact(gate)}`")
    lines += ["", f"Served, `/v1` JPEG files, {OURS_V1} with its defaults on each file, side by side:", ""]
    return [*lines, *int8_serving_table(data["serving"]), ""]


def int8_serving_table(serving: dict[str, Any]) -> list[str]:
    names = list(serving)
    fp32 = {lv["concurrency"]: lv for lv in serving[names[0]]["levels"]} if names else {}
    rows = []
    for name, served in serving.items():
        for lv in served["levels"]:
            base = fp32.get(lv["concurrency"])
            rows.append(
                [
                    name,
                    str(lv["concurrency"]),
                    _fmt(lv["throughput"]),
                    _fmt(lv["latency_ms"]["p50"]),
                    _fmt(lv["latency_ms"]["p99"]),
                    _fmt(lv.get("mean_batch"), 1),
                    str(lv["errors"]),
                    _fmt(ratio(lv["throughput"], base["throughput"] if base else None), 2, "x"),
                    _fmt(lv.get("extra", {}).get("cpu_ms_per_request")),
                ]
            )
    header = ["system", "clients", "req/s", "p50 ms", "p99 ms", "mean batch", "errors", "× fp32", "CPU ms/req"]
    return _table(header, rows)


def _compact(value: Any, limit: int = 400) -> str:
    import json

    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def markdown(results: dict[str, Any], plots: dict[str, str], command: str) -> str:
    meta = results["meta"]
    lines = [
        "# stageformer benchmark",
        "",
        f"Run {meta['started']}, {_fmt(meta.get('duration_s'), 0)} s in all, with `{command}`.",
        "",
        "## Machine",
        "",
        *machine_lines(meta),
        "",
    ]
    lines += summary_section(results)
    lines += engine_section(results.get("engine", []))
    if plots.get("engine"):
        lines += [f"![engines]({plots['engine']})", ""]
    lines += decoding_section(results)
    if results.get("workloads"):
        lines += serving_intro(meta)
    for name, data in results.get("workloads", {}).items():
        lines += workload_section(name, data, plots.get(name))
    lines += threads_section(results.get("threads"))
    lines += int8_section(results.get("int8"))
    return "\n".join(lines).rstrip() + "\n"


# --- plots --------------------------------------------------------------------------------------


def plot_files(results: dict[str, Any], folder: Path) -> dict[str, str]:
    """One PNG per workload (throughput and p99 against concurrency, all systems) and one of the
    engines; returns their file names by workload (and ``engine``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    names: dict[str, str] = {}
    gpu = results["meta"]["machine"]["gpus"]
    where = f"{results['meta']['machine']['cpu']}, {results['meta']['machine']['cores']} cores" + (
        f", {gpu[0]}" if gpu else ""
    )
    for name, data in results["workloads"].items():
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for system, served in data["serving"].items():
            levels = served["levels"]
            xs = [lv["concurrency"] for lv in levels]
            style = {"color": COLOURS.get(system), "marker": "o", "label": system}
            left.plot(xs, [lv["throughput"] for lv in levels], **style)
            right.plot(xs, [lv["latency_ms"]["p99"] for lv in levels], **style)
        left.axhline(data["limit"]["images_per_s"], color="grey", linestyle="--", label="in-process limit")
        left.set(
            title="throughput",
            xlabel="concurrent clients",
            ylabel="requests/s (1 image each)",
            xscale="log",
            ylim=(0, None),
        )
        right.set(title="p99 latency", xlabel="concurrent clients", ylabel="ms", xscale="log", yscale="log")
        for ax in (left, right):
            ax.set_xticks([lv["concurrency"] for served in data["serving"].values() for lv in served["levels"]] or [1])
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.get_yaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(True, alpha=0.3)
        left.legend(fontsize=8)
        fig.suptitle(f"{name} — {where}", fontsize=10)
        fig.tight_layout()
        file = f"serving-{name.replace('@', '-')}.png"
        fig.savefig(folder / file, dpi=110)
        plt.close(fig)
        names[name] = file
    rows = results.get("engine", [])
    if rows:
        workloads = list(dict.fromkeys(r["workload"] for r in rows))
        fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 4), squeeze=False)
        for ax, workload in zip(axes[0], workloads, strict=True):
            mine = [r for r in rows if r["workload"] == workload]
            engines = list(dict.fromkeys(r["engine"] for r in mine))
            batches = sorted({r["batch"] for r in mine})
            width = 0.8 / len(engines)
            for i, engine in enumerate(engines):
                values = {r["batch"]: r["images_per_s"] for r in mine if r["engine"] == engine}
                ax.bar(
                    [j + i * width for j in range(len(batches))],
                    [values.get(b, 0) for b in batches],
                    width,
                    label=engine,
                )
            ax.set_xticks(
                [j + width * (len(engines) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches]
            )
            ax.set(title=workload, ylabel="images/s")
            ax.grid(True, axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        fig.suptitle(f"engines — {where}", fontsize=10)
        fig.tight_layout()
        fig.savefig(folder / "engines.png", dpi=110)
        plt.close(fig)
        names["engine"] = "engines.png"
    return names


def write(results: dict[str, Any], folder: Path, command: str) -> Path:
    """``folder/report.md`` and its plots; returns the report's path."""
    plots = plot_files(results, folder)
    path = folder / "report.md"
    path.write_text(markdown(results, plots, command))
    return path
