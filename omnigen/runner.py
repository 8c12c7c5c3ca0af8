"""Stage 4: execute generated scripts with torchrun, and verify them against a single-process reference."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import emit
from .errors import OmnigenError
from .pipeline import Compiled, default_out_dir, plan as make_compiled, render
from .plan import Plan, num_experts
from .spec import Spec, spec_from_dict


def compile_into(spec: Spec, out_dir: Path) -> Compiled:
    """Write the generated files; returns the compiled stages they render."""
    compiled = make_compiled(spec)
    emit.update(render(compiled, out_dir), out_dir)  # a hand-edited script keeps its edits
    return compiled


def compile_to(spec: Spec, out_dir: Path) -> Plan:
    """Write the generated files; returns the Plan they render."""
    return compile_into(spec, out_dir).plan


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


def launch(spec: Spec, script: Path, args: list[str], log: Path | None = None, progress: str | None = None,
           steps: int = 0) -> int:
    """Run the script on the spec's ranks; stream rank 0's output (and keep it in `log`). With `progress`, a bar
    over the steps stands for the per-step lines (they stay in the log); every other line is still printed."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    cmds = torchrun_commands(spec, script, args)
    procs = [subprocess.Popen(cmd, cwd=script.parent, env=env, stdout=subprocess.PIPE if i == 0 else subprocess.DEVNULL,
                              stderr=subprocess.STDOUT, text=True) for i, cmd in enumerate(cmds)]
    stream(procs[0].stdout, log, progress, steps)
    return max((p.wait() for p in procs), key=abs)


STEP_LINE = re.compile(r"^step \d+/\d+  loss ")  # the script's line for people, beside each JSON record


def stream(lines, log: Path | None, progress: str | None, steps: int) -> None:
    """Echo a run's output (and keep it in `log`); under `progress`, step records advance a bar instead."""
    from tqdm import tqdm

    bar = tqdm(total=steps, desc=progress, unit="step", file=sys.stderr, dynamic_ncols=True) if progress else None
    with open(log, "w") if log else contextlib.nullcontext() as sink:
        for line in lines:
            if sink:
                sink.write(line)
            if bar is None:
                print(line, end="", flush=True)
            elif line.startswith("{"):
                bar.update(1)
            elif not STEP_LINE.match(line):
                bar.write(line.rstrip("\n"), file=sys.stdout)
    if bar is not None:
        bar.close()


def compile_and_run(spec: Spec, out_dir: str | None, steps: int | None) -> int:
    from .machine import describe, priced_here
    from .plan import format_explain
    out = Path(out_dir) if out_dir else default_out_dir(spec)
    compiled = compile_into(spec, out)
    here = describe(spec, priced_here(spec, compiled.graph, compiled.plan))
    print(format_explain(compiled.plan, alternatives=False, here=here), flush=True)
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
    raw["train"] = {**raw["train"], "loss_chunk_tokens": 0}  # the plain whole-sequence loss: no chunks to trust
    return spec_from_dict(raw, source=spec.source, base_dir=spec.base_dir)


@dataclass(frozen=True)
class Tolerances:
    """What verify allows, all relative. Per tensor, a deviation is ||parallel - reference|| / ||reference||, the
    denominator floored at FLOOR x the norm of all the reference's tensors together (see tensor_deviations)."""
    first_step: float   # step 0's loss and global gradient norm: both runs start from the same parameters
    later_steps: float  # later steps' losses and gradient norms: trajectories that rounding has begun to part
    initial: float      # per tensor, parameters before the first step: the same seed and weights, so equal
    grad: float         # per tensor, the first step's gradients, before clipping
    update: float       # per tensor, final - initial parameters after all steps


