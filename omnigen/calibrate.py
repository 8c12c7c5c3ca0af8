"""`omnigen calibrate`: measure this machine and write a hardware profile the cost model can load.

`calibrate()` is the entry point: it checks its arguments, runs one torchrun launch of every micro-benchmark on N
local ranks (calibrate_worker, calibrate_measure), fits cost.py's terms to them (calibrate_fit, calibrate_profile),
then (unless --no-stack) calibrate_stack runs omnigen's own generated train.py on the same ranks and refits the host
terms where they really occur (calibrate_stack.HOST_TERMS: per layer, micro-batch, collective hop, FSDP collective
call, all-to-all hop, local expert under EP, parameter tensor, vision and audio tower) and, on cpu, overhead_gib. The
micro-benchmark fit stays in the `measured` block. It prints a summary of every figure and writes the profile.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from .calibrate_fit import collective_terms
from .calibrate_profile import (Calibration, analyse, format_bytes, profile_yaml, read_base,
                                read_measured, with_stack)
from .calibrate_stack import describe, fit_stack
from .calibrate_worker import CalibrationFailed, run_workers
from .errors import OmnigenError
from .machine import cached_profile_path

__all__ = ["calibrate", "CalibrationFailed", "read_measured"]


def check_args(device: str, ranks: int | None, base: str | None, out: str | None,
               cache: bool = False) -> tuple[int, str, Path]:
    """Validate before measuring anything: (ranks, base, output path)."""
    if device not in ("cpu", "cuda"):
        raise OmnigenError(f"--device: {device!r} is not one of cpu, cuda")
    if device == "cuda":
        import torch
        count = torch.cuda.device_count()
        if count == 0:
            raise OmnigenError("--device cuda: no CUDA device is visible on this machine (use --device cpu)")
        ranks = count if ranks is None else ranks
        if ranks > count:
            raise OmnigenError(f"--ranks: {ranks} ranks need {ranks} GPUs; this machine has {count}")
    ranks = 2 if ranks is None else ranks
    if ranks < 1:
        raise OmnigenError(f"--ranks: must be at least 1 (2 or more to measure communication), got {ranks}")
    if cache and (out or device != "cpu"):
        raise OmnigenError("--cache: writes this machine's CPU fit where `omnigen plan`, `run` and `bench` look for "
                           "it; it takes neither -o nor --device cuda")
    path = cached_profile_path(ranks) if cache else Path(out or f"{device}_measured.yaml")
    if path.suffix not in (".yaml", ".yml"):
        raise OmnigenError(f"-o: {path} must end in .yaml or .yml (specs load `hardware: <file>.yaml`)")
    if path.is_dir():
        raise OmnigenError(f"-o: {path} is a folder")
    return ranks, base or ("h100" if device == "cuda" else "cpu"), path


def format_summary(c: Calibration) -> str:
    raw, out = c.raw, []
    out.append(f"\ncompute (per rank, slowest of {raw['world_size']}; {raw['threads']} thread(s) each)")
    out.append(f"  {'what':<34} {'dtype':>5} {'time':>10} {'FLOP/s':>10}")
    for r in raw["gemm"]:
        out.append(f"  {'GEMM ' + 'x'.join(map(str, r['shape'])):<34} {r['dtype']:>5} {_si(r['seconds'], 's'):>10} "
                   f"{_si(r['flops'] / r['seconds']):>10}")
    for r in raw["sdpa"]:
        what = f"SDPA fwd+bwd {'causal ' if r.get('causal') else ''}{'x'.join(map(str, r['shape']))}"
        out.append(f"  {what:<34} {r['dtype']:>5} "
                   f"{_si(r['seconds'], 's'):>10} {_si(r['flops'] / r['seconds']):>10}")
    for r in raw["layer"]:
        L = r["config"]
        what = f"Llama fwd+bwd h{L['hidden_size']} x{L['layers']} s{L['seq_len']}"
        out.append(f"  {what:<34} {r['dtype']:>5} {_si(r['seconds'], 's'):>10} {_si(r['flops'] / r['seconds']):>10}"
                   f"   efficiency {c.measured['matmul_efficiency'][r['dtype']]:.3f} paired less host, "
                   f"{c.measured['matmul_efficiency_with_host'][r['dtype']]:.3f} with host, "
                   f"{c.measured['matmul_efficiency_unpaired'][r['dtype']]:.3f} vs peak ({_si(r['flops'])}FLOP)")
    cf, primary = c.compute, c.measured["host"]["dtype"]
    out.append(f"\nhost overhead: time = compute + 3 x layers x {cf.layer_overhead_s * 1e6:.1f} us "
               f"+ {cf.step_overhead_s * 1e3:.2f} ms  ({cf.iterations} rounds)")
    for r, fitted in zip(raw["host"], c.measured["host"]["fitted_seconds"]):
        what = f"tiny Llama h{r['config']['hidden_size']} x{r['layers']} s{r['config']['seq_len']}"
        out.append(f"  {what:<34} {primary:>5} {_si(r['seconds'], 's'):>10}  fitted {_si(fitted, 's'):>9} "
                   f"{fitted / r['seconds'] - 1:>+5.0%}  FLOPs {_si(r['flops'])}")
    opt = raw["optimizer"][0]
    out.append(f"\noptimizer: clip_grad_norm_ + AdamW(fused) over {opt['params'] / 1e6:.3g} M fp32 params in "
               f"{opt['tensors']} tensors: {_si(opt['seconds'], 's')} -> effective "
               f"{c.profile['memory_bandwidth_gbps']} GB/s")
    out.append(f"process memory: peak RSS at start {', '.join(f'{x:.3f}' for x in raw['rss_gib_by_rank'])} GiB by rank")
    if "overlap" in c.measured:
        o = c.measured["overlap"]
        out.append(f"overlap: GEMM block {_si(o['compute_s'], 's')}, all-gather {format_bytes(o['bytes'])} "
                   f"{_si(o['comm_s'], 's')}, both {_si(o['both_s'], 's')} -> overlap {c.profile['overlap']}")
    if c.fit:
        n = raw["world_size"]
        out.append(f"\ncollectives ({raw['backend']}, {n} ranks): measured vs fitted "
                   f"time = a*{c.fit.latency_us:.1f} us + bytes_on_link / {c.fit.bandwidth_gbps:.3g} GB/s")
        out.append(f"  {'op':<15} {'bytes':>9} {'measured':>10} {'fitted':>10} {'error':>7} {'link GB/s':>10}")
        for r in raw["comm"]:
            pred = c.fit.predict(r["op"], r["bytes"], n)
            link = collective_terms(r["op"], r["bytes"], n)[1] / r["seconds"] / 1e9
            out.append(f"  {r['op']:<15} {format_bytes(r['bytes']):>9} {_si(r['seconds'], 's'):>10} {_si(pred, 's'):>10} "
                       f"{pred / r['seconds'] - 1:>+7.0%} {link:>10.3f}")
        out.append("  per-op fits: " + "; ".join(f"{op} {f.latency_us:.1f} us, {f.bandwidth_gbps:.3g} GB/s "
                                                 f"(x{f.typical_error:.2f})" for op, f in c.fits_by_op.items()))
        out.append(f"  pooled fit: latency {c.fit.latency_us:.1f} us, bandwidth {c.fit.bandwidth_gbps:.3g} GB/s, "
                   f"samples typically x{c.fit.typical_error:.2f} off it, worst x{c.fit.worst_error:.2f}")
    if c.stack:
        out.append("\ngenerated train.py runs (medians) vs the refitted profile: "
                   + ", ".join(f"{t} {v:g}" for t, v in c.stack.terms.items()))
        out.append(f"  {'run':<36} {'fwd+bwd':>9} {'fitted':>9} {'optimizer':>10} {'fitted':>9} {'peak MiB':>9} "
                   f"{'fitted':>8}")
        for run, row in zip(c.stack.runs, c.stack.to_measured()):
            what = describe(run.shape, c.measured["ranks"]).rsplit(", ", 1)[0]
            fb, op, mem = row["forward_backward_s"], row["optimizer_s"], row["peak_memory_mib"]
            out.append(f"  {what:<36} {_si(fb['measured'], 's'):>9} {_si(fb['fitted'], 's'):>9} "
                       f"{_si(op['measured'], 's'):>10} {_si(op['fitted'], 's'):>9} {mem['measured']:>9} "
                       f"{mem['fitted']:>8}")
    p = c.profile
    out.append(f"\nprofile: peak fp32 {_si(p['peak_flops']['fp32'])}FLOP/s, bf16 {_si(p['peak_flops']['bf16'])}FLOP/s, "
               f"efficiency {p['matmul_efficiency']}, layer overhead {p['layer_overhead_us']} us, step overhead "
               f"{p['step_overhead_ms']} ms, optimizer {p['memory_bandwidth_gbps']} GB/s, overlap {p['overlap']}, "
               f"intra_node {p['intra_node']['bandwidth_gbps']} GB/s {p['intra_node']['latency_us']} us, "
               f"memory {p['memory_gib']} GiB, overhead {p['overhead_gib']} GiB")
    return "\n".join(out)


def _si(x: float, unit: str = "") -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3), ("", 1), ("m", 1e-3), ("u", 1e-6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def calibrate(device: str = "cpu", ranks: int | None = None, base: str | None = None, out: str | None = None,
              quick: bool = False, stack: bool = True, cache: bool = False,
              echo: Callable[[str], None] = print) -> Calibration:
    ranks, base_name, path = check_args(device, ranks, base, out, cache)
    base_data = read_base(base_name)
    started = time.perf_counter()
    raw = run_workers(device, ranks, quick, echo)
    c = analyse(raw, device, base_name, base_data, name=path.stem, quick=quick)
    if stack:
        c = with_stack(c, fit_stack(c.profile, device, ranks, quick, echo), device)
    echo(format_summary(c))
    command = (f"omnigen calibrate --device {device} --ranks {ranks} --base {base_name}" + (" --quick" if quick else "")
               + ("" if stack else " --no-stack"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(profile_yaml(c, command))
    use = ("`omnigen plan`, `run` and `bench` price specs naming the built-in cpu profile on "
           f"{ranks} ranks with it" if cache else f"use it with `cluster: {{hardware: {path}}}`")
    echo(f"\nwrote {path} ({time.perf_counter() - started:.0f} s); {use}")
    return c
