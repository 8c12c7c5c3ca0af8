"""Stage 4: execute generated scripts with torchrun, and verify them against a single-process reference."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from . import emit
from .errors import OmnigenError
from .pipeline import default_out_dir, plan as make_compiled, render
from .plan import Plan
from .spec import Spec, spec_from_dict

LOSS_RTOL = {"fp32": 1e-5, "bf16": 2e-2}   # per-step loss and gradient norm, relative
# Parameters, absolute, as a fraction of the learning rate (AdamW moves a weight by at most about lr per step).
# Summation order differs between layouts; Adam divides by sqrt(v), so on weights whose gradient is nearly zero
# (rare token rows) a 1e-7 relative gradient difference becomes a visible fraction of a step. A real bug (wrong
# data, a missing reduction, a wrong scale) moves weights by whole steps, and shows in losses and grad norms.
PARAM_ATOL_PER_LR = {"fp32": 0.05, "bf16": 0.5}


def compile_to(spec: Spec, out_dir: Path) -> Plan:
    """Write the generated files; returns the Plan they render."""
    compiled = make_compiled(spec)
    emit.update(render(compiled, out_dir), out_dir)  # a hand-edited script keeps its edits
    return compiled.plan


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_commands(spec: Spec, script: Path, args: list[str]) -> list[list[str]]:
    """One torchrun agent per node. More than one node on this machine is emulated with c10d on localhost."""
    c = spec.cluster
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(c.procs_per_node)]
    if c.nodes == 1:
        return [base + ["--standalone", "--nnodes", "1", str(script), *args]]
    endpoint = f"127.0.0.1:{_free_port()}"
    multi = ["--nnodes", str(c.nodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", spec.name]
    return [base + multi + [str(script), *args] for _ in range(c.nodes)]


def launch(spec: Spec, script: Path, args: list[str], log: Path | None = None) -> int:
    """Run the script on the spec's ranks; stream rank 0's output (and keep it in `log`)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    cmds = torchrun_commands(spec, script, args)
    procs = [subprocess.Popen(cmd, cwd=script.parent, env=env, stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, text=True) for i, cmd in enumerate(cmds)]
    sink = open(log, "w") if log else None
    for line in procs[0].stdout:
        print(line, end="", flush=True)
        if sink:
            sink.write(line)
    codes = [p.wait() for p in procs]
    if sink:
        sink.close()
    return max(codes, key=abs)


def compile_and_run(spec: Spec, out_dir: str | None, steps: int | None) -> int:
    from .plan import format_explain
    out = Path(out_dir) if out_dir else default_out_dir(spec)
    print(format_explain(compile_to(spec, out), alternatives=False), flush=True)
    return launch(spec, out / "train.py", ["--steps", str(steps)] if steps else [])


# --- verify ------------------------------------------------------------------------------------------------

def reference_spec(spec: Spec) -> Spec:
    """The same model, data, seed and global batch on one plain process: the ground truth."""
    raw = spec.to_dict()
    hw = spec.cluster.hardware
    raw["name"] = f"{spec.name}_reference"
    raw["cluster"] = {"nodes": 1, "procs_per_node": 1, "device": spec.cluster.device,
                      # the reference runs whatever it takes: memory is never the reason it cannot
                      "hardware": {**(hw if isinstance(hw, dict) else {"profile": hw}), "memory_gib": 1e9}}
    raw["parallel"] = {"dp_replicate": 1, "dp_shard": 1, "sp": 1, "ep": 1, "activation_checkpointing": "none"}
    return spec_from_dict(raw, source=spec.source, base_dir=spec.base_dir)


@dataclass(frozen=True)
class Deviation:
    name: str
    max_abs: float
    ref_norm: float


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def compare_params(ref: dict[str, torch.Tensor], par: dict[str, torch.Tensor]) -> list[Deviation]:
    if set(ref) != set(par):
        raise OmnigenError(f"parameter names differ: only in reference {sorted(set(ref) - set(par))[:5]}, "
                           f"only in parallel run {sorted(set(par) - set(ref))[:5]}")
    devs = [Deviation(k, (par[k].double() - ref[k].double()).abs().max().item(), ref[k].double().norm().item())
            for k in ref if ref[k].numel()]
    return sorted(devs, key=lambda d: -d.max_abs)


def verify(spec: Spec, steps: int | None = None, rtol: float | None = None, workdir: str | None = None) -> int:
    steps = steps or spec.train.steps
    rtol = rtol if rtol is not None else LOSS_RTOL[spec.train.precision]
    atol = PARAM_ATOL_PER_LR[spec.train.precision] * spec.train.lr
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"omnigen-verify-{spec.name}-"))
    results = {}
    for label, s in (("reference", reference_spec(spec)), ("parallel", spec)):
        out = root / label
        plan = compile_to(s, out)
        args = ["--steps", str(steps), "--metrics", str(out / "metrics.jsonl"), "--dump-params", str(out / "params.pt")]
        if plan.has_explicit_collectives:
            args.append("--count-comm-bytes")  # verify also records what the explicit collectives sent
        print(f"== {label}: {out}/train.py", flush=True)
        if label == "reference":
            code = subprocess.run([sys.executable, str(out / "train.py"), *args], cwd=out).returncode
        else:
            code = launch(s, out / "train.py", args)
        if code != 0 or not (out / "params.pt").is_file():
            print(f"omnigen verify: the {label} run failed (exit {code}) or wrote no {out / 'params.pt'}", file=sys.stderr)
            return 1
        results[label] = (read_metrics(out / "metrics.jsonl"), torch.load(out / "params.pt", weights_only=True))
    return report(results, steps, rtol, atol)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def report(results, steps: int, rtol: float, atol: float) -> int:
    (ref_m, ref_p), (par_m, par_p) = results["reference"], results["parallel"]
    print(f"\n{'step':>4} {'reference loss':>18} {'parallel loss':>18} {'rel. diff':>10} {'grad norm rel. diff':>20}")
    worst = 0.0
    for r, p in zip(ref_m, par_m):
        loss_rel, norm_rel = relative(p["loss"], r["loss"]), relative(p["grad_norm"], r["grad_norm"])
        worst = max(worst, loss_rel, norm_rel)
        print(f"{r['step']:>4} {r['loss']:>18.10f} {p['loss']:>18.10f} {loss_rel:>10.2e} {norm_rel:>20.2e}")
    devs = compare_params(ref_p, par_p)
    print(f"\nlargest parameter deviations (max |parallel - reference|, tolerance {atol:g}):")
    for d in devs[:5]:
        print(f"  {d.name:<60} {d.max_abs:.3e}   (|ref| = {d.ref_norm:.3g})")
    complete = len(ref_m) == len(par_m) == steps
    ok = complete and worst <= rtol and (not devs or devs[0].max_abs <= atol)
    print(f"\nlosses and grad norms: max relative deviation {worst:.2e} (tolerance {rtol:g}); "
          f"parameters: max abs deviation {devs[0].max_abs if devs else 0:.2e} over {len(devs)} tensors"
          + ("" if complete else f"; expected {steps} steps, got {len(ref_m)} reference / {len(par_m)} parallel"))
    print("VERIFIED: the parallel script matches the single-process reference" if ok else "MISMATCH")
    return 0 if ok else 1
