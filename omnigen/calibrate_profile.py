"""From the worker's records to a hardware profile file: `analyse` fits them into the profile's fields (pure: no
torch, no I/O), `with_stack` takes calibrate_stack's refit of the host terms, `profile_yaml` writes the file.

Measured fields replace the base profile's; the rest (inter_node, memory_gib on cpu, overhead_gib on cuda, overlap
on one rank) are kept and `source` says which is which. The raw measurements go under a commented `# measured:`
block at the end of the file: load_profile builds the HardwareProfile dataclass from every top-level key and rejects
unknown ones, so a live `measured:` key would make the file unloadable. `read_measured(path)` parses the block back.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .calibrate_fit import (ComputeFit, Fit, effective_bandwidth_gbps, fit_alpha_beta, fit_attention, fit_compute,
                            llama_host_seconds, overlap_share)
from .calibrate_measure import DTYPES, cpu_cores
from .calibrate_stack import MICRO_BATCHES, SEQ_LEN, STACK_ONLY_TERMS, StackFit, describe
from .errors import OmnigenError
from .fitting import significant
from .hardware import COLLECTIVES

MEASURED_MARK = "# measured:"


def read_base(base: str) -> dict[str, Any]:
    """A built-in profile name or a profile .yaml file; it must be complete (the fields calibrate does not measure)."""
    from .hardware import HardwareProfile, Link, builtin_profiles
    if base.endswith((".yaml", ".yml")):
        path = Path(base)
        if not path.is_file():
            raise OmnigenError(f"--base: profile file {base} not found")
        data = yaml.safe_load(path.read_text())
    elif base in builtin_profiles():
        data = yaml.safe_load(resources.files("omnigen.profiles").joinpath(f"{base}.yaml").read_text())
    else:
        raise OmnigenError(f"--base: unknown profile {base!r}; built-in profiles: {', '.join(builtin_profiles())}, "
                           "or a path to a profile .yaml file")
    try:
        HardwareProfile(**{**data, "intra_node": Link(**data["intra_node"]), "inter_node": Link(**data["inter_node"])})
    except (TypeError, KeyError) as e:
        raise OmnigenError(f"--base: incomplete or malformed profile {base!r}: {e}") from None
    return data


@dataclass(frozen=True)
class Calibration:
    profile: dict[str, Any]     # the HardwareProfile fields, as written
    measured: dict[str, Any]    # everything measured, as written under `# measured:`
    fit: Fit | None
    fits_by_op: dict[str, Fit]
    compute: ComputeFit
    kept: tuple[str, ...]       # profile fields copied from the base profile
    raw: dict[str, Any]
    stack: StackFit | None = None  # host terms refitted on generated scripts (calibrate_stack)


def best_rate(records: list[dict], dtype: str) -> float:
    return max(r["flops"] / r["seconds"] for r in records if r["dtype"] == dtype)


def _base_field(base: dict[str, Any], key: str) -> Any:
    """The base profile's value, or HardwareProfile's default where an older profile leaves the field out."""
    from .hardware import HardwareProfile
    return base[key] if key in base else HardwareProfile.__dataclass_fields__[key].default


def _how(raw: dict[str, Any], primary: str, fit: Fit | None, overlap: dict[str, dict], rss: float | None) -> str:
    """How each measured field was measured, for `source`."""
    L, T, opt = raw["layer"][0]["config"], raw["host"][0]["config"], raw["optimizer"][0]
    how = [f"peak_flops = best median GEMM rate over {len(raw['gemm']) // 2} tokens x h x 4h shapes",
           f"matmul_efficiency = fwd+bwd of LlamaForCausalLM (hidden {L['hidden_size']}, {L['layers']} layers, "
           f"seq {L['seq_len']}, batch {L['batch']}; FlopCounterMode FLOPs), host and attention time removed, / the "
           "best GEMM, "
           "timed in pairs, per dtype",
           f"attention_efficiency = whole-matrix SDPA fwd+bwd at {'x'.join(map(str, raw['sdpa'][0]['shape']))} / the "
           "best GEMM; causal_block = the power-of-two key block whose causal share matches causal / whole SDPA time",
           f"layer_overhead_us, step_overhead_ms = least-squares line of {primary} tiny Llama fwd+bwd time (hidden "
           f"{T['hidden_size']}, seq {T['seq_len']}, at {', '.join(str(r['layers']) for r in raw['host'])} layers) "
           "less its compute time, solved together with matmul_efficiency",
           f"memory_bandwidth_gbps = effective: cost.py's bytes per parameter x {opt['params'] / 1e6:.3g} M fp32 "
           f"parameters in {opt['tensors']} tensors / clip_grad_norm_ + AdamW(fused) step time"]
    if overlap:
        how.append(f"overlap = (GEMM block + all-gather of {format_bytes(overlap['comm']['bytes'])} apart - together) / "
                   "GEMM block, async all-gather")
    if rss:
        how.append(f"overhead_gib = peak RSS after importing torch + transformers, {raw['backend']} init and one "
                   "all_reduce")
    if fit:
        sizes = sorted({r["bytes"] for r in raw["comm"]})
        how.append(f"intra_node = alpha-beta least-squares fit (log ratio) of {raw['backend']} all_gather, "
                   f"reduce_scatter, all_reduce, all_to_all at {format_bytes(sizes[0])}-{format_bytes(sizes[-1])}")
        how.append(f"{', '.join(COLLECTIVES)} = the same fit of each one's samples alone (the cost model prices "
                   "each collective on its own link within a node)")
    else:
        how.append("one rank: no communication measured")
    return "; ".join(how)


def measured_on(raw: dict[str, Any], device: str) -> str:
    """The machine, as the profile's `measured_on` names it: the figures hold for this CPU or GPU and rank count."""
    n = raw["world_size"]
    if device == "cuda":
        return f"{n} x {raw['device_name']}"
    return f"{raw['device_name']}, {cpu_cores()} cores, {n} CPU rank{'s' if n > 1 else ''}"


