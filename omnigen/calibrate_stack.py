"""Fit the cost model's host terms on omnigen's own generated scripts (the last stage of `omnigen calibrate`).

The micro-benchmarks time GEMMs, collectives and a bare model. A real step pays more: FSDP2's hooks and copies
around every collective, DTensor dispatch per tensor in clipping and AdamW, the script's data and loss. Those are
what the host terms stand for, so they are fitted where they happen: the generated train.py of tiny models, run
on the ranks being calibrated. The runs move the terms' counts apart: more Llama layers add layer calls, FSDP
collectives and parameter tensors; full activation checkpointing adds layer calls alone; Ulysses adds bare
all-to-alls; a tiny MoE under expert parallelism adds its local experts' host work (the expert loop, with the
routing, permutation and split sizes), and from 4 ranks the same with EP over half the ranks, so twice the experts
per rank, in two HSDP replicas (what the planner picks for a MoE there); two FSDP replicas (HSDP) add all-reduces
and shorten the rings; a tiny Qwen2-VL adds a vision tower's work outside its layers (patches, indices, merger), a
tiny Qwen2.5-Omni thinker an audio tower's too.

Every term enters the cost model linearly, so a run's feature for a term is its prediction with that term at one
unit less its prediction with all of them at zero; the terms are the non-negative least-squares solution of
measured - (the rest of the prediction) = features x terms, over the forward+backward and optimizer times of every
run, each weighted by 1/measured (relative errors); each run is launched three times, in whole passes over the
runs, and the fastest launch kept. The memory overhead is refitted the same way: the median of measured peak less
the predicted peak without it.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, NamedTuple

import yaml

from .fitting import non_negative_least_squares, significant
from .hardware import GIB

STACK_ONLY_TERMS = {  # the host terms only generated scripts show: "host time <what>"
    "collective_hop_overhead_us": "per latency hop of a collective beyond alpha-beta (a ring over n ranks: n-1 hops)",
    "fsdp_call_overhead_us": "per collective FSDP launches, on top of its hops (hooks, copy-in/out)",
    "all_to_all_hop_overhead_us": "per hop of a bare Ulysses / EP all-to-all, beyond alpha-beta",
    "local_expert_overhead_us": "per local expert of a MoE layer forward under EP, on top of the layer's (backward = 2)",
    "optimizer_tensor_us": "per parameter tensor in clipping + AdamW",
    "vision_tower_overhead_ms": "per micro-batch with images, beyond the vision tower's layers",
    "audio_tower_overhead_ms": "per micro-batch with audio, beyond the audio tower's layers",
}
HOST_TERMS = ("layer_overhead_us", "step_overhead_ms", *STACK_ONLY_TERMS)  # the micro-benchmarks fit the first two


class RunShape(NamedTuple):
    model: str              # a file in omnigen/calibration_models: "llama", "moe", "vl" or "omni"
    layers: int             # of the LLM
    checkpointing: str
    ulysses: bool = False          # sequence parallel over every rank
    expert_parallel: int = 0       # experts split over every rank (1), over half of them (2); 0: no EP
    hsdp: bool = False             # two replicas, each sharded over half the ranks


RUNS = (RunShape("llama", 1, "none"), RunShape("llama", 2, "none"), RunShape("llama", 4, "none"),
        RunShape("llama", 4, "full"), RunShape("llama", 4, "none", ulysses=True), RunShape("llama", 4, "none", hsdp=True),
        RunShape("moe", 2, "none", expert_parallel=1), RunShape("moe", 2, "none", expert_parallel=2, hsdp=True),
        RunShape("vl", 2, "none"), RunShape("omni", 2, "none"))
QUICK_RUNS = tuple(r for r in RUNS if (r.model, r.layers) != ("llama", 2) and r.expert_parallel != 2)  # a run a term
STEPS, WARMUP = 30, 5   # a CPU step varies +-25% between steps: medians need a few tens of them
QUICK_STEPS = 15
REPEATS = 3  # launches per run, the fastest kept: whole launches drift 10-30% with the machine's load
SEQ_LEN, MICRO_BATCHES = 128, 2  # per rank and step
MODEL_NAMES = {"llama": "Llama", "moe": "Qwen3-MoE", "vl": "Qwen2-VL (images)",
               "omni": "Qwen2.5-Omni thinker (images and audio)"}
LAYERS_KEY = {"llama": "num_hidden_layers", "moe": "num_hidden_layers", "vl": "text_config.num_hidden_layers",
              "omni": "text_config.num_hidden_layers"}


@dataclass(frozen=True)
class StackRun:
    shape: RunShape
    mesh: dict[str, int]
    measured: dict[str, float]    # forward_backward_s, optimizer_s, peak_memory_bytes
    rest: dict[str, float]        # the prediction with every host term at zero (and no memory overhead)
    features: dict[str, dict[str, float]]  # term -> {forward_backward_s, optimizer_s} per unit of the term


@dataclass(frozen=True)
class StackFit:
    terms: dict[str, float]
    overhead_gib: float
    runs: tuple[StackRun, ...]

    def predicted(self, run: StackRun, key: str) -> float:
        return run.rest[key] + sum(self.terms[t] * run.features[t][key] for t in HOST_TERMS)

    def to_measured(self) -> list[dict[str, Any]]:
        """One row per run for the profile's `# measured:` block."""
        rows = []
        for r in self.runs:
            row: dict[str, Any] = {"model": r.shape.model, "layers": r.shape.layers,
                                   "checkpointing": r.shape.checkpointing, "sp": r.mesh["sp"], "ep": r.mesh["ep"],
                                   "dp_replicate": r.mesh["dp_replicate"]}
            for key in ("forward_backward_s", "optimizer_s"):
                row[key] = {"measured": significant(r.measured[key]), "fitted": significant(self.predicted(r, key))}
            fitted_peak = r.rest["peak_memory_bytes"] + self.overhead_gib * GIB
            row["peak_memory_mib"] = {"measured": round(r.measured["peak_memory_bytes"] / 2**20, 1),
                                      "fitted": round(fitted_peak / 2**20, 1)}
            rows.append(row)
        return rows