# How the figures were chosen (README, "omnigen verify"; tests/test_verify_checks.py measures them): correct scripts
# at lr 1e-3 and 1e-2 over 10 steps (llama dp_shard=2 at hidden 64 and 128, sp=2, Qwen3-MoE ep=2; Qwen2-VL
# dp_shard=2 x sp=2 with a rank that sees no image at lr 1e-2) and planted bugs.
# Step 0 is where precision lives: both runs hold the same parameters, only the summation order differs, and in fp32
# the step-0 loss, gradient norm and every tensor's gradient agree to 3e-7 or better, while a layer's gradient 1%
# off, a missing reduction, a wrong row or a wrong mask is 1e-2 to 0.4 off in some tensor. After it the runs follow
# two trajectories that rounding parts a little more each step: AdamW turns a 1e-7 difference in a near-zero gradient
# into a visible part of a +-lr step on single weights (the absolute check this replaced, 0.05 x lr, read 0.77 x lr
# on a correct hidden-128 Llama at lr 1e-2), and at lr 1e-2 a dense model's later losses and gradient norms part by
# up to 4.0e-4 (Qwen2-VL's gradient norm; Llama's 6.4e-5) and its per-tensor updates by up to 7.3e-4 in 10 steps:
# the later-step tolerances give 25x and 14x that, and still catch what goes wrong in the optimizer or after step 0
# (the planted wrong rows and missing reduction moved updates by 0.26-0.84). AdamW is blind to a gradient's scale (a layer's gradient x 1.01 moved its updates by 8e-5): only the
# gradient check sees it.
# bf16: the reference autocasts while FSDP casts whole parameters, so roundings differ by bf16's epsilon (3.9e-3) at
# every op. Measured (llama dp_shard=2, lr 1e-2, 10 steps): step 0 loss 5e-6 and grad norm 1.2e-4, gradients 1.1e-2
# per tensor, later gradient norms up to 0.16 and updates up to 0.30. bf16 verify catches gross bugs only (a missing
# reduction or wrong rows, 0.2-1 off in step-0 gradients); prove a layout in fp32.
TOLERANCES = {"fp32": Tolerances(first_step=1e-5, later_steps=1e-2, initial=1e-6, grad=1e-4, update=1e-2),
              "bf16": Tolerances(first_step=2e-2, later_steps=0.5, initial=1e-6, grad=0.1, update=1.0)}
# A router's top-k is discontinuous: once the trajectories part, a token whose two best experts nearly tie goes to
# another expert in one run, and the parting grows ~3x a step. Qwen3-MoE at lr 1e-2 parted by 8.5e-3 in loss and
# gradient norm and 6.8e-2 in a norm weight's update by step 10 (2.9e-7 and 1.3e-5 at lr 1e-3); step 0 stays exact.
# (bf16's tolerances already allow as much.)
ROUTED = {"fp32": {"later_steps": 0.1, "update": 0.5}, "bf16": {}}
# A tensor whose reference norm is tiny next to the model's (a gradient that nearly vanishes) is judged against this
# fraction of the model's norm instead: rounding noise from summing the large terms would otherwise read as a large
# relative error on it. The smallest gradients of the tiny Llama are 2e-3 of the whole and agree to 5e-8.
FLOOR = 1e-4


def tolerances(precision: str, routed_experts: bool) -> Tolerances:
    tol = TOLERANCES[precision]
    return replace(tol, **ROUTED[precision]) if routed_experts else tol


DUMPS = {"initial": ("--dump-initial-params", "initial_params.pt"), "grads": ("--dump-grads", "grads.pt"),
         "final": ("--dump-params", "params.pt")}  # Run field: (the script's flag, the file verify has it write)


@dataclass(frozen=True)
class Run:
    """What one run of a script leaves for verify: rank 0's per-step metrics and three full state dumps."""
    metrics: list[dict]
    initial: dict[str, torch.Tensor]  # parameters (the full state dict) before the first step
    grads: dict[str, torch.Tensor]    # every trainable parameter's full gradient after the first step's backward
    final: dict[str, torch.Tensor]    # parameters after the last step


