"""Generated FSDP script vs a hand-written FSDP2 loop: tokens/s on 2 CPU ranks, same model and batch.

python benchmarks/bench_fsdp.py   → prints both throughputs and their ratio (target: generated >= 0.95 x baseline).
Runs alternate (baseline, generated, baseline, generated, ...) so machine noise hits both alike.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "llama_tiny.yaml"
CONFIG = ROOT / "specs" / "models" / "llama_tiny"
SEQ, BATCH, STEPS, WARMUP, ROUNDS = 256, 8, 12, 2, 3


def torchrun(args: list[str], cwd: Path) -> list[float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args],
                         cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout
    steps = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [s["tokens_per_s"] for s in steps[WARMUP:]]


def main():
    work = Path(tempfile.mkdtemp(prefix="omnigen-bench-"))
    sets = ["--set", f"train.seq_len={SEQ}", "--set", f"train.global_batch_size={BATCH}", "--set", f"train.steps={STEPS}"]
    subprocess.run(["omnigen", "compile", str(SPEC), "-o", str(work), *sets], check=True, capture_output=True)
    baseline, generated = [], []
    for _ in range(ROUNDS):
        baseline += torchrun([str(ROOT / "benchmarks" / "fsdp_baseline.py"), str(CONFIG), "--seq-len", str(SEQ),
                              "--global-batch", str(BATCH), "--steps", str(STEPS)], work)
        generated += torchrun(["train.py"], work)
    b, g = statistics.median(baseline), statistics.median(generated)
    print(f"{'':<28}{'tokens/s (median)':>20}")
    print(f"{'hand-written FSDP2 loop':<28}{b:>20.1f}")
    print(f"{'omnigen generated script':<28}{g:>20.1f}")
    print(f"ratio generated/baseline: {g / b:.3f}  (target >= 0.95)  [llama_tiny, seq {SEQ}, global batch {BATCH}, 2 CPU ranks]")


if __name__ == "__main__":
    main()