def calibration_spec(folder: Path, profile: Path, device: str, ranks: int, run: RunShape):
    """A spec for one calibration run: FSDP over every rank; Ulysses or EP over every rank, or two FSDP replicas,
    when the run asks."""
    from .spec import spec_from_dict
    sp = ranks if run.ulysses else 1
    replicas = 2 if run.hsdp else 1
    raw = {"name": f"calibrate_{run.model}_l{run.layers}_{run.checkpointing}{'_sp' if run.ulysses else ''}"
                   f"{f'_ep{ep_degree(run, ranks)}' if run.expert_parallel else ''}{'_hsdp' if run.hsdp else ''}",
           "model": {"config": f"tiny_{run.model}", "overrides": {LAYERS_KEY[run.model]: run.layers}},
           "cluster": {"nodes": 1, "procs_per_node": ranks, "device": device, "hardware": str(profile)},
           "train": {"seq_len": SEQ_LEN, "micro_batch_size": 1, "global_batch_size": MICRO_BATCHES * ranks // sp,
                     "steps": STEPS, "precision": "bf16" if device == "cuda" else "fp32"},
           "parallel": {"dp_replicate": replicas, "dp_shard": ranks // sp // replicas, "sp": sp,
                        "ep": ep_degree(run, ranks), "activation_checkpointing": run.checkpointing}}
    return spec_from_dict(raw, source=f"<calibration run: {raw['name']}>", base_dir=str(folder))


def ep_degree(run: RunShape, ranks: int) -> int:
    return ranks // run.expert_parallel if run.expert_parallel else 1


def runs_on(run: RunShape, ranks: int) -> bool:
    """Whether the run means something on this many ranks: its exchanges need two ranks or more (on one rank their
    terms stay unfitted), and EP over half of 2 ranks is no EP at all."""
    if ranks == 1:
        return not (run.ulysses or run.expert_parallel or run.hsdp)
    return ep_degree(run, ranks) > 1 if run.expert_parallel else True