@dataclass(frozen=True)
class Deviation:
    name: str
    rel: float       # ||parallel - reference|| / max(||reference||, floor)
    ref_norm: float


@dataclass(frozen=True)
class Check:
    what: str
    worst: float
    tolerance: float
    worst_tensors: tuple[Deviation, ...] = ()
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.worst <= self.tolerance


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verify_args(out: Path, steps: int) -> list[str]:
    """The script flags that make a run leave what load_run reads."""
    args = ["--steps", str(steps), "--metrics", str(out / "metrics.jsonl")]
    for flag, file in DUMPS.values():
        args += [flag, str(out / file)]
    return args


def load_run(out: Path) -> Run:
    missing = [file for _, file in DUMPS.values() if not (out / file).is_file()]
    if missing:
        raise OmnigenError(f"{out}: the run wrote no {', '.join(missing)}")
    dumps = {key: torch.load(out / file, weights_only=True) for key, (_, file) in DUMPS.items()}
    return Run(read_metrics(out / "metrics.jsonl"), **dumps)


def run_script(spec: Spec, out: Path, steps: int, single_process: bool = False,
               count_comm_bytes: bool = False) -> Run | None:
    """Launch the train.py compiled (and perhaps edited) in `out` with verify's dumps: torchrun on the spec's ranks,
    or one plain process. None when it fails."""
    for file in ["metrics.jsonl", *(file for _, file in DUMPS.values())]:
        (out / file).unlink(missing_ok=True)  # nothing from an earlier run can stand in for this one's
    args = verify_args(out, steps) + (["--count-comm-bytes"] if count_comm_bytes else [])
    label = f"{spec.name}: {'one process' if single_process else f'{spec.cluster.world_size} ranks'}"
    if single_process:
        proc = subprocess.Popen([sys.executable, str(out / "train.py"), *args], cwd=out, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        stream(proc.stdout, out / "run.log", label, steps)
        code = proc.wait()
    else:
        code = launch(spec, out / "train.py", args, out / "run.log", label, steps)
    try:
        if code != 0:
            raise OmnigenError(f"{out / 'train.py'} exited {code}")
        return load_run(out)
    except OmnigenError as e:
        print(f"omnigen verify: {e}", file=sys.stderr)
        return None


def verify(spec: Spec, steps: int | None = None, rtol: float | None = None, workdir: str | None = None) -> int:
    """Run the parallel script and the single-process reference with the same seed, data and global batch, and
    compare them (see compare); exit status 0 only when every check passes."""
    steps = steps or spec.train.steps
    workdir = workdir or tempfile.mkdtemp(prefix=f"omnigen-verify-{spec.name}-")
    pair = run_pair(spec, steps, workdir)
    if pair is None:
        return 1
    reference, parallel, tol = pair
    if rtol is not None:
        tol = replace(tol, first_step=rtol, later_steps=rtol)
    code = report(reference, parallel, steps, tol)
    if code and random_in_training(Path(workdir) / "reference"):
        print(RANDOM_IN_TRAINING)
    return code


RANDOM_IN_TRAINING = ("NOT COMPARABLE: the model draws random numbers in its training forward beyond the dropout "
                      "verify turns off (e.g. a router that samples its experts): one process and several ranks draw "
                      "different numbers for the same samples, so this mismatch proves nothing either way")


PROBE_SAMPLES = 4  # enough tokens that a sampling router meets near-ties between experts


def random_in_training(out: Path) -> bool:
    """Whether the script in `out` builds a model whose training step is random with dropout off: forward and
    backward of its first PROBE_SAMPLES samples under two seeds disagree (a sampling router may be random in its
    forward, or only in its gradient estimate). False when the probe cannot run it (a talker's targets come from
    the step, not the sample)."""
    namespace = {"__name__": "omnigen_verify_probe", "__file__": str(out / "train.py")}
    try:
        exec(compile((out / "train.py").read_text(), str(out / "train.py"), "exec"), namespace)  # noqa: S102
        model = namespace["build_model"]().train()
        data = namespace["open_data"]()
        batch = namespace["collate"]([data.sample(i) for i in range(PROBE_SAMPLES)])
        batch.pop("shift_labels")
        results = []
        for seed in (0, 1):
            model.zero_grad()
            torch.manual_seed(seed)
            logits = model(**batch).logits
            logits.float().square().mean().backward()
            results.append(torch.cat([logits.detach().flatten(),
                                      *(p.grad.flatten() for p in model.parameters() if p.grad is not None)]))
    except Exception:  # noqa: BLE001 - a probe that cannot run says nothing
        return False
    return not torch.equal(*results)


def run_pair(spec: Spec, steps: int, workdir: str | None = None) -> tuple[Run, Run, Tolerances] | None:
    """The reference and the parallel run of `spec` (None when either fails), and the tolerances they are held to."""
    root = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix=f"omnigen-verify-{spec.name}-"))
    runs = {}
    for label, s in (("reference", reference_spec(spec)), ("parallel", spec)):
        out = root / label
        compiled = make_compiled(s)
        emit.write(render(compiled, out), out)
        zeroed = dropout_off(out / "config.json")
        print(f"== {label}: {out}/train.py" + (f" (dropout off: {', '.join(zeroed)})" if zeroed else ""), flush=True)
        # verify also records what the explicit collectives sent
        runs[label] = run_script(s, out, steps, single_process=label == "reference",
                                 count_comm_bytes=compiled.plan.has_explicit_collectives)
        if runs[label] is None:
            print(f"omnigen verify: the {label} run failed", file=sys.stderr)
            return None
    tol = tolerances(spec.train.precision, routed_experts=num_experts(compiled.graph) > 0)
    return runs["reference"], runs["parallel"], tol


