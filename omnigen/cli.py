"""`omnigen` command line: analyze, plan, compile, run, verify, bench, calibrate, export."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from . import __version__
from .errors import OmnigenError

SETS = click.option("--set", "sets", multiple=True, metavar="KEY.PATH=VALUE",
                    help="Override a spec value, e.g. --set train.seq_len=256 (repeatable).")
SPEC = click.argument("spec_path", metavar="SPEC", type=click.Path(dir_okay=False))


def user_errors(fn):
    """Bad input → one clear message on stderr and exit code 2, never a traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OmnigenError as e:
            click.echo(f"omnigen: error: {e}", err=True)
            sys.exit(2)
    return wrapper


def _load(spec_path, sets):
    from .spec import load_spec
    return load_spec(spec_path, sets)


def _compile(spec_path, sets, out_dir):
    """(output folder, the compiled stages, the files omnigen would write there) for compile, check and diff."""
    from .pipeline import default_out_dir, plan as run_plan, render
    spec = _load(spec_path, sets)
    out = Path(out_dir) if out_dir else default_out_dir(spec)
    compiled = run_plan(spec)
    return out, compiled, render(compiled, out)


@click.group()
@click.version_option(__version__, prog_name="omnigen")
def main():
    """Compile a spec for an omni-modal HuggingFace model into a readable torchrun training script."""


@main.command()
@SPEC
@SETS
@click.option("--json", "as_json", is_flag=True, help="Print the ModelGraph as JSON.")
@user_errors
def analyze(spec_path, sets, as_json):
    """Inspect the model: blocks, roles, groups, parameters, FLOPs and activations per token."""
    from .analyze import analyze as run_analyze, format_graph
    graph = run_analyze(_load(spec_path, sets))
    click.echo(json.dumps(graph.to_dict(), indent=2) if as_json else format_graph(graph))


@main.command()
@SPEC
@SETS
@click.option("--json", "as_json", is_flag=True, help="Print the Plan as JSON (the plan.json contract).")
@click.option("--explain", is_flag=True, help="Show the alternatives considered and why each lost.")
@click.option("--svg", "svg_path", type=click.Path(dir_okay=False),
              help="Also draw the plan (mesh by node, groups x dims, predicted breakdowns) into this SVG file.")
@user_errors
def plan(spec_path, sets, as_json, explain, svg_path):
    """Choose the device mesh and per-group placement, with predicted cost."""
    from .emit import canonical_json
    from .machine import describe as describe_here, priced_here
    from .pipeline import plan as run_plan
    from .plan import format_explain
    compiled = run_plan(_load(spec_path, sets))
    if svg_path:
        from .svg import render_svg, write_svg
        write_svg(svg_path, render_svg(compiled.plan, compiled.hardware.memory_bytes))
        click.echo(f"wrote {svg_path}", err=True)  # stderr: --json output stays parseable
    if as_json:
        click.echo(canonical_json(compiled.plan.to_dict()), nl=False)
    else:
        here = describe_here(compiled.spec, priced_here(compiled.spec, compiled.graph, compiled.plan))
        click.echo(format_explain(compiled.plan, alternatives=explain, here=here))


@main.command(name="compile")
@SPEC
@SETS
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (default generated/<name>/).")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 with a diff if the files on disk are not what "
                                            "compiling (with your edits merged in) would leave.")
@click.option("--ours", multiple=True, metavar="UNIT", help="On a conflict keep your version of UNIT (a function, "
                                                            "class or constant name; 'all' for every conflict).")
@click.option("--theirs", multiple=True, metavar="UNIT", help="On a conflict take omnigen's version of UNIT ('all').")
@user_errors
def compile_cmd(spec_path, sets, out_dir, check, ours, theirs):
    """Write train.py, launch.sh, sbatch.sh, plan.json and config.json, keeping your edits to them: each top-level
    function, class or constant you changed stays yours unless omnigen changed it too (a conflict: nothing is
    written until --ours / --theirs decides)."""
    from . import emit
    out, compiled, files = _compile(spec_path, sets, out_dir)
    resolutions = {**{unit: "ours" for unit in ours}, **{unit: "theirs" for unit in theirs}}
    if check:
        sys.exit(_check(emit.merged(files, out, resolutions), out, spec_path, compiled))
    result = emit.update(files, out, resolutions)
    click.echo(f"wrote {out}/ ({', '.join(sorted(files))})")
    for unit in result.kept:
        click.echo(f"  kept your edit: {unit}")


