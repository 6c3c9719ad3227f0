"""Results JSON -> Markdown report, target checks and PNG plots. Works from the JSON alone, so a report
can be rewritten without measuring again (``python -m bench --report-only results.json``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.servers import LITSERVE, OURS_V1, OURS_V2, PLAIN

OURS = OURS_V1  # the server's figure that peers are compared with: the same JPEG files, the same route kind
COLOURS = {OURS_V1: "tab:blue", OURS_V2: "tab:cyan", PLAIN: "tab:red", LITSERVE: "tab:green"}


def _level(results: dict[str, Any], workload: str, system: str, concurrency: int) -> dict[str, Any] | None:
    serving = results.get("workloads", {}).get(workload, {}).get("serving", {})
    for level in serving.get(system, {}).get("levels", []):
        if level["concurrency"] == concurrency:
            found: dict[str, Any] = level
            return found
    return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _workload_key(results: dict[str, Any], preset: str) -> str | None:
    for key, data in results.get("workloads", {}).items():
        if data.get("preset") == preset:
            return str(key)
    return None


# --- targets ------------------------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with what was measured and whether it is met (None: not measured)."""
    rows: list[dict[str, Any]] = []

    key = _workload_key(results, "poolformer_s12")
    level = _level(results, key, OURS, 16) if key else None
    limit = results["workloads"][key]["limit"]["images_per_s"] if key else None
    ratio = _ratio(level["throughput"] if level else None, limit)
    measured = "not measured"
    if ratio is not None and level and limit:
        measured = f"{ratio:.2f} of the limit ({level['throughput']:.1f} / {limit:.1f} images/s, JPEG files)"
        v2 = _level(results, key, OURS_V2, 16) if key else None
        if v2:
            measured += f"; {OURS_V2} {_ratio(v2['throughput'], limit):.2f}"
    rows.append(
        {
            "target": f"poolformer_s12@224: {OURS} throughput at 16 clients >= 0.85 of the in-process limit",
            "measured": measured,
            "met": None if ratio is None else ratio >= 0.85,
        }
    )

    key = _workload_key(results, "xformers_cifar_metaformer")
    ours = _level(results, key, OURS, 64) if key else None
    plain = _level(results, key, PLAIN, 64) if key else None
    if ours and plain:
        ratio = _ratio(ours["throughput"], plain["throughput"])
        p99_ok = ours["latency_ms"]["p99"] <= plain["latency_ms"]["p99"]
        rows.append(
            {
                "target": "xformers_cifar_metaformer@32: >= 1.5x plain FastAPI throughput at 64 clients, p99 no worse",
                "measured": f"{ratio:.2f}x; p99 {ours['latency_ms']['p99']:.0f} vs {plain['latency_ms']['p99']:.0f} ms",
                "met": ratio is not None and ratio >= 1.5 and p99_ok,
            }
        )
    else:
        rows.append(
            {
                "target": "xformers_cifar_metaformer@32: >= 1.5x plain FastAPI at 64",
                "measured": "not measured",
                "met": None,
            }
        )

    worst: list[str] = []
    met: bool | None = None
    for key in results.get("workloads", {}):
        for level in results["workloads"][key]["serving"].get(OURS, {}).get("levels", []):
            peer = _level(results, key, LITSERVE, level["concurrency"])
            if peer is None:
                continue
            ratio = _ratio(level["throughput"], peer["throughput"])
            ok = ratio is not None and ratio >= 1.0 and level["latency_ms"]["p99"] <= peer["latency_ms"]["p99"]
            met = ok if met is None else (met and ok)
            if not ok:
                worst.append(
                    f"{key} c={level['concurrency']}: {ratio:.2f}x, p99 {level['latency_ms']['p99']:.0f} vs "
                    f"{peer['latency_ms']['p99']:.0f} ms"
                    if ratio is not None
                    else f"{key} c={level['concurrency']}: no throughput"
                )
    lowest = _lowest_ratio(results, LITSERVE)
    measured = "not measured" if met is None else (f"lowest {lowest:.2f}x" if lowest is not None else "")
    if worst:
        measured += "; missed at " + "; ".join(worst)
    rows.append(
        {"target": ">= 1.0x LitServe's throughput at every concurrency, p99 no worse", "measured": measured, "met": met}
    )
    return rows


