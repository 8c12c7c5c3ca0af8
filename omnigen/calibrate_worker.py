"""The torchrun side of `omnigen calibrate`: one launch on N local ranks (gloo on cpu, nccl on cuda) runs `worker()`
(`python -m omnigen.calibrate_worker`) on every rank; rank 0 writes the merged records (each figure the slowest
rank's: a step waits for it) to a JSON file `run_workers` reads back.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .calibrate_measure import (cpu_name, measure_collectives, measure_gemms, measure_host, measure_layers,
                                measure_optimizer, measure_overlap, measure_sdpa, settings, timer)
from .hardware import GIB


def _slowest(per_rank: list[list[dict]]) -> list[dict]:
    """Merge the ranks' records: each figure becomes the slowest rank's; `seconds_by_rank` keeps them all."""
    merged = []
    for records in zip(*per_rank):
        rec = dict(records[0])
        if isinstance(rec["seconds"], list):   # repeat-wise max over ranks, then the median
            repeats = range(len(rec["seconds"]))
            rec["seconds"] = statistics.median(max(r["seconds"][i] for r in records) for i in repeats)
        else:
            rec["seconds_by_rank"] = [r["seconds"] for r in records]
            rec["seconds"] = max(r["seconds"] for r in records)
        if "pairs" in rec:
            rec["pairs_by_rank"] = [r["pairs"] for r in records]
            del rec["pairs"]
        merged.append(rec)
    return merged


def _import_like_generated_script() -> None:
    """What a generated train.py imports before it builds a model, so that the RSS sampled after it is its start."""
    import torch.nn.functional  # noqa: F401
    import transformers
    from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    transformers.LlamaForCausalLM   # resolving a model class imports transformers' modelling stack (~90 MB RSS)


def peak_rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB   # Linux: KiB, read as train.py does


def worker(device: str, quick: bool, result_path: str) -> None:
    import torch
    import torch.distributed as dist
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    _import_like_generated_script()
    dist.init_process_group("nccl" if device == "cuda" else "gloo", device_id=dev if device == "cuda" else None)
    dist.all_reduce(torch.ones(1, device=dev))
    rss_gib = peak_rss_gib()    # now, before any measurement allocates: the peak so far is the process's fixed cost
    s, now = settings(device, quick), timer(device)
    primary = "bf16" if device == "cuda" else "fp32"

    def say(msg):
        if rank == 0:
            print(f"[calibrate] {msg} ({time.perf_counter() - started:.1f} s)", flush=True)
    dist.barrier()
    started = time.perf_counter()
    say(f"{n} ranks, {torch.get_num_threads()} thread(s) each, {rss_gib:.2f} GiB RSS at start; GEMMs ...")
    mine: dict[str, Any] = {"gemm": measure_gemms(dev, s, now)}
    say("SDPA ...")
    mine["sdpa"] = measure_sdpa(dev, s, now)
    say("Llama fwd+bwd ...")
    mine["layer"] = measure_layers(dev, s, now, mine["gemm"])
    say(f"host overhead: tiny Llamas at {', '.join(map(str, s.tiny_layers))} layers ...")
    mine["host"] = measure_host(dev, s, now, primary)
    say("clip_grad_norm_ + AdamW ...")
    mine["optimizer"] = measure_optimizer(dev, s, now)
    dist.barrier()
    say("collectives ...")
    mine["comm"] = measure_collectives(dev, s, now, n) if n > 1 else []
    if n > 1:
        say("overlap of an async all-gather with GEMMs ...")
        mine["overlap"] = measure_overlap(dev, s, now, mine["gemm"], mine["comm"], primary)
    gathered: list[Any] = [None] * n
    dist.all_gather_object(gathered, {"records": mine, "rss_gib": rss_gib})
    if rank == 0:
        result: dict[str, Any] = {k: _slowest([g["records"][k] for g in gathered]) for k in mine}
        result["rss_gib_by_rank"] = [g["rss_gib"] for g in gathered]
        result["rss_gib"] = max(result["rss_gib_by_rank"])
        result["world_size"] = n
        result["threads"] = torch.get_num_threads()
        result["torch"] = torch.__version__
        result["backend"] = dist.get_backend()
        result["device_name"] = torch.cuda.get_device_name(dev) if device == "cuda" else cpu_name()
        result["memory_gib"] = torch.cuda.get_device_properties(dev).total_memory / GIB if device == "cuda" else None
        result["measure_s"] = time.perf_counter() - started
        Path(result_path).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def run_workers(device: str, ranks: int, quick: bool, echo: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="omnigen-calibrate-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(ranks), "-m", "omnigen.calibrate_worker", "--device", device, "--result", str(result)]
        cmd += ["--quick"] if quick else []
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        echo(f"$ {' '.join(cmd[1:])}")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("[calibrate]"):
                echo(line)
            tail = (tail + [line])[-40:]
        if proc.wait() != 0 or not result.is_file():
            raise CalibrationFailed(f"the measurement run failed (exit {proc.returncode}):\n" + "\n".join(tail))
        return json.loads(result.read_text())


class CalibrationFailed(Exception):
    """The torchrun measurement did not complete (not a user error: exit 1)."""


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="omnigen calibrate worker (run by torchrun; see `omnigen calibrate`)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    worker(args.device, args.quick, args.result)
