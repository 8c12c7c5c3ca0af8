"""Compile time and peak memory of `omnigen compile` for the full-size Qwen2-VL-72B on 64 H100s.

python benchmarks/bench_compile.py   → wall time and peak RSS next to the targets (< 5 s, < 2 GB), and next to the
floor no compiler can go under: a bare `python -c` that only imports transformers' Qwen2-VL model class.
"""

import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "qwen2_vl_72b_h100x64.yaml"
RUNS = 3


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main():
    out = tempfile.mkdtemp(prefix="omnigen-bench-")
    compile_s = statistics.median(timed([sys.executable, "-m", "omnigen.cli", "compile", str(SPEC), "-o", out])
                                  for _ in range(RUNS))
    rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    floor_s = statistics.median(timed([sys.executable, "-c", "import transformers; transformers.Qwen2VLForConditionalGeneration"])
                                for _ in range(RUNS))
    print(f"omnigen compile {SPEC.name} (median of {RUNS}, cold processes)")
    print(f"  wall time             {compile_s:6.2f} s   (target < 5 s)")
    print(f"  peak RSS              {rss_gb:6.2f} GB  (target < 2 GB)")
    print(f"  import-only floor     {floor_s:6.2f} s   (python + torch + transformers' Qwen2-VL modeling module)")
    print(f"  omnigen's own share   {compile_s - floor_s:6.2f} s   (spec, meta build, analysis, planning, rendering, writing)")


if __name__ == "__main__":
    main()
