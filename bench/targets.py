"""The issue's targets, checked against a results document: one summary row per workload and concurrency
(``summary``), and one line per target (``targets``), each marked met, missed or not measured (None).

Ratios compare systems measured side by side in one run. The peers are ``plain FastAPI (own decode)`` (the
idiomatic endpoint) and LitServe; ``/v1`` (JPEG files) is our server's figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bench.servers import LITSERVE, OURS_V1, PLAIN_OWN

POOL, CIFAR = "poolformer_s12", "xformers_cifar_metaformer"


@dataclass(frozen=True)
class Rules:
    """What one workload must reach, by concurrency."""

    of_limit: dict[int, float] = field(default_factory=dict)  # /v1 throughput / in-process limit >= value
    x_plain: dict[int, float] = field(default_factory=dict)  # /v1 / plain (own decode) throughput >= value
    p99_plain: tuple[int, ...] = ()  # p99 no worse than plain's at these levels
    p50_plain: dict[int, float] = field(default_factory=dict)  # p50 <= value x plain's


RULES = {
    POOL: Rules({16: 0.90}, {1: 0.95, 16: 1.0, 64: 1.0}, (16, 64), {1: 1.10}),
    CIFAR: Rules({}, {16: 1.5, 64: 1.5}, (16, 64), {1: 1.10}),
}
LITSERVE_MIN = 1.2  # at every concurrency, with p99 no worse
INT8_SPEEDUP, INT8_AGREEMENT = 1.3, 0.99


def level(results: dict[str, Any], workload: str, system: str, concurrency: int) -> dict[str, Any] | None:
    serving = results.get("workloads", {}).get(workload, {}).get("serving", {})
    for found in serving.get(system, {}).get("levels", []):
        if found["concurrency"] == concurrency:
            result: dict[str, Any] = found
            return result
    return None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _p(lv: dict[str, Any] | None, q: str) -> float | None:
    return None if lv is None else float(lv["latency_ms"][q])


def _tp(lv: dict[str, Any] | None) -> float | None:
    return None if lv is None else float(lv["throughput"])


@dataclass
class Check:
    """One figure against its bound: ``value >= bound`` (or ``<=`` when ``at_most``)."""

    value: float | None
    bound: float | None = None
    at_most: bool = False

    @property
    def met(self) -> bool | None:
        if self.bound is None:
            return None
        if self.value is None:
            return False
        return self.value <= self.bound if self.at_most else self.value >= self.bound


def row_checks(results: dict[str, Any], workload: str, concurrency: int) -> dict[str, Check]:
    """The summary row of one workload and level: each figure with the bound a target sets on it (if any)."""
    data = results["workloads"][workload]
    rules = RULES.get(data.get("preset", ""), Rules())
    ours = level(results, workload, OURS_V1, concurrency)
    plain = level(results, workload, PLAIN_OWN, concurrency)
    lit = level(results, workload, LITSERVE, concurrency)
    has_lit = lit is not None
    p99_plain_bound = _p(plain, "p99") if concurrency in rules.p99_plain else None
    p50_factor = rules.p50_plain.get(concurrency)
    p50_plain = _p(plain, "p50")
    return {
        "of_limit": Check(ratio(_tp(ours), data.get("limit", {}).get("images_per_s")), rules.of_limit.get(concurrency)),
        "x_plain": Check(ratio(_tp(ours), _tp(plain)), rules.x_plain.get(concurrency) if plain else None),
        "p99_vs_plain": Check(_p(ours, "p99"), p99_plain_bound, at_most=True),
        "x_litserve": Check(ratio(_tp(ours), _tp(lit)), LITSERVE_MIN if has_lit else None),
        "p99_vs_litserve": Check(_p(ours, "p99"), _p(lit, "p99"), at_most=True),
        "p50_vs_plain": Check(
            _p(ours, "p50"), p50_plain * p50_factor if p50_factor and p50_plain is not None else None, at_most=True
        ),
    }


def summary(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per workload and level of our ``/v1``: the figures and their checks."""
    rows = []
    for workload, data in results.get("workloads", {}).items():
        for lv in data.get("serving", {}).get(OURS_V1, {}).get("levels", []):
            c = lv["concurrency"]
            rows.append(
                {"workload": workload, "concurrency": c, "ours": lv, "checks": row_checks(results, workload, c)}
            )
    return rows


def _all(checks: list[Check]) -> bool | None:
    states = [c.met for c in checks if c.met is not None]
    return None if not states else all(states)


def _fmt_ratio(check: Check) -> str:
    return "–" if check.value is None else f"{check.value:.2f}"


def _workload_key(results: dict[str, Any], preset: str) -> str | None:
    for key, data in results.get("workloads", {}).items():
        if data.get("preset") == preset:
            return str(key)
    return None


