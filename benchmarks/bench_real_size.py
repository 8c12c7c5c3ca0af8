"""Analyze and plan every omni-modal / MoE model class transformers ships, at its config class's default size, for 64 H100s.

python benchmarks/bench_real_size.py [--only NAME ...] [--no-plan] [--json FILE]

The classes come from transformers' own auto mappings, not a hand list: every image-text-to-text class
(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES), the audio / speech / omni entries of MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES,
and every causal LM (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) whose default text config routes tokens to experts
(num_experts, num_local_experts, n_routed_experts or moe_num_experts set). Each model is its config class's defaults
(no hub access), written to a temporary folder as config.json and compiled through a spec like a user's: 8 nodes x 8
H100, bf16, seq_len 4096, parallel all auto. Printed per class: the analyzer's time (config load, meta-device build,
module walk: `omnigen analyze` minus start-up), the planner's time (input recipe + search) or the reason planning was
refused, next to the 10 s target. A refusal is an omnigen error (exit 2 for the CLI), never a traceback: a traceback
is printed as CRASH and fails the run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402

from omnigen.analyze import analyze  # noqa: E402
from omnigen.errors import OmnigenError  # noqa: E402
from omnigen.hardware import load_profile  # noqa: E402
from omnigen.hf import load_config  # noqa: E402
from omnigen.inputs import input_recipe  # noqa: E402
from omnigen.plan import make_plan  # noqa: E402
from omnigen.spec import spec_from_dict  # noqa: E402
from omnigen.zoo import model_classes  # noqa: E402

TARGET_S = 10.0
def spec_for(model_type: str, class_name: str, folder: Path):
    config = transformers.CONFIG_MAPPING[model_type]()
    (folder / "config.json").write_text(config.to_json_string(use_diff=False))
    raw = {"name": model_type, "model": {"config": str(folder / "config.json"), "class": class_name},
           "cluster": {"nodes": 8, "procs_per_node": 8, "device": "cuda", "hardware": "h100"},
           "train": {"seq_len": 4096, "micro_batch_size": 1, "global_batch_size": 64, "precision": "bf16"}}
    (folder / "spec.yaml").write_text(json.dumps(raw))  # JSON is YAML: what `omnigen plan` reads with --cli
    return spec_from_dict(raw, "<bench_real_size>", str(folder))


def cli_plan_s(folder: Path) -> tuple[float, int]:
    """Wall time and exit code of a cold `omnigen plan` process (python, torch and transformers start-up included)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "omnigen.cli", "plan", str(folder / "spec.yaml")],
                          capture_output=True, text=True, cwd=ROOT)
    return time.perf_counter() - start, done.returncode


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split())


def run_one(kind: str, model_type: str, class_name: str, do_plan: bool, cli: bool = False) -> dict:
    row = {"kind": kind, "model_type": model_type, "class": class_name, "analyze_s": None, "plan_s": None,
           "status": "", "detail": ""}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return _run_one(row, Path(tmp), model_type, class_name, do_plan)
        finally:
            if cli and (Path(tmp) / "spec.yaml").exists():
                row["cli_s"], row["cli_rc"] = cli_plan_s(Path(tmp))


def _run_one(row: dict, tmp: Path, model_type: str, class_name: str, do_plan: bool) -> dict:
    try:
        if getattr(transformers, class_name, None) is None:
            row.update(status="skipped", detail=f"transformers exports no {class_name}")
            return row
        spec = spec_for(model_type, class_name, tmp)
        start = time.perf_counter()
        graph = analyze(spec)
        row["analyze_s"] = time.perf_counter() - start
        row["params"] = graph.total_params
        row["moe"] = any(g.experts for g in graph.groups)
        if not do_plan:
            row["status"] = "analyzed"
            return row
        start = time.perf_counter()
        config = load_config(spec)
        inputs = input_recipe(config, graph.model_class, spec.train.seq_len, spec.train.pack_documents,
                              {"image": 1, "audio": 1})
        plan = make_plan(spec, graph, load_profile(spec), inputs)
        row["plan_s"] = time.perf_counter() - start
        row.update(status="planned", detail=" x ".join(f"{k}={v}" for k, v in plan.mesh.items() if v > 1)
                   + f", {plan.predicted['step_time_s']:.3g} s/step")
    except OmnigenError as e:
        stage = "analyze" if row["analyze_s"] is None else "plan"
        row.update(status=f"refused at {stage}", detail=_reason(e))
    except Exception as e:  # noqa: BLE001  (a crash is what this benchmark exists to find)
        row.update(status="CRASH", detail=f"{type(e).__name__}: {_reason(e)}",
                   traceback=traceback.format_exc(limit=-4))
    return row




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="class names or model types to run (default: all)")
    ap.add_argument("--no-plan", action="store_true", help="analyze only")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--cli", action="store_true", help="also time a cold `omnigen plan` process per class "
                    "(adds the ~5 s python + torch + transformers start-up; exit 2 = refused)")
    ap.add_argument("--width", type=int, default=110, help="truncate each reason to this many characters")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    rows = []
    classes = [(c.kind, c.model_type, c.name) for c in model_classes()
               if not args.only or c.model_type in args.only or c.name in args.only]
    floor = None
    if args.cli:  # what no `omnigen plan` process can go under on this machine, right now
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, transformers; transformers.LlamaForCausalLM"], check=True,
                       capture_output=True)
        floor = time.perf_counter() - start
        print(f"import floor (python + torch + transformers' Llama class, cold): {floor:.2f} s; `cli` below includes it")
    print(f"{'kind':<10} {'class':<44} {'analyze':>8} {'plan':>8}  target {TARGET_S:.0f} s  status / reason")
    for kind, mt, cls in classes:
        row = run_one(kind, mt, cls, not args.no_plan, args.cli)
        rows.append(row)
        fmt = lambda s: f"{s:7.2f}s" if s is not None else f"{'-':>8}"  # noqa: E731
        over = " OVER" if (row["analyze_s"] or 0) + (row["plan_s"] or 0) > TARGET_S else ""
        cli = (f" cli {row['cli_s']:5.2f}s (floor+{row['cli_s'] - floor:5.2f}s) rc {row['cli_rc']}"
               if "cli_s" in row else "")
        over = " OVER" if row.get("cli_s", 0) > TARGET_S else over
        print(f"{kind:<10} {cls:<44} {fmt(row['analyze_s'])} {fmt(row['plan_s'])}{cli}{over}  "
              f"{row['status']}: {row['detail'][:args.width]}", flush=True)
    counts = {}
    for r in rows:
        counts[r["status"].split(" at ")[0]] = counts.get(r["status"].split(" at ")[0], 0) + 1
    slow = [r["class"] for r in rows if max((r["analyze_s"] or 0) + (r["plan_s"] or 0), r.get("cli_s", 0)) > TARGET_S]
    print(f"\n{len(rows)} classes: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f"; over {TARGET_S:.0f} s: {', '.join(slow) or 'none'}")
    for r in rows:
        if r["status"] == "CRASH":
            print(f"\n--- {r['class']}\n{r['traceback']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 1 if any(r["status"] == "CRASH" or r.get("cli_rc", 0) not in (0, 2) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