def analyse(raw: dict[str, Any], device: str, base_name: str, base: dict[str, Any], name: str,
            quick: bool, today: str | None = None) -> Calibration:
    """Turn the worker's measurements into a profile (pure: no torch, no I/O)."""
    n = raw["world_size"]
    primary = "bf16" if device == "cuda" else "fp32"
    peak = {d: best_rate(raw["gemm"], d) for d in DTYPES}
    layer_rate = {r["dtype"]: r["flops"] / r["seconds"] for r in raw["layer"]}
    direct = {d: layer_rate[d] / peak[d] for d in DTYPES}
    # Paired ratios are immune to load that drifts between the GEMM and the layer measurements.
    compute = fit_compute(raw["layer"], raw["host"], peak, primary, fit_attention(raw["sdpa"], peak, primary))
    attention = compute.attention
    samples = [(r["op"], r["bytes"], r["seconds"]) for r in raw["comm"]]
    fit = fit_alpha_beta(samples, n) if samples else None
    fits_by_op = {op: fit_alpha_beta([x for x in samples if x[0] == op], n) for op in COLLECTIVES
                  if any(x[0] == op for x in samples)}
    overlap = {r["what"]: r for r in raw.get("overlap", [])}
    # cuda: RSS misses the device memory and max_memory_allocated misses the CUDA context, so keep the base figure.
    rss = raw.get("rss_gib") if device == "cpu" else None
    opt = raw["optimizer"][0]
    memory = round(raw["memory_gib"], 1) if raw.get("memory_gib") else base["memory_gib"]
    intra = link_of(fit) if fit else dict(base["intra_node"])
    kept = [k for k, measured in (("memory_gib", bool(raw.get("memory_gib"))), ("intra_node", bool(fit)),
                                  ("inter_node", False), ("overhead_gib", bool(rss)), ("overlap", bool(overlap)))
            if not measured]
    source = (f"omnigen calibrate{' --quick' if quick else ''} on {today or datetime.date.today().isoformat()}: "
              f"torch {raw['torch']}, {raw['device_name']}, {cpu_cores()} cores, {n} {device} ranks x "
              f"{raw['threads']} thread(s), measured concurrently, slowest rank; "
              f"{_how(raw, primary, fit, overlap, rss)}"
              f"; kept from {base_name}: {', '.join(kept)}")
    profile = {"name": name, "measured_on": measured_on(raw, device),
               "peak_flops": {d: significant(peak[d]) for d in DTYPES},
               "matmul_efficiency": {d: significant(compute.efficiency[d], 3) for d in DTYPES},
               "attention_efficiency": {d: significant(attention.efficiency[d], 3) for d in DTYPES},
               "causal_block": attention.causal_block,
               "layer_overhead_us": significant(compute.layer_overhead_s * 1e6, 3),
               "step_overhead_ms": significant(compute.step_overhead_s * 1e3, 3),
               **{term: 0.0 for term in STACK_ONLY_TERMS},  # only generated scripts show these
               "memory_bandwidth_gbps": significant(effective_bandwidth_gbps(opt["params"], opt["seconds"]), 3),
               "overlap": round(overlap_share(*(overlap[w]["seconds"] for w in ("compute", "comm", "both"))), 3)
               if overlap else _base_field(base, "overlap"),
               "memory_gib": memory, "intra_node": intra, "inter_node": dict(base["inter_node"]),
               "overhead_gib": significant(rss, 3) if rss else base["overhead_gib"], "source": source}
    for op in COLLECTIVES:  # each collective on its own link where measured (the pooled fit stays intra_node)
        link = link_of(fits_by_op[op]) if op in fits_by_op else base.get(op)
        if link:
            profile[op] = link
    L = raw["layer"][0]["config"]
    measured = {
        "attention_flops": {r["dtype"]: significant(r["flops"] / r["seconds"]) for r in raw["sdpa"]
                            if not r.get("causal")},
        "attention_shape": raw["sdpa"][0]["shape"],
        "causal_time_ratio": significant(attention.causal_ratio, 3),
        "matmul_efficiency": {d: significant(compute.efficiency[d], 3) for d in DTYPES},
        "matmul_efficiency_with_host": {d: significant(compute.with_host[d], 3) for d in DTYPES},
        "matmul_efficiency_unpaired": {d: significant(direct[d], 3) for d in DTYPES},
        "layer_flops_per_s": {d: significant(layer_rate[d]) for d in DTYPES},
        "layer": {**L, "flops": significant(raw["layer"][0]["flops"]),
                  "seconds": {r["dtype"]: significant(r["seconds"]) for r in raw["layer"]},
                  "host_share": {r["dtype"]: significant(llama_host_seconds(L["layers"], compute.layer_overhead_s,
                                                                     compute.step_overhead_s) / r["seconds"], 3)
                                 for r in raw["layer"]}},
        "host": {**raw["host"][0]["config"], "dtype": primary, "layers": [r["layers"] for r in raw["host"]],
                 "flops": [significant(r["flops"]) for r in raw["host"]],
                 "seconds": [significant(r["seconds"]) for r in raw["host"]],
                 "fitted_seconds": [significant(compute.predict(r["flops"], r["config"], r["layers"], peak[primary],
                                                                primary))
                                    for r in raw["host"]],
                 "iterations": compute.iterations},
        "optimizer": {"params": opt["params"], "tensors": opt["tensors"], "seconds": significant(opt["seconds"])},
        "gemm_flops_per_s": {d: {"x".join(map(str, r["shape"])): significant(r["flops"] / r["seconds"])
                                 for r in raw["gemm"] if r["dtype"] == d} for d in DTYPES},
        "rss_gib_by_rank": [significant(x, 3) for x in raw["rss_gib_by_rank"]],
        "ranks": n, "threads_per_rank": raw["threads"], "backend": raw["backend"],
        "measure_s": round(raw["measure_s"], 1),
    }
    if overlap:
        measured["overlap"] = {"bytes": overlap["comm"]["bytes"], "gemm": overlap["compute"]["gemm"],
                               "gemm_calls": overlap["compute"]["gemm_calls"],
                               **{f"{w}_s": significant(r["seconds"]) for w, r in overlap.items()}}
    if fit:
        measured["collectives_us"] = {op: {int(r["bytes"]): significant(r["seconds"] * 1e6) for r in raw["comm"]
                                           if r["op"] == op} for op in COLLECTIVES}
        measured["fit"] = {"bandwidth_gbps": significant(fit.bandwidth_gbps), "latency_us": significant(fit.latency_us),
                           "typical_error_factor": significant(fit.typical_error, 3),
                           "worst_error_factor": significant(fit.worst_error, 3)}
        measured["fit_by_op"] = {op: {"bandwidth_gbps": significant(f.bandwidth_gbps),
                                      "latency_us": significant(f.latency_us),
                                      "typical_error_factor": significant(f.typical_error, 3)}
                               for op, f in fits_by_op.items()}
    return Calibration(profile=profile, measured=measured, fit=fit, fits_by_op=fits_by_op, compute=compute,
                       kept=tuple(kept), raw=raw)


