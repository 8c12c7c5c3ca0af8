"""omnigen's cost model against published figures, and its chosen plan against a hand-written VeOmni-style recipe.

python benchmarks/bench_published.py prints, in one run:
1. TorchTitan's public Llama 3.1 8B run (8x H100 96 GB, bf16 FSDP, seq 8192, local batch 2, selective AC): the
   prediction for specs/llama31_8b_h100x8_torchtitan.yaml next to the published 5,762 tokens/s/GPU and 82.4 GiB;
   the target is within 15% on both.
2. Qwen3-Omni-30B-A3B thinker on 128 H100s at 32K and 128K context: the plan omnigen's search picks next to a
   VeOmni-style recipe (FSDP over every rank, a fixed Ulysses degree, a fixed EP degree, full activation
   checkpointing everywhere), both priced by the same cost model, and how long the search took.
Nothing here runs on a GPU: these are predictions.
"""

import time
from pathlib import Path

from omnigen.cost import GroupChoice, Mesh, estimate, under
from omnigen.hardware import GIB
from omnigen.pipeline import plan as compile_plan
from omnigen.plan import train_shape
from omnigen.spec import load_spec

SPECS = Path(__file__).resolve().parent.parent / "specs"
TORCHTITAN = {"tokens_per_s_per_device": 5762, "peak_gib": 82.4}  # docs/performance.md, Llama 3.1 8B, 8x H100
VEOMNI_RECIPE = {"sp": 8, "ep": 8}  # fixed degrees a hand-written recipe would use for 128K and keep for 32K


def torchtitan() -> bool:
    compiled = compile_plan(load_spec(SPECS / "llama31_8b_h100x8_torchtitan.yaml"))
    p = compiled.plan.predicted
    rows = [("tokens/s/GPU", p["tokens_per_s_per_device"], TORCHTITAN["tokens_per_s_per_device"]),
            ("peak memory GiB", p["peak_memory_bytes"] / GIB, TORCHTITAN["peak_gib"])]
    print("TorchTitan Llama 3.1 8B, 8x H100, bf16 FSDP, seq 8192, local batch 2, selective AC")
    print(f"  {'':18} {'omnigen':>10} {'published':>10} {'ratio':>7}")
    ok = True
    for what, ours, theirs in rows:
        ratio = ours / theirs
        ok &= abs(ratio - 1) <= 0.15
        print(f"  {what:18} {ours:10.1f} {theirs:10.1f} {ratio:7.3f}")
    b = p["breakdown"]
    print(f"  step {p['step_time_s']:.3f} s = compute {b['compute_s']:.3f} + recompute {b['recompute_s']:.3f} + exposed "
          f"comm {b['exposed_comm_s']:.3f} + optimizer {b['optimizer_s']:.3f} + host {b['host_s']:.3f}; MFU {p['mfu']:.1%}")
    print(f"  memory GiB: " + ", ".join(f"{k} {v / GIB:.1f}" for k, v in p["memory"].items()))
    print(f"  within 15% on both: {'yes' if ok else 'NO'}")
    return ok


def veomni_recipe(compiled) -> tuple[Mesh, dict[str, GroupChoice]]:
    world = compiled.spec.cluster.world_size
    mesh = Mesh(dp_shard=world // VEOMNI_RECIPE["sp"], sp=VEOMNI_RECIPE["sp"], ep=VEOMNI_RECIPE["ep"])
    frozen = compiled.plan.frozen
    return mesh, {g.name: GroupChoice(True, "full", under(g.name, frozen))
                  for g in compiled.graph.groups}


def omni_moe(seq_len: int) -> None:
    start = time.perf_counter()
    compiled = compile_plan(load_spec(SPECS / "qwen3_omni_30b_h100x128.yaml", [f"train.seq_len={seq_len}"]))
    search_s = time.perf_counter() - start
    spec, plan = compiled.spec, compiled.plan
    mesh, choices = veomni_recipe(compiled)
    shape = train_shape(spec, mesh, plan.inputs)
    theirs = estimate(compiled.graph, mesh, choices, shape, compiled.hardware, spec.cluster.procs_per_node, plan.frozen)
    ours = plan.predicted
    print(f"\nQwen3-Omni-30B-A3B thinker, 128x H100, seq {seq_len:,}: analyze + search + plan {search_s:.2f} s "
          f"({plan.candidates_searched:,} candidates)")
    print(f"  omnigen:      mesh {plan.mesh}; " + "; ".join(
        f"{g.name.rsplit('.', 1)[0].split('.')[-1]}: {'replicated' if g.replicate else 'fsdp'} ac={g.activation_checkpointing}"
        for g in plan.groups))
    print(f"  VeOmni-style: mesh {mesh.to_dict()}; FSDP everywhere, full AC everywhere")
    fits = theirs.peak_memory_bytes <= compiled.hardware.memory_bytes
    print(f"  {'':14} {'step s':>8} {'tok/s/GPU':>10} {'peak GiB':>9} {'MFU':>6}")
    print(f"  {'omnigen':14} {ours['step_time_s']:8.2f} {ours['tokens_per_s_per_device']:10.0f} "
          f"{ours['peak_memory_bytes'] / GIB:9.1f} {ours['mfu']:6.1%}")
    print(f"  {'VeOmni-style':14} {theirs.step_time_s:8.2f} {theirs.tokens_per_s_per_device:10.0f} "
          f"{theirs.peak_memory_bytes / GIB:9.1f} {theirs.mfu:6.1%}{'' if fits else '  (does not fit)'}")
    print(f"  predicted speed-up of omnigen's plan: {theirs.step_time_s / ours['step_time_s']:.3f}x")


def main():
    torchtitan()
    for seq_len in (32768, 131072):
        omni_moe(seq_len)


if __name__ == "__main__":
    main()