@main.command(name="check")
@click.argument("paths", metavar="SPEC_OR_FOLDER...", nargs=-1, required=True, type=click.Path(exists=True))
@user_errors
def check_cmd(paths):
    """For CI and pre-commit: `compile --check` every spec given (a folder means each *.yaml in it), printing the plan
    changes in words and the code diff of each stale one; exit 1 if any is stale or conflicts with your edits."""
    from . import emit
    specs = [p for path in map(Path, paths) for p in (sorted(path.glob("*.yaml")) if path.is_dir() else [path])]
    stale = []
    for spec_path in specs:
        out, compiled, files = _compile(spec_path, (), None)
        if _check(emit.merged(files, out), out, str(spec_path), compiled):
            stale.append(str(spec_path))
    click.echo(f"{len(specs) - len(stale)} of {len(specs)} spec(s) up to date"
               + (f"; stale: {', '.join(stale)}" if stale else ""))
    sys.exit(1 if stale else 0)


def _check(merged, out: Path, spec_path: str, compiled) -> int:
    from . import emit
    if merged.conflicts:
        click.echo(emit.MergeConflict(out, merged.conflicts), err=True)
        return 1
    changes = emit.diff(merged.files, out)
    if changes:
        click.echo(_plan_changes(emit.read_folder(out, ["plan.json"]).get("plan.json"), compiled))
        click.echo(changes, nl=False)
        click.echo(f"omnigen: {out} is out of date with {spec_path}; run `omnigen compile {spec_path}`", err=True)
        return 1
    click.echo(f"{out}: up to date" + (f" ({len(merged.kept)} edit(s) of yours kept)" if merged.kept else ""))
    return 0


def _plan_changes(old_json: str | None, compiled) -> str:
    from .emit import canonical_json
    from .plan import price_layout
    from .plan_diff import plan_changes
    if old_json is None:
        return "plan: new (nothing to compare with)"
    old = json.loads(old_json)
    now = price_layout(compiled.spec, compiled.graph, compiled.hardware, compiled.plan.inputs, old["mesh"],
                       old["groups"], old["train"])
    lines = plan_changes(old, json.loads(canonical_json(compiled.plan.to_dict())), now)
    return "plan changes:\n" + "".join(f"  {line}\n" for line in lines) if lines else "plan: unchanged"


@main.command(name="diff")
@SPEC
@SETS
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (default generated/<name>/).")
@click.option("--against", "ref", metavar="REF", help="Compare with the files committed at this git ref instead of "
                                                      "the ones on disk.")
@user_errors
def diff_cmd(spec_path, sets, out_dir, ref):
    """What recompiling would change: the plan's changes in words (inputs, mesh and why, each group's decisions,
    the prediction), then the code diff. Writes nothing."""
    from . import emit
    out, compiled, files = _compile(spec_path, sets, out_dir)
    if ref:
        old, new = _git_files(out, ref, files), files
    else:  # the files a compile would leave, your edits merged in (omnigen's side where both changed a unit)
        old, new = emit.read_folder(out, files), {**files, **emit.merged(files, out).files}
    click.echo(_plan_changes(old.get("plan.json"), compiled))
    new.pop("plan.json")  # its changes are told in words above
    click.echo(emit.diff(new, out, old, ref or "on disk"), nl=False)


def _git_files(folder: Path, ref: str, names) -> dict[str, str]:
    """The files of `folder` as committed at `ref` (those that existed there)."""
    import subprocess

    def git(*args):
        return subprocess.run(["git", *args], cwd=top, capture_output=True, text=True)
    top = folder.resolve()
    while not top.is_dir():
        top = top.parent
    found = git("rev-parse", "--show-toplevel")
    if found.returncode != 0:
        raise OmnigenError(f"--against {ref}: {folder} is not inside a git repository")
    top = Path(found.stdout.strip())
    if git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode != 0:
        raise OmnigenError(f"--against {ref}: not a commit of {top}")
    shown = {name: git("show", f"{ref}:{(folder.resolve() / name).relative_to(top)}") for name in names}
    return {name: r.stdout for name, r in shown.items() if r.returncode == 0}


@main.command()
@SPEC
@SETS
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (default generated/<name>/).")
@click.option("--steps", type=click.IntRange(min=1), help="Override the number of steps.")
@user_errors
def run(spec_path, sets, out_dir, steps):
    """Compile, launch the script with torchrun on the spec's ranks, and stream its metrics."""
    from .runner import compile_and_run
    sys.exit(compile_and_run(_load(spec_path, sets), out_dir, steps))


@main.command()
@SPEC
@SETS
@click.option("--steps", type=click.IntRange(min=1), help="Steps to compare (default: the spec's).")
@click.option("--rtol", type=float, help="Relative tolerance on every step's loss and gradient norm (default: "
              "fp32 1e-5 at step 0, 1e-2 after it; see README).")
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep the runs here (default: a temporary folder).")
@user_errors
def verify(spec_path, sets, steps, rtol, workdir):
    """Prove the parallel script equal to a single-process reference: per-step losses and gradient norms, and per
    tensor the initial parameters, the first step's gradients and the parameter updates."""
    from .runner import verify as run_verify
    sys.exit(run_verify(_load(spec_path, sets), steps=steps, rtol=rtol, workdir=workdir))