def dropout_off(config_file: Path) -> list[str]:
    """Zero every dropout and drop-path rate in a verify run's config.json, nested configs included. One process
    and N ranks draw different masks for the same samples, so only the computation without them can be compared.
    Returns the keys it zeroed."""
    config = json.loads(config_file.read_text())
    zeroed = []

    def walk(node, path):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, f"{path}{key}.")
            elif ("dropout" in key or "drop_path" in key) and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and value:
                node[key] = 0.0
                zeroed.append(f"{path}{key} {value:g}")

    walk(config, "")
    if zeroed:
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    return zeroed


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def tensor_deviations(ref: dict[str, torch.Tensor], par: dict[str, torch.Tensor]) -> list[Deviation]:
    """Per tensor, ||par - ref|| / max(||ref||, FLOOR x the norm of all of ref), worst first. A name or a shape
    that differs is an infinite deviation."""
    names = set(ref) | set(par)
    total = math.sqrt(sum(t.double().norm().item() ** 2 for t in ref.values()))
    floor = max(FLOOR * total, 1e-30)
    devs = []
    for name in names:
        r, p = ref.get(name), par.get(name)
        if r is None or p is None or r.shape != p.shape:
            devs.append(Deviation(name, math.inf, r.double().norm().item() if r is not None else math.nan))
            continue
        r, p = r.double(), p.double()
        rel = (p - r).norm().item() / max(r.norm().item(), floor)
        devs.append(Deviation(name, math.inf if math.isnan(rel) else rel, r.norm().item()))
    return sorted(devs, key=lambda d: (-d.rel, d.name))


def updates(run: Run) -> dict[str, torch.Tensor]:
    return {k: run.final[k].double() - run.initial[k].double() for k in run.final if k in run.initial}


