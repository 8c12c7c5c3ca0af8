"""A recompiled plan's changes in words: what the planner was given that changed, and what it now decides.

Reads two plan.json dicts (the one on disk or at a git ref, and the one compiling would write). Why a decision
changed is told by pricing the previous layout under the new inputs (plan.price_layout): it no longer fits, no
longer spans the cluster, or is slower than the new one.
"""

from __future__ import annotations

from typing import Any

from .cost import Mesh

GIB = 1024**3
INPUTS = ("model_class", "total_params", "frozen", "weights", "train", "cluster")  # what the planner was given


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def _mesh_label(mesh: dict[str, int]) -> str:
    """As the planner labels a candidate (cost.Mesh's field order), whatever order the JSON keys came in."""
    dims = [(k, mesh[k]) for k in Mesh.__dataclass_fields__]
    return " x ".join(f"{k}={v}" for k, v in dims if v > 1) or "single process"


def _placement(group: dict[str, Any]) -> str:
    if group["replicate"]:
        return "replicated"
    return f"FSDP over {'+'.join(group['shard_dims'])}, reshard_after_forward={group['reshard_after_forward']}"


GROUP_FIELDS = {  # what a reader cares about in a group's decision, in words
    "placement": _placement,
    "activation checkpointing": lambda g: g["activation_checkpointing"],
    "sequence parallel": lambda g: g["sequence_parallel"],
    "expert parallel": lambda g: g["ep"],
    "frozen": lambda g: g["frozen"],
}


def input_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    before = _flat({k: old.get(k) for k in INPUTS}, "")
    after = _flat({k: new.get(k) for k in INPUTS}, "")
    return [f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)]


def _predicted(plan: dict[str, Any]) -> str:
    p = plan["predicted"]
    return f"{p['step_time_s']:.4g} s/step, {p['peak_memory_bytes'] / GIB:.3g} GiB"


def plan_changes(old: dict[str, Any], new: dict[str, Any], old_layout_now: str = "") -> list[str]:
    """One line per change: the inputs, the mesh, each group's decisions, and the prediction; `old_layout_now` says
    what the earlier layout would cost under the new inputs (plan.price_layout), which is why it was not kept."""
    lines = [f"input: {change}" for change in input_changes(old, new)]
    decisions = []
    old_mesh, new_mesh = _mesh_label(old["mesh"]), _mesh_label(new["mesh"])
    if old_mesh != new_mesh:
        decisions.append(f"mesh {old_mesh} -> {new_mesh}")
    old_groups = {g["name"]: g for g in old["groups"]}
    for group in new["groups"]:
        before = old_groups.pop(group["name"], None)
        if before is None:
            decisions.append(f"{group['name']}: new group ({group['count']} x {group['layer_class']}), "
                             f"{_placement(group)}")
            continue
        for what, read in GROUP_FIELDS.items():
            if read(before) != read(group):
                decisions.append(f"{group['name']}: {what} {read(before)} -> {read(group)}")
    decisions += [f"{name}: group gone" for name in old_groups]
    lines += decisions
    if lines or old["predicted"] != new["predicted"]:
        lines.append(f"predicted: {_predicted(old)} -> {_predicted(new)}")
    if decisions and old_layout_now:
        lines.append(f"why: the previous layout {old_layout_now}; the new one is predicted at {_predicted(new)}")
    return lines
