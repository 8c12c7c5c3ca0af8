"""Memory per rank against data set size: token shards (memory-mapped) vs the jsonl path (read whole).

python benchmarks/bench_shards.py [--big-gb 1.0] [--jsonl-mb 30] [--steps 3]

Builds a >= 1 GB token-shard set (random uint16 tokens written directly, documents of 1,000 tokens) and a tiny one,
runs the generated llama_tiny script (seq 128, dp_shard=2) on 2 ranks for a few steps on each, and prints each
rank's peak RSS side by side (target: the big set costs < 50 MB more per rank). Then the same for the jsonl path
({"input_ids": [...]} rows) at a tiny and a modest size: the before. Ranks are started here (env:// rendezvous,
as torchrun would) and watched through /proc/<pid>/status every 20 ms: VmHWM is each rank's own peak RSS
(file-backed pages of the memory map included), the last VmRSS / RssAnon / RssFile what it held late in its run.
getrusage's ru_maxrss would not do: Linux carries the high-water mark across exec, so a rank forked by a process
holding torch (this benchmark, or torchrun's agent) reports at least that parent's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from omnigen.shards import write_random  # noqa: E402

SPEC = ROOT / "specs" / "llama_tiny.yaml"
VOCAB = json.loads((ROOT / "specs" / "models" / "llama_tiny" / "config.json").read_text())["vocab_size"]
SEQ, RANKS = 128, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compile_for(data: Path, out: Path, steps: int) -> None:
    sets = ["--set", f"train.data={data}", "--set", f"train.seq_len={SEQ}", "--set", f"train.steps={steps}"]
    subprocess.run([sys.executable, "-m", "omnigen.cli", "compile", str(SPEC), "-o", str(out), *sets], check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def status_mib(pid: int) -> dict[str, float]:
    """VmHWM (peak RSS since exec), VmRSS, RssAnon (heap) and RssFile (file-backed pages: the memory map) of a live
    process, in MiB."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")
            if k in fields}


def run_ranks(script: Path) -> tuple[list[float], list[dict], int]:
    """Launch the script on RANKS processes; returns (peak RSS per rank in MiB, the last /proc sample of each rank
    taken while it ran, steps logged)."""
    port, procs = free_port(), []
    for rank in range(RANKS):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(RANKS),
               "LOCAL_WORLD_SIZE": str(RANKS), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=script.parent, env=env,
                                      stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL,
                                      stderr=subprocess.STDOUT, text=True))
    last = [{} for _ in procs]
    stop = threading.Event()

    def sample():  # the RSS each rank holds late in its run, and its peak (VmHWM, monotonic)
        while not stop.is_set():
            for i, p in enumerate(procs):
                now = status_mib(p.pid) if p.poll() is None else {}
                if now.get("VmRSS"):
                    last[i] = now
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = procs[0].stdout.read()
    codes = [p.wait() for p in procs]
    stop.set()
    sampler.join()
    if any(codes):
        raise SystemExit(f"{script} failed:\n{output[-3000:]}")
    steps = sum(1 for line in output.splitlines() if line.startswith("{"))
    return [d["VmHWM"] for d in last], last, steps


def jsonl(path: Path, rows: int, tokens_per_row: int = 512) -> Path:
    import torch
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"input_ids": torch.randint(0, VOCAB, (tokens_per_row,), generator=g).tolist()}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-gb", type=float, default=1.0, help="size of the big shard set in GB (10^9 bytes)")
    parser.add_argument("--jsonl-mb", type=float, default=30.0, help="size of the modest jsonl file in MB")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="omnigen-bench-shards-"))
    try:
        t = time.perf_counter()
        tiny, big = work / "tiny_shards", work / "big_shards"
        write_random(tiny, tokens=100_000, vocab_size=VOCAB, document_length=1000)
        write_random(big, tokens=int(args.big_gb * 1e9) // 2, vocab_size=VOCAB, document_length=1000)
        shards_bytes = sum(f.stat().st_size for f in big.iterdir())
        print(f"wrote {shards_bytes / 1e9:.2f} GB of shards in {time.perf_counter() - t:.0f} s", flush=True)
        small_json = jsonl(work / "tiny.jsonl", 40)
        row_bytes = len(small_json.read_bytes()) / 40
        big_json = jsonl(work / "big.jsonl", int(args.jsonl_mb * 1e6 / row_bytes))
        cases = [("token shards", tiny, big), ("jsonl (read whole)", small_json, big_json)]
        print(f"\npeak RSS per rank (VmHWM, MiB), small set / big set; then the last sample taken while the ranks ran "
              "(anonymous + file-backed: the memory map's pages)")
        print(f"{'data path':<20}{'small set':>12}{'big set':>12}{'rank 0 peak':>20}{'rank 1 peak':>20}{'growth':>11}"
              f"{'rank 0 late RSS (anon+file)':>44}{'rank 1 late RSS (anon+file)':>44}")
        for label, small, large in cases:
            rss, late, sizes = [], [], []
            for data in (small, large):
                out = work / f"{label.split()[0]}_{data.name}"
                compile_for(data, out, args.steps)
                peaks, samples, steps = run_ranks(out / "train.py")
                late.append(samples)
                if steps != args.steps:
                    raise SystemExit(f"{out}: expected {args.steps} steps, logged {steps}")
                rss.append(peaks)
                size = sum(f.stat().st_size for f in data.iterdir()) if data.is_dir() else data.stat().st_size
                sizes.append(size)
            growth = max(b - a for a, b in zip(*rss))
            cols = [f"{rss[0][r]:.1f} / {rss[1][r]:.1f}" for r in range(RANKS)]
            lates = [" / ".join(f"{d.get('VmRSS', 0):.1f} ({d.get('RssAnon', 0):.0f}+{d.get('RssFile', 0):.0f})"
                                for d in (late[0][r], late[1][r])) for r in range(RANKS)]
            print(f"{label:<20}{sizes[0] / 1e6:>9.2f} MB{sizes[1] / 1e6:>9.1f} MB{cols[0]:>20}{cols[1]:>20}"
                  f"{growth:>+7.1f} MiB{lates[0]:>44}{lates[1]:>44}", flush=True)
        print("\ntarget: token shards grow < 50 MB per rank from the tiny to the >= 1 GB set")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