def _lowest_ratio(results: dict[str, Any], peer: str) -> float | None:
    ratios = []
    for key in results.get("workloads", {}):
        for level in results["workloads"][key]["serving"].get(OURS, {}).get("levels", []):
            other = _level(results, key, peer, level["concurrency"])
            r = _ratio(level["throughput"], other["throughput"] if other else None)
            if r is not None:
                ratios.append(r)
    return min(ratios) if ratios else None


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


def machine_lines(meta: dict[str, Any]) -> list[str]:
    m = meta["machine"]
    gpu = ", ".join(m["gpus"]) if m["gpus"] else "none"
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    load = m.get("load_average_at_start")
    return [
        f"- CPU: {m['cpu']}, {m['cores']} cores, {_fmt(m.get('memory_gib'))} GiB memory; GPU: {gpu}",
        f"- {m['os']}, Python {m['python']}; {versions}",
        f"- load average when the run started: {', '.join(map(str, load)) if load else 'unknown'}",
    ]


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
                + [_fmt(_ratio(ort_cpu.get(b), torch_cpu.get(b)), 2, "x") for b in batches]
            )
        lines += [f"### {workload}", "", *_table(["engine"] + [f"batch {b}" for b in batches], table), ""]
    return lines


def workload_section(name: str, data: dict[str, Any], plot: str | None) -> list[str]:
    limit = data["limit"]
    decode = data["decode"]
    per_batch = ", ".join(f"{b}: {v['images_per_s']:.1f}" for b, v in limit["per_batch"].items())
    lines = [
        f"## Serving: {name}",
        "",
        f"- limit: {limit['images_per_s']:.1f} images/s ({limit['provider']}, in-process, decoded inputs, best batch "
        f"{limit['best_batch']}, mean of {limit.get('measurements', 1)} measurements taken between the serving "
        f"rounds; by batch size {per_batch})",
        f"- JPEG decoding and preprocessing: {decode['ms_per_image']:.2f} ms per image on one thread "
        f"({decode['ms_per_image'] * limit['images_per_s'] / 1000:.2f} of a core at the limit's rate)",
        "",
    ]
    header = [
        "system",
        "clients",
        "req/s",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "mean batch",
        "errors",
        "× plain",
        "× LitServe",
        "of limit",
        "CPU ms/req",
    ]
    rows = []
    for system, served in data["serving"].items():
        for level in served["levels"]:
            c = level["concurrency"]
            plain = _level({"workloads": {name: data}}, name, PLAIN, c)
            lit = _level({"workloads": {name: data}}, name, LITSERVE, c)
            rows.append(
                [
                    system,
                    str(c),
                    _fmt(level["throughput"]),
                    _fmt(level["latency_ms"]["p50"]),
                    _fmt(level["latency_ms"]["p95"]),
                    _fmt(level["latency_ms"]["p99"]),
                    _fmt(level.get("mean_batch"), 1),
                    str(level["errors"]),
                    _fmt(_ratio(level["throughput"], plain["throughput"] if plain else None), 2, "x"),
                    _fmt(_ratio(level["throughput"], lit["throughput"] if lit else None), 2, "x"),
                    _fmt(_ratio(level["throughput"], limit["images_per_s"]), 2),
                    _fmt(level.get("extra", {}).get("cpu_ms_per_request")),
                ]
            )
    lines += _table(header, rows, "lrrrrrrrrrrr")
    for system, reason in data.get("skipped", {}).items():
        lines += ["", f"{system}: not run: {reason}."]
    errors = [
        f"- {system} at {level['concurrency']} clients: {level['first_error']}"
        for system, served in data["serving"].items()
        for level in served["levels"]
        if level["errors"] and level.get("first_error")
    ]
    if errors:
        lines += ["", "First error per level that had errors:", "", *errors]
    if plot:
        lines += ["", f"![{name}: throughput and p99 latency against concurrency]({plot})"]
    return [*lines, ""]


