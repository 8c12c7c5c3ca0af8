"""The demo's prediction out of the box: what `omnigen run specs/qwen25_omni_tiny.yaml` predicts vs what it measures.

python benchmarks/bench_demo_prediction.py [--launches 3] [--steps 12] [--warmup 3]
    → per launch: the machine's load average before it, measured step time (median after warm-up); then the
      compile-time prediction (the placeholder `cpu` profile in the script's header), the prediction `omnigen plan`,
      `run` and `bench` print on this machine (the layout priced with this machine's fit, omnigen/machine.py), and
      measured / predicted for the fastest launch and for every launch.

Each launch is `omnigen bench` in-process on the demo's 2 CPU ranks; runs stay in runs/bench_demo/ (git-ignored).
The fastest launch shows the machine's own speed: load from other work only ever slows one down.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omnigen import bench  # noqa: E402
from omnigen.spec import load_spec  # noqa: E402

SPEC = ROOT / "specs" / "qwen25_omni_tiny.yaml"
WORK = ROOT / "runs" / "bench_demo"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    reports = []
    for i in range(args.launches):
        load = os.getloadavg()[0]
        report = bench.run(load_spec(SPEC, []), WORK, args.steps, args.warmup, quiet=True)
        reports.append(report)
        print(f"launch {i + 1}: load {load:.2f} before, measured step {report['measured']['step_time_s'] * 1e3:.1f} ms "
              f"(forward+backward {report['measured']['forward_backward_s'] * 1e3:.1f}, optimizer "
              f"{report['measured']['optimizer_s'] * 1e3:.1f})", flush=True)
    fastest = bench.fastest(reports)
    predicted = fastest["predicted"]["step_time_s"]
    print(f"\ncompiled with profile {fastest.get('compiled_hardware', fastest['hardware'])}: the header predicts "
          f"{fastest.get('compiled_predicted_step_time_s', predicted) * 1e3:.1f} ms/step")
    print(f"on this machine: {fastest['hardware_provenance']}"
          + (f" ({fastest['hardware_fit']})" if fastest.get("hardware_fit") else ""))
    split = fastest["predicted"]
    print(f"predicted {predicted * 1e3:.1f} ms/step (forward+backward {split['forward_backward_s'] * 1e3:.1f}, "
          f"optimizer {split['optimizer_s'] * 1e3:.1f}); fastest launch measured "
          f"{fastest['measured']['step_time_s'] * 1e3:.1f} ms: measured / predicted "
          f"{fastest['measured']['step_time_s'] / predicted:.2f}")
    print("every launch, measured / predicted: "
          + ", ".join(f"{r['measured']['step_time_s'] / predicted:.2f}" for r in reports))


if __name__ == "__main__":
    main()
