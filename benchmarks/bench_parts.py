"""A plan per part against the best single uniform plan, on the same composed model: predicted and measured step time.

python benchmarks/bench_parts.py [--steps 6] [--warmup 2]
    → the per-part plan of specs/siglip_whisper_qwen3_moe_tiny_omni_ep2.yaml (SigLIP frozen and replicated, the
      rest as the part blocks and the planner say) and the best uniform plan (one recipe for every part, as VeOmni
      applies it: the same placement and activation checkpointing everywhere, the best of those the planner
      prices), each run once with `omnigen bench` in-process; one table, side by side.

The model and training setup are the same in both (the SigLIP encoder stays frozen: that is the training recipe,
not a placement); only the parts' parallel blocks differ. Runs stay in runs/bench_parts/ (git-ignored). 4 CPU
ranks on a 2-core machine time-share: absolute times are small and noisy; the prediction and the measurement of
the same layout side by side are the point.
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omnigen import bench  # noqa: E402
from omnigen.errors import OmnigenError  # noqa: E402
from omnigen.pipeline import plan  # noqa: E402
from omnigen.spec import load_spec  # noqa: E402

SPEC = ROOT / "specs" / "siglip_whisper_qwen3_moe_tiny_omni_ep2.yaml"
WORK = ROOT / "runs" / "bench_parts"
UNIFORM_RECIPES = [{"placement": p, "activation_checkpointing": ac}
                   for p in ("fsdp", "replicate") for ac in ("none", "selective", "full")]


def spec_file(name: str, parallel: dict | None) -> Path:
    """The example spec with every part's parallel block set to `parallel` (None: as written), paths absolute."""
    raw = yaml.safe_load(SPEC.read_text())
    raw["name"] = name
    parts = raw["model"]["parts"]
    for part in [*parts["encoders"], parts["foundation"]]:
        part["config"] = str((SPEC.parent / part["config"]).resolve())
        if parallel is not None:
            part["parallel"] = dict(parallel)
    path = WORK / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def best_uniform() -> tuple[dict, Path, float]:
    """The uniform recipe the planner prices fastest (recipes it refuses, e.g. replicating routed experts, skipped)."""
    priced = []
    for recipe in UNIFORM_RECIPES:
        path = spec_file("uniform", recipe)
        try:
            priced.append((plan(load_spec(path)).plan.predicted["step_time_s"], recipe))
        except OmnigenError as e:
            print(f"uniform {recipe}: refused: {str(e).splitlines()[0][:140]}")
    for t, recipe in priced:
        print(f"uniform {recipe}: predicted {t * 1e3:.3f} ms/step (spec's profile)")
    t, recipe = min(priced, key=lambda p: p[0])
    return recipe, spec_file("uniform", recipe), t


def layout(report_plan: dict) -> str:
    return "; ".join(f"{g['name']}: {'replicated' if g['replicate'] else 'fsdp'} ac={g['activation_checkpointing']}"
                     for g in report_plan["groups"])


def run(name: str, path: Path, steps: int, warmup: int) -> dict:
    report = bench.run(load_spec(path), WORK / name, steps, warmup, quiet=True)
    groups = json.loads((WORK / name / "plan.json").read_text())["groups"]
    return {"name": name, "layout": layout({"groups": groups}), "predicted": report["predicted"],
            "measured": report["measured"], "ratios": report["ratios"], "provenance": report["hardware_provenance"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    recipe, uniform_path, _ = best_uniform()
    rows = [run("per_part", spec_file("per_part", None), args.steps, args.warmup),
            run("uniform", uniform_path, args.steps, args.warmup)]
    print(f"\nbest uniform recipe: {recipe}; predictions with the {rows[0]['provenance']}")
    print(f"{'plan':<10} {'step ms pred':>13} {'measured':>9} {'ratio':>6} {'peak MiB pred':>14} {'measured':>9}  layout")
    for r in rows:
        p, m = r["predicted"], r["measured"]
        print(f"{r['name']:<10} {p['step_time_s'] * 1e3:>13.2f} {m['step_time_s'] * 1e3:>9.2f} "
              f"{r['ratios']['step_time_s']:>6.2f} {p['peak_memory_bytes'] / 2**20:>14,.0f} "
              f"{m['peak_memory_bytes'] / 2**20:>9,.0f}  {r['layout']}")
    per_part, uniform = rows
    print(f"per-part / uniform step time: predicted {per_part['predicted']['step_time_s'] / uniform['predicted']['step_time_s']:.3f}, "
          f"measured {per_part['measured']['step_time_s'] / uniform['measured']['step_time_s']:.3f}")
    (WORK / "results.json").write_text(json.dumps({"uniform_recipe": recipe, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