def markdown(results: dict[str, Any], plots: dict[str, str], command: str) -> str:
    meta = results["meta"]
    config = meta["config"]
    lines = [
        "# stageformer benchmark",
        "",
        f"Run {meta['started']}, {_fmt(meta.get('duration_s'), 0)} s in all, with `{command}`.",
        "",
        "## Machine",
        "",
        *machine_lines(meta),
        "",
        "## Targets",
        "",
    ]
    rows = [
        [t["target"], t["measured"], {True: "met", False: "missed", None: "not measured"}[t["met"]]]
        for t in targets(results)
    ]
    lines += [*_table(["target", "measured", ""], rows, "lll"), ""]
    lines += engine_section(results.get("engine", []))
    if plots.get("engine"):
        lines += [f"![engines]({plots['engine']})", ""]
    images = meta["images"]
    lines += [
        "## Serving under load",
        "",
        "A closed loop: each client holds one keep-alive connection and sends its next request when the answer "
        f"to the last one has arrived. Each level is measured for {config['duration_s']:g} s per system in "
        f"{config.get('rounds', 1)} windows: in each round every server in turn (in a rotating order) is started, "
        "runs one window per level, and is stopped, so that a change in the machine's background load touches "
        "every system alike and only one server holds memory at a time. Each window "
        f"starts after {config['warmup_s']:g} s of warm-up and once every client has had an answer; a request "
        "counts when it completes inside a window. Latency is the client's, from sending to the last byte of the "
        "answer. The load generator runs on the same machine and cores as the servers.",
        "",
        f"Images: {len(images['names'])} {images['source']} as JPEG files (mean {images['mean_bytes'] / 1000:.0f} kB; "
        f"{', '.join('x'.join(map(str, s)) for s in images['sizes'])}), sent in turn.",
        "",
        f"- **{OURS_V1}**: `stageformer serve`, the JPEG files as multipart `file` parts to "
        "`/v1/models/{model}/classify` (decoding, preprocessing and top-5 in the server).",
        f"- **{OURS_V2}**: the same server, Open Inference Protocol with binary tensors: pixels the client decoded "
        "and preprocessed beforehand, as a KServe/Triton client sends them (no decoding in the server).",
        f"- **{PLAIN}**: `bench/peers/plain_fastapi.py`, a plain `def` endpoint with `UploadFile`, one "
        "`session.run` per request in FastAPI's default thread pool, no batching.",
        f"- **{LITSERVE}**: `bench/peers/litserve_peer.py`, LitServe with `max_batch_size=16`, "
        f"`batch_timeout={config.get('litserve_batch_timeout_ms', 2.0):g} ms` (the server's defaults), one worker.",
        "",
        "All systems serve the same ONNX file, decode with the same function (`service.images.prepare`), answer "
        "with the top 5 classes, and get the same requests from the same client. `× plain` and `× LitServe` "
        "compare with the peer at the same concurrency; `of limit` divides by the in-process limit. "
        "Mean batch comes from the server's `/metrics` (LitServe: from its batch log). `CPU ms/req` is the CPU "
        "time the server's whole process group used per answered request (all threads and worker processes), a "
        "measure of efficiency that other load on the machine moves far less than throughput.",
        "",
    ]
    if config.get("serve_args"):
        lines += [f"Server flags: `{' '.join(config['serve_args'])}`.", ""]
    for name, data in results["workloads"].items():
        lines += workload_section(name, data, plots.get(name))
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
