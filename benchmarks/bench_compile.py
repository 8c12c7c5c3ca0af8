"""Compile time and peak memory of `omnigen compile` for the full-size Qwen2-VL-72B on 64 H100s.

python benchmarks/bench_compile.py   → prints wall time and peak RSS next to the targets (< 5 s, < 2 GB).
"""

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "qwen2_vl_72b_h100x64.yaml"


def main():
    out = tempfile.mkdtemp(prefix="omnigen-bench-")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "omnigen.cli", "compile", str(SPEC), "-o", out], check=True)
    elapsed = time.perf_counter() - start
    rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    print(f"compile {SPEC.name}: {elapsed:.2f} s wall (target < 5 s), peak RSS {rss_gb:.2f} GB (target < 2 GB)")
    print("  includes interpreter start-up and importing torch + transformers")


if __name__ == "__main__":
    main()
