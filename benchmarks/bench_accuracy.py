"""Cost-model accuracy: predicted vs measured step time and peak memory for every CPU spec at 2 and 4 ranks.

python benchmarks/bench_accuracy.py [--specs llama_tiny 'qwen2_vl*'] [--ranks 2 4] [--hardware PROFILE.yaml]
                                    [--steps 30] [--warmup 5] [--repeats 2] [--json runs/bench_accuracy/results.json]
    → one table (spec, ranks, mesh, predicted vs measured step time and peak memory with ratios, tokens/s/device),
      a summary line (how many within 15% on step time and 10% on memory), and a JSON file of every row.

Each case is `omnigen bench` in-process (omnigen.bench.run) on one node: `--set cluster.nodes=1 --set
cluster.procs_per_node=N`. A spec's fixed parallel dims may not fit N ranks; they are relaxed in steps, each printed:
first the data-parallel dims (dp_replicate, dp_shard) become auto, then the global batch also grows to a multiple of
N x micro_batch_size, then every mesh dim becomes auto (with and without the larger batch). A case with no plan after
that is skipped with the planner's reason. Specs whose cluster.device is not cpu (the full-size GPU specs) are skipped:
they cannot run on this machine. With --hardware the plans are made against that profile (e.g. `omnigen calibrate`
output) instead of the spec's.

Measured figures are bench's, from the fastest of --repeats launches (load from elsewhere only slows a run; the
spread between launches is printed as the noise floor), made in whole passes over the cases so that one case's
launches lie minutes apart: medians over the steps after the warm-up (step time, tokens/s/device) and the run's
memory high-water mark (max over ranks of ru_maxrss on CPU, which includes the Python + torch + gloo baseline).
Runs and logs stay in runs/bench_accuracy/<spec>_r<N>/ (git-ignored). On 2 cores a sweep takes ~9 minutes at 2 ranks, ~15 at 4.
"""

import argparse
import fnmatch
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from omnigen import bench  # noqa: E402
from omnigen.errors import OmnigenError  # noqa: E402
from omnigen.pipeline import plan as make_plan  # noqa: E402
from omnigen.spec import load_spec  # noqa: E402

WORK = ROOT / "runs" / "bench_accuracy"
STEP_TOLERANCE, MEMORY_TOLERANCE = 0.15, 0.10
STEPS, WARMUP = 30, 5  # CPU steps vary +-25% one to the next: medians need a few tens of them
REPEATS = 3            # and whole launches drift 10-30% with the machine's load: keep the fastest of three
MESH_DIMS = ("dp_replicate", "dp_shard", "sp", "ep")


def selected(path: Path, patterns: list[str]) -> bool:
    return not patterns or any(fnmatch.fnmatch(path.stem, p) for p in patterns)