def link_of(fit: Fit) -> dict[str, float]:
    return {"bandwidth_gbps": significant(fit.bandwidth_gbps), "latency_us": significant(fit.latency_us)}


def with_stack(c: Calibration, fit: StackFit, device: str) -> Calibration:
    """The profile with its host terms, and on CPU its memory overhead, refitted on generated scripts."""
    profile = {**c.profile, **fit.terms}
    if device == "cpu":  # CUDA peaks are max_memory_allocated: the process baseline is not in them
        profile["overhead_gib"] = fit.overhead_gib
    n = c.measured["ranks"]
    runs = "; ".join(describe(r.shape, n) for r in fit.runs)
    profile["source"] = (f"{c.profile['source']}; then {', '.join(fit.terms)}"
                         f"{' and overhead_gib' if device == 'cpu' else ''} = non-negative least squares (relative) on "
                         f"omnigen's generated train.py (hidden 64, seq {SEQ_LEN}, {MICRO_BATCHES} micro-batches per "
                         f"rank, FSDP over the {n} ranks) of: {runs}; medians of forward+backward and optimizer time, "
                         f"peak memory")
    return replace(c, profile=profile, measured={**c.measured, "stack": fit.to_measured()}, stack=fit)


def format_bytes(n: float) -> str:
    for unit, size in (("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:g} B"


def _num(x: float) -> str:
    """A float YAML 1.1 (PyYAML) reads back as a float: 8.1e+10 needs its dot (8.1e+10, not 8e+10)."""
    if float(x).is_integer() and abs(x) < 1e6:
        return f"{int(x)}"
    s = f"{x:.4g}"
    if "e" in s:
        mant, exp = s.split("e")
        s = f"{mant if '.' in mant else mant + '.0'}e{exp}"
    return s


def profile_yaml(c: Calibration, command: str) -> str:
    p, m, base_note = c.profile, c.measured, "kept from the base profile"
    fit_note = (f"alpha-beta fit, {m['ranks']} ranks, {m['backend']} "
                f"(samples typically x{c.fit.typical_error:.2f} off)" if c.fit else base_note)
    mem_note = base_note if "memory_gib" in c.kept else "total device memory"
    host, opt = m["host"], m["optimizer"]
    stack = "fitted on generated train.py runs (see source)" if c.stack else None
    overlap_note = (base_note + ": one rank" if "overlap" in c.kept else
                    f"share of a GEMM block an async all-gather hid behind, {m['ranks']} ranks")
    overhead_note = (base_note if "overhead_gib" in c.kept else
                     "measured peak RSS less the predicted peak, generated train.py runs (median)" if c.stack
                     else f"peak RSS after imports, {m['backend']} init, one all_reduce (slowest rank)")
    eff, att = p["matmul_efficiency"], p["attention_efficiency"]
    lines = [f"# Measured by `{command}`. Regenerate rather than edit; `source` says what was measured.",
             f"name: {p['name']}",
             f"measured_on: {json.dumps(p['measured_on'])}   # the machine these figures fit",
             f"peak_flops: {{fp32: {_num(p['peak_flops']['fp32'])}, bf16: {_num(p['peak_flops']['bf16'])}}}"
             "   # per rank, FLOP/s: best median GEMM",
             f"matmul_efficiency: {{fp32: {_num(eff['fp32'])}, bf16: {_num(eff['bf16'])}}}"
             "   # Llama fwd+bwd matmul FLOP/s, host and attention time removed, / GEMM peak",
             f"attention_efficiency: {{fp32: {_num(att['fp32'])}, bf16: {_num(att['bf16'])}}}"
             f"   # SDPA fwd+bwd FLOP/s (whole score matrix) / GEMM peak, shape {m['attention_shape']}",
             f"causal_block: {p['causal_block']}   # causal SDPA took x{m['causal_time_ratio']} the whole one's time: "
             "(n + 1) / 2n of the blocks, n = seq / block" if p["causal_block"] else
             "causal_block: 0   # causal SDPA saved under 10% of the whole one's time: no skipping modelled",
             f"layer_overhead_us: {_num(p['layer_overhead_us'])}   # host time per layer forward (backward = 2): "
             + (stack or f"tiny {host['dtype']} Llamas at {', '.join(map(str, host['layers']))} layers"),
             f"step_overhead_ms: {_num(p['step_overhead_ms'])}   # host time per micro-batch beyond the layers: "
             + (stack or "the same fit at 0 layers"),
             *(f"{term}: {_num(p[term])}   # host time {what}: {stack or 'not fitted (--no-stack)'}"
               for term, what in STACK_ONLY_TERMS.items()),
             f"memory_bandwidth_gbps: {_num(p['memory_bandwidth_gbps'])}   # effective: reproduces clip_grad_norm_ + "
             f"AdamW(fused) over {opt['params'] / 1e6:.3g} M fp32 params",
             f"overlap: {_num(p['overlap'])}   # {overlap_note}",
             f"memory_gib: {_num(p['memory_gib'])}   # {mem_note}",
             f"intra_node: {{bandwidth_gbps: {_num(p['intra_node']['bandwidth_gbps'])}, "
             f"latency_us: {_num(p['intra_node']['latency_us'])}}}   # {fit_note}",
             f"inter_node: {{bandwidth_gbps: {_num(p['inter_node']['bandwidth_gbps'])}, "
             f"latency_us: {_num(p['inter_node']['latency_us'])}}}   # {base_note}: one node measured",
             f"overhead_gib: {_num(p['overhead_gib'])}   # {overhead_note}",
             *(f"{op}: {{bandwidth_gbps: {_num(p[op]['bandwidth_gbps'])}, latency_us: {_num(p[op]['latency_us'])}}}"
               f"   # {op} alone: " + (f"alpha-beta fit of its samples, {m['ranks']} ranks" if op in c.fits_by_op
                                       else base_note)
               for op in COLLECTIVES if p.get(op)),
             f"source: {json.dumps(p['source'])}",
             "",
             f"{MEASURED_MARK}   # raw figures: load_profile skips comments; omnigen.calibrate.read_measured reads them"]
    block = yaml.safe_dump(c.measured, sort_keys=False, default_flow_style=None, width=120)
    lines += [f"#   {line}" for line in block.splitlines()]
    text = "\n".join(lines) + "\n"
    assert yaml.safe_load(text) == p, "profile_yaml must round-trip"
    return text


def read_measured(path: str | Path) -> dict[str, Any]:
    """The `# measured:` block of a calibrated profile, parsed."""
    text = Path(path).read_text()
    if MEASURED_MARK not in text:
        return {}
    block = text.split(MEASURED_MARK, 1)[1].splitlines()[1:]
    return yaml.safe_load("\n".join(line[4:] for line in block if line.startswith("#   "))) or {}
