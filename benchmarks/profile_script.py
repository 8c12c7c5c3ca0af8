"""torch.profiler over a generated train.py on every rank: where a step's time goes.

python benchmarks/profile_script.py DIR [--nproc N] [--steps 8] [--warmup 3] [--top 30] [--trace] [--shapes]
    → rank 0's operator table (self CPU time, steps WARMUP..STEPS-1), then its self CPU time per step in named
      groups: the Ulysses all-to-all autograd Functions (their self time is the wait inside all_to_all_single,
      which gloo does outside any aten op), FSDP's hooks (likewise their collectives' waits), matmuls, attention,
      copies, the optimizer; and the wall time in all_to_all_single per step (script_harness.py's count).

DIR holds a train.py omnigen compiled (`omnigen compile SPEC -o DIR`); it runs unchanged (benchmarks/script_harness.py).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import script_harness  # noqa: E402

GROUPS = {  # a family of ops, matched as a prefix of the profiler's key (first match wins)
    "Ulysses all-to-all (waits)": ("SeqToHeads", "HeadsToSeq", "QKVToHeads"),
    "EP all-to-all (waits)": ("ExpertAllToAll",),
    "c10d ops": ("c10d::", "gloo:", "record_param_comms", "_c10d_functional"),
    "FSDP hooks (waits, copies)": ("FSDP::",),
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "MmBackward", "AddmmBackward"),
    "attention (SDPA)": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "copies": ("aten::copy_", "aten::contiguous", "aten::clone", "aten::cat", "aten::repeat_interleave",
               "aten::index", "aten::_to_copy", "aten::gather", "aten::scatter"),
    "optimizer": ("Optimizer.", "aten::_foreach"),
}


def group_times(self_us: dict[str, float]) -> dict[str, float]:
    """Self CPU time per named group (and "other"), microseconds; the ProfilerStep ranges' own time counts as other."""
    shares = {name: 0.0 for name in [*GROUPS, "other"]}
    for key, us in self_us.items():
        name = next((g for g, prefixes in GROUPS.items() if key.startswith(prefixes)), "other")
        shares[name] += us
    return shares


def profile(script_dir: Path, nproc: int, steps: int, warmup: int, top: int = 30, trace: bool = False,
            shapes: bool = False) -> dict:
    """Profile the script; returns {"table", "groups_ms" (per profiled step), "step_s", "all_to_all_s"} of rank 0."""
    metrics = script_dir / "profile_metrics.jsonl"
    cmd = script_harness.command(script_dir, nproc, ["--steps", str(steps), "--metrics", str(metrics)],
                                 profile={"warmup": warmup, "top": top, "trace": trace, "shapes": shapes})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, cwd=script_dir)
    if proc.returncode != 0:
        raise RuntimeError(f"the profiled run exited {proc.returncode}:\n" +
                           "\n".join((proc.stdout + proc.stderr).splitlines()[-20:]))
    out = script_dir / "profile"
    records = [json.loads(line) for line in metrics.read_text().splitlines()][warmup:]
    groups = group_times(json.loads((out / "rank0_self_us.json").read_text()))
    return {"table": (out / "rank0.txt").read_text(), "groups_ms": {k: v / 1e3 / len(records) for k, v in groups.items()},
            "step_s": statistics.median(r["step_time_s"] for r in records),
            "all_to_all_s": statistics.median(r["all_to_all_s"] for r in records)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--shapes", action="store_true", help="the table per operator and input shapes")
    args = ap.parse_args()
    result = profile(Path(args.dir).resolve(), args.nproc, args.steps, args.warmup, args.top, args.trace, args.shapes)
    print(result["table"])
    total = sum(result["groups_ms"].values())
    print(f"rank 0, steps {args.warmup}..{args.steps - 1} profiled; load average {os.getloadavg()[0]:.1f}")
    print(f"median step {result['step_s'] * 1e3:.0f} ms (profiled), of it in all_to_all_single "
          f"{result['all_to_all_s'] * 1e3:.0f} ms ({result['all_to_all_s'] / result['step_s']:.1%})")
    print("self CPU time per step, by group:")
    for name, ms in sorted(result["groups_ms"].items(), key=lambda kv: -kv[1]):
        print(f"  {name:<28} {ms:8.1f} ms  {ms / total:6.1%}")


if __name__ == "__main__":
    main()
