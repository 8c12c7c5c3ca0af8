"""`omnigen bench`: run the generated script and put the plan's prediction next to what it measured.

Measured figures come from the per-step JSON records the script writes with --metrics (rank 0):
- step time, optimizer time (clipping + AdamW + the loss all-reduce) and tokens/s/device: the median over the steps
  after the warm-up steps; forward+backward is step_time_s - optimizer_s per step, then the median;
- peak memory per device: the largest value recorded (max over ranks of a high-water mark that only grows: ru_maxrss
  on CPU, max_memory_allocated on CUDA), so warm-up steps count for it.
The comparison itself is pure functions of (predicted, records), testable without torchrun.
"""

from __future__ import annotations

import contextlib
import io
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from . import emit
from .errors import OmnigenError
from .pipeline import default_out_dir
from .plan import Plan, hardware_provenance
from .spec import Spec
from .svg import nbytes, seconds, time_terms

DEFAULT_STEPS, DEFAULT_WARMUP = 8, 2


class BenchFailed(Exception):
    """The run itself failed (not the user's input): the CLI exits non-zero with this message."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


# --- pure comparison ------------------------------------------------------------------------------------------

def check_steps(steps: int, warmup: int) -> None:
    if warmup < 0 or steps <= warmup:
        raise OmnigenError(f"--steps {steps} --warmup {warmup}: need 0 <= warmup < steps, so that at least one step "
                           f"is measured")


def per_step(records: list[dict]) -> list[dict]:
    """The raw figures of each step, forward+backward derived the same way as in the median."""
    keys = ("step", "loss", "step_time_s", "optimizer_s", "tokens_per_s_per_device", "peak_memory_bytes")
    return [{**{k: r[k] for k in keys if k in r},
             "forward_backward_s": round(r["step_time_s"] - r.get("optimizer_s", 0.0), 6)} for r in records]


def measured_summary(records: list[dict], warmup: int) -> dict[str, Any]:
    steps = per_step(records)
    kept = steps[warmup:]
    if not kept:
        raise ValueError(f"no step left to measure: {len(records)} records, warm-up {warmup}")
    med = {k: round(statistics.median(s[k] for s in kept), 6)
           for k in ("step_time_s", "forward_backward_s", "optimizer_s", "tokens_per_s_per_device") if k in kept[0]}
    return {**med, "peak_memory_bytes": max(s["peak_memory_bytes"] for s in steps), "steps_measured": len(kept)}


def predicted_summary(predicted: dict[str, Any]) -> dict[str, Any]:
    """The prediction split like the measurement: forward+backward = the step minus the optimizer term."""
    breakdown = predicted.get("breakdown", {})
    optimizer = breakdown.get("optimizer_s", 0.0)
    return {"step_time_s": predicted["step_time_s"], "forward_backward_s": predicted["step_time_s"] - optimizer,
            "forward_backward_terms": {k: v for k, v in time_terms(breakdown) if k != "optimizer_s"},
            "optimizer_s": optimizer, "tokens_per_s_per_device": predicted["tokens_per_s_per_device"],
            "peak_memory_bytes": predicted["peak_memory_bytes"], "memory": predicted.get("memory", {})}


def ratio(measured: float | None, predicted: float | None) -> float | None:
    """measured / predicted; None when either is missing or the prediction is zero (nothing to scale)."""
    if measured is None or not predicted:
        return None
    return round(measured / predicted, 4)


METRICS = (("step time", "step_time_s", "s"), ("  forward+backward", "forward_backward_s", "s"),
           ("  optimizer", "optimizer_s", "s"), ("tokens/s/device", "tokens_per_s_per_device", "tokens/s"),
           ("peak memory/device", "peak_memory_bytes", "bytes"))


def compare(predicted: dict[str, Any], measured: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: predicted, measured, measured/predicted."""
    return [{"metric": label.strip(), "key": key, "unit": unit, "predicted": predicted.get(key),
             "measured": measured.get(key), "ratio": ratio(measured.get(key), predicted.get(key))}
            for label, key, unit in METRICS]


def _value(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    return seconds(v) if unit == "s" else nbytes(v) if unit == "bytes" else f"{v:,.0f}"


def format_comparison(rows: list[dict[str, Any]], predicted: dict[str, Any]) -> str:
    labels = {key: label for label, key, _ in METRICS}
    lines = [f"{'':<22}{'predicted':>12}{'measured':>12}{'measured/predicted':>20}"]
    for r in rows:
        ratio_s = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"{labels[r['key']]:<22}{_value(r['predicted'], r['unit']):>12}"
                     f"{_value(r['measured'], r['unit']):>12}{ratio_s:>20}")
        if r["key"] == "forward_backward_s":
            terms = predicted["forward_backward_terms"]
            lines.append("    predicted = " + " + ".join(f"{k} {seconds(v)}" for k, v in terms.items()))
    memory = predicted["memory"]
    lines.append("predicted memory/device: " + ", ".join(f"{k} {nbytes(v)}" for k, v in memory.items()))
    return "\n".join(lines)


