"""Fit the cost model's host terms on omnigen's own generated scripts (the last stage of `omnigen calibrate`).

The micro-benchmarks time GEMMs, collectives and a bare model. A real step pays more: FSDP2's hooks and copies
around every collective, DTensor dispatch per tensor in clipping and AdamW, the script's data and loss. Those are
what the host terms stand for, so they are fitted where they happen: the generated train.py of tiny models, run
on the ranks being calibrated. The runs move the terms' counts apart: more Llama layers add layer calls, FSDP
collectives and parameter tensors; full activation checkpointing adds layer calls alone; Ulysses adds bare
all-to-alls; a tiny MoE under expert parallelism adds the MoE layers' own host work (routing, permutation, split
sizes, expert loop); a tiny Qwen2-VL adds a vision tower's work outside its layers (patches, indices, merger).

Every term enters the cost model linearly, so a run's feature for a term is its prediction with that term at one
unit less its prediction with all of them at zero; the terms are the non-negative least-squares solution of
measured - (the rest of the prediction) = features x terms, over the forward+backward and optimizer times of every
run, each weighted by 1/measured (relative errors); each run is launched twice and the faster launch kept. The
memory overhead is refitted the same way: the median of measured peak less the predicted peak without it.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, NamedTuple

import yaml

from .fitting import non_negative_least_squares, significant
from .hardware import GIB

HOST_TERMS = ("layer_overhead_us", "step_overhead_ms", "collective_overhead_us", "fsdp_collective_overhead_us",
              "expert_layer_overhead_us", "optimizer_tensor_us", "all_to_all_overhead_us", "encoder_overhead_ms")


class RunShape(NamedTuple):
    model: str              # "llama", "moe" or "vl"
    layers: int
    checkpointing: str
    ulysses: bool           # sequence parallel over every rank
    expert_parallel: bool   # experts split over every rank


RUNS = (RunShape("llama", 1, "none", False, False), RunShape("llama", 2, "none", False, False),
        RunShape("llama", 4, "none", False, False), RunShape("llama", 4, "full", False, False),
        RunShape("llama", 4, "none", True, False), RunShape("moe", 2, "none", False, True),
        RunShape("vl", 2, "none", False, False))
QUICK_RUNS = tuple(r for r in RUNS if r.layers != 2 or r.model != "llama")  # still one run per term
STEPS, WARMUP = 30, 5   # a CPU step varies +-25% between steps: medians need a few tens of them
QUICK_STEPS = 15
REPEATS = 2  # launches per run, the fastest kept: whole launches drift 10-30% with the machine's load
SEQ_LEN, MICRO_BATCHES = 128, 2  # per rank and step
TINY_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 4,
              "max_position_embeddings": 512, "tie_word_embeddings": False}
TINY_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 1024, "hidden_size": 64,
            "intermediate_size": 128, "head_dim": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
            "norm_topk_prob": True, "decoder_sparse_step": 1, "output_router_logits": True,
            "router_aux_loss_coef": 0.02, "max_position_embeddings": 512, "tie_word_embeddings": False}
TINY_VL = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "image_token_id": 1002,
           "video_token_id": 1003, "vision_start_token_id": 1000, "vision_end_token_id": 1001,
           "tie_word_embeddings": False,
           "text_config": {"model_type": "qwen2_vl_text", "vocab_size": 1024, "hidden_size": 64,
                           "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "num_key_value_heads": 2, "max_position_embeddings": 4096, "max_window_layers": 2,
                           "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
                           "pad_token_id": 1012},
           "vision_config": {"model_type": "qwen2_vl_vision", "depth": 2, "embed_dim": 32, "hidden_size": 64,
                             "mlp_ratio": 2, "num_heads": 4, "in_channels": 3, "patch_size": 4, "spatial_merge_size": 2,
                             "temporal_patch_size": 2}}
CONFIGS = {"llama": TINY_LLAMA, "moe": TINY_MOE, "vl": TINY_VL}
MODEL_NAMES = {"llama": "Llama", "moe": "Qwen3-MoE", "vl": "Qwen2-VL (images through its vision tower)"}
LAYERS_KEY = {"llama": "num_hidden_layers", "moe": "num_hidden_layers", "vl": "text_config.num_hidden_layers"}


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
                                   "checkpointing": r.shape.checkpointing, "sp": r.mesh["sp"], "ep": r.mesh["ep"]}
            for key in ("forward_backward_s", "optimizer_s"):
                row[key] = {"measured": significant(r.measured[key]), "fitted": significant(self.predicted(r, key))}
            fitted_peak = r.rest["peak_memory_bytes"] + self.overhead_gib * GIB
            row["peak_memory_mib"] = {"measured": round(r.measured["peak_memory_bytes"] / 2**20, 1),
                                      "fitted": round(fitted_peak / 2**20, 1)}
            rows.append(row)
        return rows


def calibration_spec(folder: Path, profile: Path, device: str, ranks: int, run: RunShape):
    """A spec for one calibration run: FSDP over every rank, Ulysses or EP over every rank when the run asks."""
    from .spec import spec_from_dict
    sp = ranks if run.ulysses else 1
    raw = {"name": f"calibrate_{run.model}_l{run.layers}_{run.checkpointing}{'_sp' if run.ulysses else ''}"
                   f"{'_ep' if run.expert_parallel else ''}",
           "model": {"config": f"tiny_{run.model}", "overrides": {LAYERS_KEY[run.model]: run.layers}},
           "cluster": {"nodes": 1, "procs_per_node": ranks, "device": device, "hardware": str(profile)},
           "train": {"seq_len": SEQ_LEN, "micro_batch_size": 1, "global_batch_size": MICRO_BATCHES * ranks // sp,
                     "steps": STEPS, "precision": "bf16" if device == "cuda" else "fp32"},
           "parallel": {"dp_replicate": 1, "dp_shard": ranks // sp, "sp": sp,
                        "ep": ranks if run.expert_parallel else 1, "activation_checkpointing": run.checkpointing}}
    return spec_from_dict(raw, source=f"<calibration run: {raw['name']}>", base_dir=str(folder))


def write_configs(folder: Path) -> None:
    for name, config in CONFIGS.items():
        (folder / f"tiny_{name}").mkdir(exist_ok=True)
        (folder / f"tiny_{name}" / "config.json").write_text(json.dumps(config))


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


def measure_run(folder: Path, profile: Path, device: str, ranks: int, run: RunShape, steps: int,
                repeats: int) -> StackRun:
    from . import bench
    spec = calibration_spec(folder, profile, device, ranks, run)
    reports = [bench.run(spec, folder / spec.name, steps, WARMUP, quiet=True) for _ in range(repeats)]
    report = min(reports, key=lambda r: r["measured"]["step_time_s"])  # load from elsewhere only slows a launch
    rest, features = price(spec)
    m = report["measured"]
    return StackRun(shape=run, mesh=report["mesh"],
                    measured={k: m[k] for k in ("forward_backward_s", "optimizer_s", "peak_memory_bytes")},
                    rest=rest, features=features)


def describe(run: RunShape, ranks: int) -> str:
    parts = [f"tiny {MODEL_NAMES[run.model]}", f"{run.layers} layer(s)"]
    parts += ["full AC"] if run.checkpointing == "full" else []
    parts += [f"sp {ranks}"] if run.ulysses else []
    parts += [f"ep {ranks}"] if run.expert_parallel else []
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
    with tempfile.TemporaryDirectory(prefix="omnigen-stack-") as tmp:
        folder = Path(tmp)
        write_configs(folder)
        path = folder / "profile.yaml"
        path.write_text(yaml.safe_dump(profile))
        runs = []
        for run in QUICK_RUNS if quick else RUNS:
            if ranks == 1 and (run.ulysses or run.expert_parallel):
                continue  # nothing to exchange: their terms stay unfitted
            echo(f"[calibrate] generated train.py: {describe(run, ranks)} ...")
            runs.append(measure_run(folder, path, device, ranks, run, QUICK_STEPS if quick else STEPS,
                                    1 if quick else REPEATS))
    return fit(runs)
