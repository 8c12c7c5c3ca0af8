"""The supported-models table: every image-text-to-text, audio-text-to-text, any-to-any and MoE causal-LM class
transformers ships, built tiny by code (omnigen.zoo) and verified in each layout the model allows.

python benchmarks/supported_models.py [--only NAME ...] [--verify NAME ...] [--layouts fsdp,sp,ep] [--json FILE]
                                      [--reuse FILE] [--write]

Per class and layout (FSDP dp_shard=2; Ulysses sp=2; expert parallel ep=2 over dp_shard=2, for MoE foundations):
compile, then `omnigen verify` on 2 CPU ranks for 3 steps. A cell is the worst per-tensor deviation of the step-0
gradients (verify's strictest check) when every check passes, FAIL with the failing check, or the one-line reason
compile refused the layout (exit 2: the model or layout omnigen cannot serve). --write puts the table into
docs/supported_models.md and the README's supported-models section, and the results behind it into
docs/supported_models.json, which a later run can --reuse to rerun only a few classes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import transformers  # noqa: E402

from omnigen import runner, zoo  # noqa: E402
from omnigen.errors import OmnigenError  # noqa: E402
from omnigen.pipeline import plan as compile_plan  # noqa: E402
from omnigen.spec import spec_from_dict  # noqa: E402

STEPS = 3
LAYOUTS = {"fsdp": {"dp_shard": 2, "sp": 1, "ep": 1}, "sp": {"dp_shard": 1, "sp": 2, "ep": 1},
           "ep": {"dp_shard": 2, "sp": 1, "ep": 2}}
README_START, README_END = "<!-- supported-models:start -->", "<!-- supported-models:end -->"


def spec_for(class_name: str, layout: str, folder: Path):
    raw = zoo.write_tiny(getattr(transformers, class_name), folder / "model", name=f"{class_name}_{layout}",
                         cluster={"nodes": 1, "procs_per_node": 2, "device": "cpu", "hardware": "cpu"},
                         train={"seq_len": 128, "micro_batch_size": 1, "global_batch_size": 4, "steps": STEPS},
                         parallel={**LAYOUTS[layout], "dp_replicate": 1, "activation_checkpointing": "none"})
    return spec_from_dict(raw, "<supported_models>", str(folder))


def one_line(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.sub(r"^<supported_models>: ", "", first)[:160]


def run_case(class_name: str, layout: str, is_moe: bool, verify: bool = True) -> dict:
    if layout == "ep" and not is_moe:
        return {"result": "n/a", "detail": "no routed experts"}
    with tempfile.TemporaryDirectory(prefix="omnigen-supported-") as tmp:
        try:
            spec = spec_for(class_name, layout, Path(tmp))
        except Exception as e:  # the zoo's shrinking, not omnigen: the class's defaults do not shrink validly
            return {"result": "no tiny config", "detail": f"zoo: {type(e).__name__}: {one_line(e)}"}
        try:
            compile_plan(spec)
        except OmnigenError as e:
            return {"result": "refused", "detail": one_line(e)}
        except Exception as e:  # a traceback is a bug of omnigen's, reported as such
            return {"result": "crash", "detail": f"{type(e).__name__}: {one_line(e)}"}
        if not verify:
            return {"result": "compiles", "detail": "compiles; not verified in this run"}
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            pair = runner.run_pair(spec, STEPS, str(Path(tmp) / "verify"))
        if pair is None:
            return {"result": "run failed", "detail": log.getvalue()[-300:]}
        checks = runner.compare(pair[0], pair[1], STEPS, pair[2])
        failed = [c for c in checks if not c.ok]
        if failed and runner.random_in_training(Path(tmp) / "verify" / "reference"):
            return {"result": "random", "detail": "its training forward is random with dropout off (e.g. a router "
                                                  "that samples experts): one process and 2 ranks cannot be compared"}
        grads = next(c for c in checks if c.what == "step-0 gradients")
        return {"result": "FAIL" if failed else "verified", "deviation": grads.worst,
                "detail": "; ".join(f"{c.what} {c.worst:.2g} > {c.tolerance:g}" for c in failed)}


def cell(outcome: dict) -> str:
    if outcome["result"] == "verified":
        return f"{outcome['deviation']:.1e}"
    return {"n/a": "-", "refused": "refused", "no tiny config": "no tiny config", "compiles": "compiles",
            "random": "random", "FAIL": "**FAIL**"}.get(
        outcome["result"], f"**{outcome['result']}**")


def table(results: list[dict]) -> str:
    lines = ["| architecture | kind | FSDP dp2 | SP sp2 | EP ep2 | why a layout is refused |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        reasons = sorted({o["detail"] for o in r["layouts"].values()
                          if o["result"] not in ("verified", "n/a", "compiles")})
        lines.append(f"| {r['class']} | {r['kind']} | " + " | ".join(cell(r["layouts"][k]) for k in LAYOUTS)
                     + f" | {'; '.join(reasons)} |")
    count = {k: sum(o["result"] == k for r in results for o in r["layouts"].values())
             for k in ("verified", "compiles", "refused", "no tiny config", "random")}
    return "\n".join(lines) + (f"\n\n{len(results)} classes; class x layout cases: {count['verified']} verified (the "
                               f"cell is the worst per-tensor step-0 gradient deviation), {count['compiles']} compiled "
                               f"but not verified in this run, {count['refused']} refused with the reason shown, "
                               f"{count['no tiny config']} without a tiny config (the zoo cannot shrink the class's "
                               f"defaults validly), {count['random']} not comparable (random in training with "
                               f"dropout off). transformers {transformers.__version__}.\n")


def write(markdown: str, results: list[dict]) -> None:
    (ROOT / "docs" / "supported_models.json").write_text(json.dumps(results, indent=2) + "\n")
    (ROOT / "docs" / "supported_models.md").write_text(
        "# Supported models\n\nGenerated by `python benchmarks/supported_models.py --write`.\n\n" + markdown)
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    (ROOT / "README.md").write_text(readme[:start] + "\n" + markdown + readme[end:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="class names to run (default: every class)")
    parser.add_argument("--verify", nargs="*", help="verify only these classes; the others are compiled (a cell "
                                                    "'compiles'), which takes seconds instead of minutes")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated subset of fsdp,sp,ep")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--reuse", help="a --json file of an earlier run: classes outside --only keep its results, so "
                                        "the table can be rewritten after rerunning a few")
    parser.add_argument("--write", action="store_true", help="write docs/supported_models.md and the README table")
    args = parser.parse_args()
    layouts = args.layouts.split(",")
    earlier = {r["class"]: r["layouts"] for r in json.loads(Path(args.reuse).read_text())} if args.reuse else {}
    results = []
    for model in zoo.model_classes():
        if args.only and model.name not in args.only:
            if model.name in earlier:
                results.append({"class": model.name, "kind": model.kind, "layouts": earlier[model.name]})
            continue
        start = time.perf_counter()
        verify = args.verify is None or model.name in args.verify
        outcome = {k: (run_case(model.name, k, model.moe, verify) if k in layouts
                       else {"result": "n/a", "detail": "not run"}) for k in LAYOUTS}
        results.append({"class": model.name, "kind": model.kind, "layouts": outcome})
        if args.json:  # as it goes: a long run that stops keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"{model.name:<50} " + "  ".join(f"{k}: {cell(o):<9}" for k, o in outcome.items())
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    markdown = table(results)
    print("\n" + markdown)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.write:
        write(markdown, results)
    return 1 if any(o["result"] in ("crash", "FAIL") for r in results for o in r["layouts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