def build_report(plan: Plan, spec: Spec, records: list[dict], steps: int, warmup: int,
                 memory_capacity_bytes: int | None = None) -> dict[str, Any]:
    predicted, measured = predicted_summary(plan.predicted), measured_summary(records, warmup)
    rows = compare(predicted, measured)
    return {"spec": plan.name, "spec_path": spec.source, "omnigen_version": plan.omnigen_version,
            "mesh": plan.mesh, "world_size": plan.world_size, "nodes": plan.cluster["nodes"],
            "procs_per_node": plan.cluster["procs_per_node"], "device": plan.cluster["device"],
            "hardware": plan.cluster["hardware"], "hardware_provenance": hardware_provenance(plan),
            "memory_capacity_bytes": memory_capacity_bytes,
            "train": {k: plan.train[k] for k in ("seq_len", "micro_batch_size", "global_batch_size", "grad_accum",
                                                  "precision") if k in plan.train},
            "steps": steps, "warmup": warmup, "steps_measured": measured["steps_measured"],
            "predicted": {**predicted, "mfu": plan.predicted.get("mfu"), "breakdown": plan.predicted.get("breakdown")},
            "measured": measured, "ratios": {r["key"]: r["ratio"] for r in rows}, "comparison": rows,
            "per_step": per_step(records)}


def headline(report: dict[str, Any]) -> str:
    dims = " x ".join(f"{d}={n}" for d, n in report["mesh"].items() if n > 1) or "single process"
    return (f"bench {report['spec']}: mesh {dims} ({report['world_size']} ranks = {report['nodes']} node(s) x "
            f"{report['procs_per_node']}), hardware profile {report['hardware']}; {report['steps']} steps, first "
            f"{report['warmup']} warm-up, medians over {report['steps_measured']}\npredicted with the "
            f"{report['hardware_provenance']}" + (f" (this machine's fit {report['hardware_fit']}; the spec's "
                                                  f"{report['compiled_hardware']} profile, uncalibrated, predicted "
                                                  f"{seconds(report['compiled_predicted_step_time_s'])})"
                                                  if report.get("hardware_fit") else ""))


# --- running ---------------------------------------------------------------------------------------------------

def default_bench_dir(spec: Spec) -> Path:
    """runs/bench/<name>/ beside generated/: runs/ is git-ignored, so metrics never dirty the tracked generated/."""
    return default_out_dir(spec).parent.parent / "runs" / "bench" / spec.name


def run(spec: Spec, out_dir: Path, steps: int, warmup: int, quiet: bool = False) -> dict[str, Any]:
    """Compile into out_dir, run on the spec's ranks, and return the report (PlanError etc. for bad input,
    BenchFailed when the run does not finish)."""
    from .hardware import load_profile
    from .machine import priced_here
    from .runner import compile_into, launch, read_metrics
    check_steps(steps, warmup)
    compiled = compile_into(spec, out_dir)
    here = priced_here(spec, compiled.graph, compiled.plan)
    metrics, log = out_dir / "metrics.jsonl", out_dir / "bench.log"
    metrics.unlink(missing_ok=True)  # never read a previous run's records
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        code = launch(spec, out_dir / "train.py", ["--steps", str(steps), "--metrics", str(metrics.resolve())], log,
                      progress=f"bench {spec.name}", steps=steps)
    records = read_metrics(metrics)
    if len(records) < steps:
        tail = "\n".join(log.read_text().splitlines()[-15:]) if log.is_file() else ""
        raise BenchFailed(f"the run exited {code} with {len(records)} of {steps} metric records (log: {log})\n{tail}",
                          code or 1)
    # Every step was recorded: the figures stand even if a rank then died on the way out; the caller says so.
    # Priced with this machine's fit where the spec names the placeholder `cpu` profile (omnigen.machine).
    report = build_report(here.plan if here else compiled.plan, spec, records, steps, warmup,
                          load_profile(spec).memory_bytes)
    if here:
        report.update(hardware_fit=str(here.path), compiled_hardware=compiled.plan.cluster["hardware"],
                      compiled_predicted_step_time_s=compiled.plan.predicted["step_time_s"])
    return {**report, "run_exit_code": code, "log": str(log)}


def launch_in_passes(jobs: Sequence[Any], passes: int,
                     launch: Callable[[Any, int], dict[str, Any] | None]) -> list[list[dict[str, Any]]]:
    """Each job's reports from `launch(job, pass_index)` (None: nothing to keep), every job once per pass: one job's
    launches lie minutes apart, so a slow spell of the machine rarely covers them all."""
    reports: list[list[dict[str, Any]]] = [[] for _ in jobs]
    for i in range(passes):
        for kept, job in zip(reports, jobs):
            report = launch(job, i)
            if report is not None:
                kept.append(report)
    return reports


def fastest(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The launch that shows the machine's own speed: load from elsewhere only ever slows one down."""
    return min(reports, key=lambda r: r["measured"]["step_time_s"])


def write_report(report: dict[str, Any], path: Path) -> None:
    try:
        emit.write({path.name: json.dumps(report, indent=2) + "\n"}, path.parent)
    except emit.WriteError as e:
        raise OmnigenError(f"--report {path}: cannot write there: {e.reason}") from None


def bench(spec: Spec, out_dir: str | None, steps: int, warmup: int, report_path: str | None, echo=print) -> int:
    """The `omnigen bench` command: run, print predicted vs measured, write the JSON report; the exit code."""
    check_steps(steps, warmup)
    out = Path(out_dir) if out_dir else default_bench_dir(spec)
    try:
        report = run(spec, out, steps, warmup)
    except BenchFailed as e:
        print(f"omnigen bench: {e}", file=sys.stderr)
        return e.code
    path = Path(report_path) if report_path else out / "bench.json"
    write_report(report, path)
    echo("\n" + headline(report))
    echo(format_comparison(report["comparison"], report["predicted"]))
    echo(f"report: {path}")
    if report["run_exit_code"]:
        print(f"omnigen bench: the run exited {report['run_exit_code']} after recording all {steps} steps "
              f"(log: {report['log']}); figures reported, exit code kept", file=sys.stderr)
    return report["run_exit_code"]