def trained_updates(ref: Run, par: Run) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Both runs' updates of the tensors whose step-0 gradient carries signal: at least FLOOR x the model's gradient
    norm in the reference. A tensor whose gradient vanishes in exact arithmetic (a key projection's bias: softmax
    ignores a shift of every score) trains on rounding noise, which AdamW normalises into updates that differ between
    any two runs (LLaVA's and Gemma3's vision k_proj.bias: moved 2.7e-6 in 3 steps, the runs parted by 1.4x the
    update tolerance). Those tensors are judged by the step-0 gradient check alone, against the same floor."""
    total = math.sqrt(sum(g.double().norm().item() ** 2 for g in ref.grads.values()))
    noise = {k for k, g in ref.grads.items() if g.double().norm().item() < FLOOR * total}
    return ({k: v for k, v in updates(ref).items() if k not in noise},
            {k: v for k, v in updates(par).items() if k not in noise})


def compare(ref: Run, par: Run, steps: int, tol: Tolerances) -> list[Check]:
    """verify's checks: step 0's loss and gradient norm, and later steps' apart (see TOLERANCES); per tensor, the
    initial parameters (a layout bug in building or loading the model), the first step's gradients (a wrong scale,
    a missing reduction, a wrong row, which AdamW's scale invariance hides from the updates), and the updates
    final - initial (what every optimizer step did: judged per tensor, since AdamW turns rounding noise on
    near-zero gradients into +-lr steps of single weights)."""
    def worst(first, last):
        # each decoder's own loss too (loss_<modality>: a model composed from parts with several decoders)
        rels = [relative(p[key], r[key]) for r, p in zip(ref.metrics[first:last], par.metrics[first:last])
                for key in ("loss", "grad_norm", *(k for k in r if k.startswith("loss_") and k in p))]
        return max((math.inf if math.isnan(x) else x for x in rels), default=0.0)

    checks = [Check("step-0 loss, grad norm", worst(0, 1), tol.first_step),
              Check("later losses, grad norms", worst(1, None), tol.later_steps)]
    if not len(ref.metrics) == len(par.metrics) == steps:
        checks.append(Check("steps run", math.inf, 0, note=f"expected {steps}, got {len(ref.metrics)} reference / "
                                                         f"{len(par.metrics)} parallel"))
    for what, r, p, limit in (("initial parameters", ref.initial, par.initial, tol.initial),
                              ("step-0 gradients", ref.grads, par.grads, tol.grad),
                              ("parameter updates", *trained_updates(ref, par), tol.update)):
        devs = tensor_deviations(r, p)
        shown = tuple(d for d in devs[:3] if d.rel > 0)
        checks.append(Check(what, devs[0].rel if devs else 0.0, limit, shown, f"{len(devs)} tensors"))
    return checks


def report(ref: Run, par: Run, steps: int, tol: Tolerances) -> int:
    """Print the comparison (per-step table, one line per check with its worst tensors); 0 only if all pass."""
    print(f"\n{'step':>4} {'reference loss':>18} {'parallel loss':>18} {'rel. diff':>10} {'grad norm rel. diff':>20}")
    for r, p in zip(ref.metrics, par.metrics):
        print(f"{r['step']:>4} {r['loss']:>18.10f} {p['loss']:>18.10f} {relative(p['loss'], r['loss']):>10.2e} "
              f"{relative(p['grad_norm'], r['grad_norm']):>20.2e}")
    checks = compare(ref, par, steps, tol)
    print(f"\n{'check':<26} {'worst rel.':>10} {'tolerance':>10}  result")
    for c in checks:
        print(f"{c.what:<26} {c.worst:>10.2e} {c.tolerance:>10.0e}  {'ok' if c.ok else 'FAIL':<6}  {c.note}")
        for d in c.worst_tensors:
            print(f"      {d.name:<58} {d.rel:.2e}  (|reference| {d.ref_norm:.3g})")
    ok = all(c.ok for c in checks)
    print("VERIFIED: the parallel script matches the single-process reference" if ok else
          "MISMATCH: " + ", ".join(c.what for c in checks if not c.ok))
    return 0 if ok else 1
