"""Run a generated train.py unchanged, timing its all-to-alls and, on request, under torch.profiler.

What torchrun (or python, for one process) launches in place of the script:
    python benchmarks/script_harness.py DIR [--profile --warmup K --top N --trace] -- SCRIPT ARGS...
It imports DIR/train.py as a module, wraps two things from outside and calls the script's own train():
- torch.distributed.all_to_all_single (the script calls it as dist.all_to_all_single, looked up at each call): the
  wall time of every call, waiting for the peers included, goes into each step's JSON record as "all_to_all_s" (rank
  0's). Ulysses and EP issue theirs synchronously, so this is the time the step spends in them. FSDP's collectives
  are asynchronous and not counted.
- StepLog.write, which the loop calls once per step on every rank: it adds that field and advances the profiler.
With --profile, steps K.. are profiled and DIR/profile/rank<r>.txt (operator table, self CPU time; per input
shape with --shapes) and
rank<r>_self_us.json are written (and rank<r>.json, a chrome trace, with --trace). benchmarks/profile_script.py
is the command-line front end; benchmarks/bench_scaling.py launches every run through this file.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def command(script_dir: Path, nproc: int, script_args: list[str], profile: dict | None = None) -> list[str]:
    """The command line that runs DIR/train.py through this harness on `nproc` ranks (a plain process for 1)."""
    me = [str(HERE), str(script_dir)]
    if profile:
        me += ["--profile", "--warmup", str(profile.get("warmup", 3)), "--top", str(profile.get("top", 30))]
        me += ["--trace"] if profile.get("trace") else []
        me += ["--shapes"] if profile.get("shapes") else []
    me += ["--", *script_args]
    if nproc == 1:
        return [sys.executable, *me]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *me]


def load_script(script_dir: str):
    spec = importlib.util.spec_from_file_location("train", os.path.join(script_dir, "train.py"))
    script = importlib.util.module_from_spec(spec)
    sys.modules["train"] = script
    spec.loader.exec_module(script)
    return script


def time_all_to_all():
    """Wrap dist.all_to_all_single; returns the list its call times (seconds) are appended to."""
    import torch.distributed as dist

    calls = []
    plain = dist.all_to_all_single

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return plain(*args, **kwargs)
        finally:
            calls.append(time.perf_counter() - start)

    dist.all_to_all_single = timed
    return calls


def worker(args, script_args):
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    script = load_script(args.dir)
    calls = time_all_to_all()
    rank = int(os.environ.get("RANK", "0"))
    prof = None
    if args.profile:
        steps = int(script_args[script_args.index("--steps") + 1])
        prof = profile(activities=[ProfilerActivity.CPU], record_shapes=args.shapes,
                       schedule=schedule(wait=0, warmup=args.warmup, active=steps - args.warmup, repeat=1))
    write = script.StepLog.write

    def write_and_step(self, record):
        record["all_to_all_s"] = round(sum(calls), 6)
        calls.clear()
        write(self, record)
        if prof is not None:
            prof.step()

    script.StepLog.write = write_and_step
    sys.argv = ["train.py", *script_args]
    with prof if prof is not None else contextlib.nullcontext():
        code = script.train(script.parse_args())
    if prof is not None:
        out = Path(args.dir) / "profile"
        out.mkdir(exist_ok=True)
        averages = prof.key_averages()
        table = (prof.key_averages(group_by_input_shape=True) if args.shapes else averages).table(
            sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60)
        (out / f"rank{rank}.txt").write_text(table)
        (out / f"rank{rank}_self_us.json").write_text(json.dumps({e.key: e.self_cpu_time_total for e in averages}))
        if args.trace:
            prof.export_chrome_trace(str(out / f"rank{rank}.json"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    os._exit(code)


def main():
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--shapes", action="store_true")
    worker(ap.parse_args(argv[:split]), argv[split + 1:])


if __name__ == "__main__":
    main()
