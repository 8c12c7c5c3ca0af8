"""`omnigen` command line: analyze, plan, compile, run, verify, bench, calibrate."""

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
        click.echo(format_explain(compiled.plan, alternatives=explain))


@main.command(name="compile")
@SPEC
@SETS
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (default generated/<name>/).")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 with a diff if the files on disk differ.")
@user_errors
def compile_cmd(spec_path, sets, out_dir, check):
    """Write train.py, launch.sh, plan.json and config.json."""
    from . import emit
    from .pipeline import default_out_dir, plan as run_plan, render
    spec = _load(spec_path, sets)
    out = Path(out_dir) if out_dir else default_out_dir(spec)
    files = render(run_plan(spec), out)
    if check:
        changes = emit.diff(files, out)
        if changes:
            click.echo(changes, nl=False)
            click.echo(f"omnigen: {out} is out of date with {spec_path}; run `omnigen compile {spec_path}`", err=True)
            sys.exit(1)
        click.echo(f"{out}: up to date")
        return
    emit.write(files, out)
    click.echo(f"wrote {out}/ ({', '.join(sorted(files))})")


@main.command()
@SPEC
@SETS
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), help="Output folder (default generated/<name>/).")
@click.option("--steps", type=int, help="Override the number of steps.")
@user_errors
def run(spec_path, sets, out_dir, steps):
    """Compile, launch the script with torchrun on the spec's ranks, and stream its metrics."""
    from .runner import compile_and_run
    sys.exit(compile_and_run(_load(spec_path, sets), out_dir, steps))


@main.command()
@SPEC
@SETS
@click.option("--steps", type=int, help="Steps to compare (default: the spec's).")
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
@user_errors
def calibrate_cmd(device, ranks, base, out_path, quick, stack):
    """Measure this machine (GEMM FLOP/s and layer efficiency per dtype, host overhead per layer, micro-batch,
    collective and parameter tensor, optimizer memory bandwidth, compute/communication overlap, collective latency
    and bandwidth, memory baseline) and write a hardware profile for `cluster.hardware`."""
    from .calibrate import CalibrationFailed, calibrate as run_calibrate
    try:
        run_calibrate(device=device, ranks=ranks, base=base, out=out_path, quick=quick, stack=stack, echo=click.echo)
    except CalibrationFailed as e:
        click.echo(f"omnigen: calibrate: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