def relaxations(spec, ranks: int) -> list[list[str]]:
    """--set lists to try in order, each relaxing more of what the spec fixed."""
    fixed = {d: getattr(spec.parallel, d) for d in MESH_DIMS if getattr(spec.parallel, d) != "auto"}
    data_parallel = [f"parallel.{d}=auto" for d in ("dp_replicate", "dp_shard") if d in fixed]
    every_dim = [f"parallel.{d}=auto" for d in fixed]
    step = ranks * spec.train.micro_batch_size
    batch = -(-spec.train.global_batch_size // step) * step  # round up to a multiple of step
    bigger = [f"train.global_batch_size={batch}"] if batch != spec.train.global_batch_size else []
    # sp and ep are what a spec is about: keep them while a larger batch can still make room
    tries = [[], data_parallel, data_parallel + bigger, every_dim, every_dim + bigger]
    unique = []
    for t in tries:
        if t not in unique:
            unique.append(t)
    return unique


def fit(path: Path, base: list[str], ranks: int):
    """(spec, changes) for the first relaxation that has a plan, or (None, the planner's last reason)."""
    reason = ""
    for changes in relaxations(load_spec(path, base), ranks):
        spec = load_spec(path, base + changes)
        try:
            make_plan(spec)
            return spec, changes
        except OmnigenError as e:
            reason = str(e).splitlines()[0]
    return None, reason


def plan_case(path: Path, ranks: int, args) -> tuple[dict, Any]:
    """(row so far, spec to run) for one spec at one rank count; spec None when no relaxation has a plan."""
    base = ["cluster.nodes=1", f"cluster.procs_per_node={ranks}"]
    if args.hardware:
        base.append(f"cluster.hardware={Path(args.hardware).resolve()}")
    row = {"spec": path.stem, "ranks": ranks}
    spec, changes = fit(path, base, ranks)
    if spec is None:
        return {**row, "skipped": f"no plan: {changes}"}, None
    if changes:
        print(f"  {path.stem} @ {ranks} ranks: changed {', '.join(changes)}", flush=True)
    return {**row, "changes": changes}, spec


def finish_row(row: dict, reports: list[dict]) -> dict:
    report = bench.fastest(reports)
    return {**row, "mesh": report["mesh"], "step_time_s_by_launch": [r["measured"]["step_time_s"] for r in reports],
            "hardware": report["hardware"], "run_exit_code": report["run_exit_code"],
            "predicted": {k: report["predicted"][k] for k in ("step_time_s", "peak_memory_bytes",
                                                               "tokens_per_s_per_device")},
            "measured": {k: report["measured"][k] for k in ("step_time_s", "peak_memory_bytes",
                                                             "tokens_per_s_per_device")},
            "ratios": report["ratios"]}


def run_cases(cases: list[tuple[dict, Any]], args) -> list[dict]:
    """Every case launched once per pass, --repeats passes (bench.launch_in_passes); a case that fails once is
    not launched again."""
    failed: dict[str, str] = {}

    def key(row: dict) -> str:
        return f"{row['spec']}_r{row['ranks']}"

    def launch(case, i):
        row, spec = case
        if case is cases[0]:
            print(f"pass {i + 1} of {args.repeats}", flush=True)
        if spec is None or key(row) in failed:
            return None
        try:
            return bench.run(spec, WORK / key(row), args.steps, args.warmup, quiet=True)
        except bench.BenchFailed as e:
            failed[key(row)] = str(e).splitlines()[0]
            return None

    rows = []
    for (row, spec), reports in zip(cases, bench.launch_in_passes(cases, args.repeats, launch)):
        rows.append(row if spec is None else {**row, "failed": failed[key(row)]} if key(row) in failed
                    else finish_row(row, reports))
        r = rows[-1]
        state = r.get("skipped") or r.get("failed") or f"step ratio {r['ratios']['step_time_s']:.2f}, " \
                                                       f"memory ratio {r['ratios']['peak_memory_bytes']:.2f}"
        print(f"  {r['spec']} @ {r['ranks']} ranks: {state}", flush=True)
    return rows


def mesh_label(mesh: dict) -> str:
    return " x ".join(f"{d}={n}" for d, n in mesh.items() if n > 1) or "1"


def table(rows: list[dict]) -> str:
    head = ["spec", "ranks", "mesh", "step pred", "step meas", "ratio", "peak MiB pred", "peak MiB meas", "ratio",
            "tok/s/dev pred", "tok/s/dev meas"]
    lines = []
    for r in rows:
        if "measured" not in r:
            lines.append([r["spec"], str(r["ranks"]), r.get("skipped") or f"FAILED: {r['failed']}"])
            continue
        p, m, q = r["predicted"], r["measured"], r["ratios"]
        lines.append([r["spec"], str(r["ranks"]), mesh_label(r["mesh"]),
                      f"{p['step_time_s'] * 1e3:.1f} ms", f"{m['step_time_s'] * 1e3:.1f} ms", f"{q['step_time_s']:.2f}",
                      f"{p['peak_memory_bytes'] / 2**20:.0f}", f"{m['peak_memory_bytes'] / 2**20:.0f}",
                      f"{q['peak_memory_bytes']:.2f}", f"{p['tokens_per_s_per_device']:.0f}",
                      f"{m['tokens_per_s_per_device']:.0f}"])
    widths = [max([len(h)] + [len(c[i]) for c in lines if len(c) == len(head)]) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i < 3 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])]
                     + [fmt(c) if len(c) == len(head) else "  ".join(c) for c in lines])


def summary(rows: list[dict]) -> str:
    done = [r for r in rows if "measured" in r]
    step = sum(abs(r["ratios"]["step_time_s"] - 1) <= STEP_TOLERANCE for r in done)
    memory = sum(abs(r["ratios"]["peak_memory_bytes"] - 1) <= MEMORY_TOLERANCE for r in done)
    skipped = len(rows) - len(done)
    spreads = sorted(max(r["step_time_s_by_launch"]) / min(r["step_time_s_by_launch"]) - 1 for r in done)
    noise = (f"; launches of one case differ by a median {spreads[len(spreads) // 2]:.0%}, at most {spreads[-1]:.0%}"
             if spreads and len(done[0]["step_time_s_by_launch"]) > 1 else "")
    return (f"{len(done)} cases measured ({skipped} skipped or failed): step time within {STEP_TOLERANCE:.0%} in "
            f"{step}/{len(done)}, peak memory within {MEMORY_TOLERANCE:.0%} in {memory}/{len(done)}{noise}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", nargs="*", default=[], help="spec names or glob patterns (default: every spec)")
    ap.add_argument("--ranks", nargs="*", type=int, default=[2, 4])
    ap.add_argument("--hardware", help="plan against this hardware profile .yaml (e.g. omnigen calibrate output)")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--warmup", type=int, default=WARMUP)
    ap.add_argument("--repeats", type=int, default=REPEATS, help="launches per case; the fastest one counts")
    ap.add_argument("--json", default=str(WORK / "results.json"), help="where to write every row")
    args = ap.parse_args()
    if args.hardware and not Path(args.hardware).is_file():
        sys.exit(f"bench_accuracy: --hardware {args.hardware}: no such file")
    cases = []
    for path in sorted((ROOT / "specs").glob("*.yaml")):
        if not selected(path, args.specs):
            continue
        spec = load_spec(path)
        if spec.cluster.device != "cpu":
            print(f"skip {path.stem}: cluster.device={spec.cluster.device}, hardware {spec.cluster.hardware} "
                  f"(a full-size GPU spec; this machine runs CPU ranks only)", flush=True)
            continue
        cases += [plan_case(path, ranks, args) for ranks in args.ranks]
    rows = run_cases(cases, args)
    print("\n" + table(rows) + "\n\n" + summary(rows))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                               "hardware": args.hardware,
                               "rows": rows, "summary": summary(rows)}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
