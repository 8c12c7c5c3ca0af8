"""Expert parallelism on CPU ranks: tokens/s and peak memory per rank at ep = 1, 2, 4, next to the plan's predictions.

python benchmarks/bench_ep.py [--hardware benchmarks/profiles/cpu_4ranks.yaml] [--steps 6] [--warmup 2]
    → one table: ep, predicted vs measured tokens/s/device and peak memory per rank, with ratios, and the measured
      expert-load imbalance (max/mean tokens per expert) of the last step.

Qwen3-MoE tiny (8 experts: ep=4 leaves 2 per rank), seq 256, dp_shard=4 on 4 CPU ranks, fp32; the same
global batch at every ep. Each run is `omnigen bench` in-process; runs stay in runs/bench_ep/ (git-ignored).
On 2 cores 4 ranks time-share: absolute throughput is small, the comparison between ep degrees is the point.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omnigen import bench  # noqa: E402
from omnigen.spec import load_spec  # noqa: E402

SPEC = ROOT / "specs" / "qwen3_moe_tiny_dp4_ep2.yaml"
WORK = ROOT / "runs" / "bench_ep"
MIB = 1024**2


def run(ep: int, hardware: str | None, steps: int, warmup: int) -> dict:
    sets = [f"parallel.ep={ep}", "train.seq_len=256", "train.global_batch_size=8"]
    if hardware:
        sets.append(f"cluster.hardware={Path(hardware).resolve()}")
    report = bench.run(load_spec(SPEC, sets), WORK / f"ep{ep}", steps, warmup, quiet=True)
    last = json.loads((WORK / f"ep{ep}" / "metrics.jsonl").read_text().splitlines()[-1])
    return {"ep": ep, **{k: report[k] for k in ("predicted", "measured", "ratios")},
            "imbalance": last.get("imbalance")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hardware", help="hardware profile .yaml to plan against (default: the spec's)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    rows = [run(ep, args.hardware, args.steps, args.warmup) for ep in (1, 2, 4)]
    print(f"\n{'ep':>3} {'tok/s/dev pred':>15} {'measured':>9} {'ratio':>6} {'peak MiB pred':>14} {'measured':>9} "
          f"{'ratio':>6} {'imbalance':>10}")
    for r in rows:
        p, m = r["predicted"], r["measured"]
        print(f"{r['ep']:>3} {p['tokens_per_s_per_device']:>15,.0f} {m['tokens_per_s_per_device']:>9,.0f} "
              f"{r['ratios']['tokens_per_s_per_device']:>6.2f} {p['peak_memory_bytes'] / MIB:>14,.0f} "
              f"{m['peak_memory_bytes'] / MIB:>9,.0f} {r['ratios']['peak_memory_bytes']:>6.2f} "
              f"{r['imbalance'] if r['imbalance'] is not None else '-':>10}")
    base = rows[0]["measured"]["tokens_per_s_per_device"]
    print("measured throughput relative to ep=1: " + ", ".join(
        f"ep={r['ep']}: {r['measured']['tokens_per_s_per_device'] / base:.2f}x" for r in rows))
    (WORK / "results.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