def write_configs(folder: Path) -> None:
    for name in MODEL_NAMES:
        (folder / f"tiny_{name}").mkdir(exist_ok=True)
        config = resources.files("omnigen.calibration_models").joinpath(f"tiny_{name}.json").read_text()
        (folder / f"tiny_{name}" / "config.json").write_text(config)


def split(e) -> dict[str, float]:
    """An Estimate as the figures a run measures."""
    return {"forward_backward_s": e.step_time_s - e.optimizer_s, "optimizer_s": e.optimizer_s,
            "peak_memory_bytes": e.peak_memory_bytes - e.memory["overhead"]}


def price(spec) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The spec's plan priced with every host term at zero, and each term's feature: the change one unit of it
    makes to forward+backward and optimizer time."""
    from .hardware import load_profile
    from .pipeline import plan
    from .plan import reprice
    compiled = plan(spec)
    zero = replace(load_profile(spec), **{t: 0.0 for t in HOST_TERMS})
    rest = split(reprice(compiled.plan, spec, compiled.graph, zero))
    features = {}
    for term in HOST_TERMS:
        unit = split(reprice(compiled.plan, spec, compiled.graph, replace(zero, **{term: 1.0})))
        features[term] = {k: unit[k] - rest[k] for k in ("forward_backward_s", "optimizer_s")}
    return rest, features


def stack_run(spec, run: RunShape, reports: list[dict[str, Any]]) -> StackRun:
    """A run's fastest launch beside the cost model's pricing of it."""
    from .bench import fastest
    m = fastest(reports)["measured"]
    rest, features = price(spec)
    return StackRun(shape=run, mesh=reports[0]["mesh"],
                    measured={k: m[k] for k in ("forward_backward_s", "optimizer_s", "peak_memory_bytes")},
                    rest=rest, features=features)


def describe(run: RunShape, ranks: int) -> str:
    parts = [f"tiny {MODEL_NAMES[run.model]}", f"{run.layers} layer(s)"]
    parts += ["full AC"] if run.checkpointing == "full" else []
    parts += [f"sp {ranks}"] if run.ulysses else []
    parts += [f"ep {ep_degree(run, ranks)}"] if run.expert_parallel else []
    parts += [f"HSDP 2 x {ranks // 2}"] if run.hsdp else []
    return ", ".join(parts) + f", {ranks} rank(s)"


def fit(runs: list[StackRun]) -> StackFit:
    rows, targets = [], []
    for r in runs:
        for key in ("forward_backward_s", "optimizer_s"):
            weight = 1 / r.measured[key]
            rows.append([r.features[t][key] * weight for t in HOST_TERMS])
            targets.append((r.measured[key] - r.rest[key]) * weight)
    terms = dict(zip(HOST_TERMS, non_negative_least_squares(rows, targets)))
    overhead = statistics.median(r.measured["peak_memory_bytes"] - r.rest["peak_memory_bytes"] for r in runs)
    return StackFit(terms={t: significant(v, 3) for t, v in terms.items()},
                    overhead_gib=significant(max(overhead, 0) / GIB, 3), runs=tuple(runs))


def fit_stack(profile: dict[str, Any], device: str, ranks: int, quick: bool, echo: Callable[[str], None]) -> StackFit:
    """Run the calibration scripts against `profile` (the micro-benchmarks' figures) and fit its host terms."""
    from .bench import launch_in_passes, run as bench_run
    with tempfile.TemporaryDirectory(prefix="omnigen-stack-") as tmp:
        folder = Path(tmp)
        write_configs(folder)
        path = folder / "profile.yaml"
        path.write_text(yaml.safe_dump(profile))
        jobs = [(run, calibration_spec(folder, path, device, ranks, run))
                for run in (QUICK_RUNS if quick else RUNS) if runs_on(run, ranks)]
        passes = 1 if quick else REPEATS

        def launch(job, i):
            run, spec = job
            echo(f"[calibrate] generated train.py: {describe(run, ranks)}, launch {i + 1} of {passes} ...")
            return bench_run(spec, folder / spec.name, QUICK_STEPS if quick else STEPS, WARMUP, quiet=True)

        reports = launch_in_passes(jobs, passes, launch)
        runs = [stack_run(spec, run, r) for (run, spec), r in zip(jobs, reports)]
    return fit(runs)