@main.command(name="bench")
@SPEC
@SETS
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False),
              help="Folder for the compiled script, metrics, log and report (default runs/bench/<name>/).")
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True,
              help="Steps to run, warm-up included.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True,
              help="First steps left out of the medians.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="JSON report to write (default <out>/bench.json).")
@user_errors
def bench_cmd(spec_path, sets, out_dir, steps, warmup, report_path):
    """Run the compiled script on the spec's ranks and print predicted vs measured step time (forward+backward and
    optimizer), tokens/s/device and peak memory, with measured/predicted ratios."""
    from .bench import bench as run_bench, check_steps
    check_steps(steps, warmup)  # before compiling anything
    sys.exit(run_bench(_load(spec_path, sets), out_dir, steps, warmup, report_path, echo=click.echo))


@main.command(name="calibrate")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="What to measure: CPU ranks over gloo, or GPUs over NCCL.")
@click.option("--ranks", type=int, help="Local ranks for the measurement (default 2 on cpu, every GPU on cuda).")
@click.option("--base", help="Profile whose unmeasured fields are kept: a built-in name or a .yaml file "
                             "(default cpu, or h100 for cuda).")
@click.option("-o", "--out", "out_path", type=click.Path(dir_okay=False),
              help="Profile to write (default <device>_measured.yaml).")
@click.option("--quick", is_flag=True, help="Fewer shapes, sizes, repeats and runs: about a minute on 2 CPU cores.")
@click.option("--stack/--no-stack", default=True, show_default=True,
              help="Refit the host terms on runs of omnigen's generated train.py (tiny Llama and MoE models).")
@click.option("--cache", is_flag=True, help="Write to this machine's cache instead of -o: `omnigen plan`, `run` and "
                                            "`bench` then price specs naming the built-in cpu profile with it.")
@user_errors
def calibrate_cmd(device, ranks, base, out_path, quick, stack, cache):
    """Measure this machine (GEMM FLOP/s and layer efficiency per dtype, host overhead per layer, micro-batch,
    collective and parameter tensor, optimizer memory bandwidth, compute/communication overlap, collective latency
    and bandwidth, memory baseline) and write a hardware profile for `cluster.hardware`."""
    from .calibrate import CalibrationFailed, calibrate as run_calibrate
    try:
        run_calibrate(device=device, ranks=ranks, base=base, out=out_path, quick=quick, stack=stack, cache=cache,
                      echo=click.echo)
    except CalibrationFailed as e:
        click.echo(f"omnigen: calibrate: {e}", err=True)
        sys.exit(1)


@main.command(name="export")
@click.argument("checkpoint", type=click.Path())
@click.argument("out_dir", metavar="OUT", type=click.Path(file_okay=False))
@click.option("--from", "source", required=True, type=click.Path(), metavar="COMPILED",
              help="The folder `omnigen compile` wrote for the script that saved the checkpoint (generated/<name>/: "
                   "plan.json names the model class, config.json the config), or its spec.")
@SETS
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Dtype of the written weights (the checkpoint holds the fp32 masters).")
@user_errors
def export_cmd(checkpoint, out_dir, source, sets, dtype):
    """Turn a generated script's DCP checkpoint into a HuggingFace folder (safetensors + config.json) that
    transformers.<ModelClass>.from_pretrained(OUT) loads. CHECKPOINT: a step folder, a DCP folder, or a run's
    --checkpoint-dir folder (its newest complete step_NNNNNNNN is taken). OUT must not exist or be empty."""
    from .export import describe, export
    out = Path(out_dir)
    click.echo(describe(export(Path(checkpoint), out, Path(source), tuple(sets), dtype), out))


@main.group()
def data():
    """Prepare training data: tokenize text into the token shards `train.data` may name."""


@data.command(name="tokenize")
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Shard folder to write (index.json, tokens_NNNNN.bin, documents.bin).")
@click.option("--tokenizer", "tokenizer_dir", required=True, type=click.Path(),
              help="A HuggingFace tokenizer folder (AutoTokenizer.from_pretrained; no hub access).")
@click.option("--text-key", default="text", show_default=True, help="The key (jsonl) or column (parquet) holding the text.")
@click.option("--shard-tokens", type=int, default=None, help="Tokens per shard file (default 100,000,000).")
@user_errors
def tokenize_cmd(inputs, out_dir, tokenizer_dir, text_key, shard_tokens):
    """Tokenize jsonl (or, with pyarrow, parquet) text into token shards, an EOS after every document."""
    from .shards import DEFAULT_SHARD_TOKENS, tokenize
    index = tokenize([Path(p) for p in inputs], Path(out_dir), Path(tokenizer_dir), text_key,
                     shard_tokens or DEFAULT_SHARD_TOKENS)
    click.echo(f"wrote {out_dir}: {index['tokens']:,} tokens ({index['dtype']}) in {len(index['shards'])} shard(s), "
               f"{index['documents']:,} documents, max token id {index['max_token_id']} (vocab {index['vocab_size']})")


if __name__ == "__main__":
    main()