def _levels(results: dict[str, Any], key: str, wanted: tuple[int, ...]) -> list[int]:
    have = {lv["concurrency"] for lv in results["workloads"][key]["serving"].get(OURS_V1, {}).get("levels", [])}
    return [c for c in wanted if c in have]


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per target: what it asks, what was measured, met (True/False) or not measured (None)."""
    rows: list[dict[str, Any]] = []
    pool, cifar = _workload_key(results, POOL), _workload_key(results, CIFAR)

    def add(target: str, measured: list[str], checks: list[Check]) -> None:
        met = _all(checks) if checks else None
        rows.append({"target": target, "measured": "; ".join(measured) or "not measured", "met": met})

    def peer_target(key: str | None, name: str, levels: tuple[int, ...], what: str) -> None:
        measured, checks = [], []
        for c in _levels(results, key, levels) if key else []:
            row = row_checks(results, key, c)  # type: ignore[arg-type]
            mine = [row[n] for n in what.split("+") if row[n].bound is not None]
            if mine:
                checks += mine
                measured.append(_describe(row, c, what))
        add(name, measured, checks)

    peer_target(pool, f"{POOL}: {OURS_V1} at 16 clients >= 0.90 of the in-process limit", (16,), "of_limit")
    peer_target(
        pool, f"{POOL}: >= 1.0x {PLAIN_OWN} at 16 and 64 clients, p99 no worse", (16, 64), "x_plain+p99_vs_plain"
    )
    peer_target(pool, f"{POOL}: >= 0.95x {PLAIN_OWN} at 1 client", (1,), "x_plain")
    peer_target(
        cifar, f"{CIFAR}: >= 1.5x {PLAIN_OWN} at 16 and 64 clients, p99 no worse", (16, 64), "x_plain+p99_vs_plain"
    )
    measured, checks = [], []
    for key in (k for k in (pool, cifar) if k):
        if _levels(results, key, (1,)):
            row = row_checks(results, key, 1)
            checks.append(row["p50_vs_plain"])
            plain = level(results, key, PLAIN_OWN, 1)
            measured.append(f"{key}: {_fmt_ms(row['p50_vs_plain'].value)} vs {_fmt_ms(_p(plain, 'p50'))}")
    add(f"p50 at 1 client within 10% of {PLAIN_OWN}'s, both models", measured, checks)
    add(*_litserve(results))
    add(*_batch_sizes(results))
    add(*_int8(results))
    return rows


def _fmt_ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f} ms"


def _describe(row: dict[str, Check], c: int, what: str) -> str:
    parts = []
    if "of_limit" in what:
        parts.append(f"{_fmt_ratio(row['of_limit'])} of the limit")
    if "x_plain" in what:
        parts.append(f"{_fmt_ratio(row['x_plain'])}x")
    if "p99_vs_plain" in what:
        parts.append(f"p99 {_fmt_ms(row['p99_vs_plain'].value)} vs {_fmt_ms(row['p99_vs_plain'].bound)}")
    return f"c={c}: " + ", ".join(parts)


def _litserve(results: dict[str, Any]) -> tuple[str, list[str], list[Check]]:
    checks: list[Check] = []
    missed: list[str] = []
    for row in summary(results):
        pair = [row["checks"]["x_litserve"], row["checks"]["p99_vs_litserve"]]
        if pair[0].bound is None:
            continue
        checks += pair
        if not all(c.met for c in pair):
            p99 = pair[1]
            missed.append(
                f"{row['workload']} c={row['concurrency']}: {_fmt_ratio(pair[0])}x, p99 {_fmt_ms(p99.value)} vs "
                f"{_fmt_ms(p99.bound)}"
            )
    ratios = [c.value for c in checks[::2] if c.value is not None]
    measured = [f"lowest {min(ratios):.2f}x" if ratios else ""] if checks else []
    if missed:
        measured.append("missed at " + "; ".join(missed))
    return f">= {LITSERVE_MIN}x LitServe at every concurrency, p99 no worse", [m for m in measured if m], checks


def _batch_sizes(results: dict[str, Any]) -> tuple[str, list[str], list[Check]]:
    """Our server's chosen batch size against batch 1: its own start-up figures, and the bench's in-process limit
    at both sizes (an independent measurement; 5% is allowed for its noise)."""
    measured: list[str] = []
    checks: list[Check] = []
    for key, data in results.get("workloads", {}).items():
        batch = data.get("batch_size") or {}
        if not batch:
            continue
        own = batch.get("server_images_per_s", {})
        chosen = batch["chosen"]
        own_chosen, own_1 = own.get(str(chosen)), own.get("1")
        at_chosen, at_1 = batch.get("limit_at_chosen"), batch.get("limit_at_1")
        checks.append(Check(own_chosen, own_1))
        if at_chosen is not None and at_1 is not None:
            checks.append(Check(at_chosen, 0.95 * at_1))
        measured.append(
            f"{key}: batch {chosen} ({_rate(own_chosen)} vs {_rate(own_1)} images/s at batch 1 by the server; "
            f"{_rate(at_chosen)} vs {_rate(at_1)} in-process here)"
        )
    return "No model is served at a batch size slower per image than batch 1", measured, checks


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _int8(results: dict[str, Any]) -> tuple[str, list[str], list[Check]]:
    data = results.get("int8")
    name = (data or {}).get("workload", f"{POOL}@224")
    target = f"int8 {name} in-process >= {INT8_SPEEDUP}x fp32 at its best batch, top-1 agreement >= 99%"
    if not data or "limit" not in data:
        reason = (data or {}).get("skipped", "not run")
        return target, [f"not measured: {reason}"], []
    fp32, int8 = data["limit"]["fp32"], data["limit"]["int8"]
    speedup = ratio(int8["images_per_s"], fp32["images_per_s"])
    agreement = data["agreement"]["top1_agreement"]
    measured = [
        f"{_fmt_ratio(Check(speedup))}x ({int8['images_per_s']:.1f} images/s at batch {int8['best_batch']} vs "
        f"{fp32['images_per_s']:.1f} at batch {fp32['best_batch']})",
        f"top-1 agreement with fp32 {agreement * 100:.1f}% on {data['agreement']['images']} images",
    ]
    return target, measured, [Check(speedup, INT8_SPEEDUP), Check(agreement, INT8_AGREEMENT)]
