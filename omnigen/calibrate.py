"""`omnigen calibrate`: measure this machine and write a hardware profile the cost model can load.

One torchrun launch on N local ranks (gloo on cpu, nccl on cuda) runs `worker()` (`python -m omnigen.calibrate`). Every
rank measures at once, as ranks of a training job share the machine:
  process memory peak RSS after the generated script's imports, process-group init, one collective (cpu: overhead_gib)
  compute        median FLOP/s of transformer-shaped GEMMs (tokens x h x 4h) per dtype; the best shape is `peak_flops`
  efficiency     fwd+bwd of a real LlamaForCausalLM stack: its matmul FLOP rate (FlopCounterMode FLOPs less attention's,
                 over the time less attention's) over the best GEMM's rate timed just before it, per dtype
  host overhead  fwd+bwd of tiny Llamas at a few layer counts: the time their FLOPs do not explain, as a line in the
                 layer count (layer_overhead_us per layer forward, step_overhead_ms per micro-batch)
  optimizer      clip_grad_norm_ + AdamW(foreach) over model-shaped fp32 parameters: an effective memory bandwidth
  attention      fwd+bwd SDPA FLOP/s at a long-ish sequence, whole (attention_efficiency) and causal: how much of the
                 score matrix the causal kernel skips gives its key-block width (causal_block)
  collectives    all_gather_into_tensor, reduce_scatter_tensor, all_reduce, all_to_all_single from 4 KiB to 64 MiB
  overlap        a GEMM block, an all-gather of about the same length, and both at once (async all-gather)
Each rank reports its times; a figure is the slowest rank's (a step waits for it). The driver fits cost.py's models:
the alpha-beta link by least squares (in log ratio), and efficiency jointly with the host overhead so that
  time = matmul FLOPs / (peak x efficiency) + attention + 3 x layers x layer_overhead + step_overhead
reproduces both the tiny and the real Llama. Measured fields replace the base profile's; the rest (inter_node,
memory_gib on cpu, overhead_gib on cuda, overlap on one rank) are kept and `source` says which is which.

Then (unless --no-stack) calibrate_stack runs omnigen's own generated train.py on the same ranks and refits the host
terms where they really occur (calibrate_stack.HOST_TERMS: per layer, micro-batch, collective hop, FSDP collective
call, all-to-all hop, local expert under EP, parameter tensor, vision and audio tower) and, on cpu, overhead_gib. The
micro-benchmark fit stays in the `measured` block.

The raw measurements go under a commented `# measured:` block at the end of the file: load_profile builds the
HardwareProfile dataclass from every top-level key and rejects unknown ones, so a live `measured:` key would make the
file unloadable. `read_measured(path)` parses the block back.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml

from .calibrate_stack import MICRO_BATCHES, SEQ_LEN, STACK_ONLY_TERMS, StackFit, describe, fit_stack
from .fitting import non_negative_least_squares, significant
from .errors import OmnigenError
from .hardware import COLLECTIVES, GIB, causal_share

DTYPES = ("fp32", "bf16")
MEASURED_MARK = "# measured:"


# --- what is measured, at which sizes --------------------------------------------------------------------------

@dataclass(frozen=True)
class Settings:
    gemms: tuple[tuple[int, int, int], ...]   # (tokens, hidden, 4*hidden): C[m, n] = A[m, k] @ B[k, n]
    layer: dict[str, int]                     # LlamaConfig fields + seq_len and batch of the fwd+bwd measurement
    tiny: dict[str, int]                      # the same for the host-overhead Llamas, less `layers`
    tiny_layers: tuple[int, ...]              # layer counts the host overhead is fitted over
    optimizer: tuple[int, int]                # (hidden, layers) of the model-shaped fp32 parameters AdamW steps over
    sdpa: tuple[int, int, int, int]           # batch, heads, seq, head_dim
    comm_bytes: tuple[int, ...]
    repeats: int
    block_s: float                            # a timed block repeats an op until about this long
    overlap_s: float                          # length of the GEMM block the overlap test hides an all-gather behind
    overlap_max_bytes: int                    # cap on that all-gather's output


def settings(device: str, quick: bool) -> Settings:
    kib, mib = 1024, 1024**2
    # Tiny enough that host work (Python, dispatch, kernel launches) dominates its FLOPs on any device.
    tiny = dict(hidden_size=64, heads=4, kv_heads=2, seq_len=32, batch=1, vocab_size=256)
    if device == "cuda":
        gemms = ((4096, 2048, 8192), (8192, 4096, 16384)) if quick else \
            ((4096, 2048, 8192), (8192, 4096, 16384), (16384, 8192, 32768))
        layer = dict(hidden_size=1024 if quick else 2048, layers=2 if quick else 4, heads=16, kv_heads=8,
                     seq_len=2048, batch=2)
        sdpa = (2, 16, 4096, 128)
        optimizer = (2048, 4 if quick else 8)            # 200-400 M parameters: far past launch overheads
        overlap_s, overlap_max = (0.01 if quick else 0.02), 2 * 1024 * mib
    else:
        gemms = ((512, 256, 1024), (1024, 512, 2048)) if quick else \
            ((512, 256, 1024), (1024, 512, 2048), (2048, 1024, 4096))
        layer = dict(hidden_size=256 if quick else 512, layers=2 if quick else 4, heads=8, kv_heads=4,
                     seq_len=512, batch=1)
        sdpa = (1, 8, 1024 if quick else 2048, 64)
        optimizer = (256, 4 if quick else 8)             # 12-25 MiB of parameters, x4 with grads and states: past L3
        overlap_s, overlap_max = (0.05 if quick else 0.1), 256 * mib
    comm = (4 * kib, 64 * kib, 1 * mib, 8 * mib) if quick else tuple(4 * kib * 4**i for i in range(8))  # .. 64 MiB
    # Not 0 layers: under load a 0-layer Llama runs well below the line through 1-16 layers (first layer costs more).
    tiny_layers = (1, 4, 8) if quick else (1, 2, 4, 8, 16)
    return Settings(gemms=gemms, layer=layer, tiny=tiny, tiny_layers=tiny_layers,
                    optimizer=optimizer, sdpa=sdpa, comm_bytes=comm, repeats=3 if quick else 7,
                    block_s=0.02 if quick else 0.05, overlap_s=overlap_s, overlap_max_bytes=overlap_max)


# --- the alpha-beta model and its least-squares fit (pure; what cost.py uses) ------------------------------------

def collective_terms(op: str, nbytes: float, n: int) -> tuple[float, float]:
    """(latency multiplier, bytes over the link) so that time = a * latency + b / bandwidth, as in cost.py.

    nbytes is the full tensor: all-gather's output, reduce-scatter's input, all-reduce's tensor, and for all-to-all
    each rank's input buffer, of which (n-1)/n leaves the rank."""
    ring = nbytes * (n - 1) / n
    return {"all_gather": (n - 1, ring), "reduce_scatter": (n - 1, ring), "all_reduce": (2 * (n - 1), 2 * ring),
            "all_to_all": (n - 1, ring)}[op]


@dataclass(frozen=True)
class Fit:
    latency_s: float
    bandwidth_bytes_s: float
    typical_error: float   # exp(rms |log(fitted / measured)|): 1.25 means samples sit about 25% off the line
    worst_error: float     # exp(max |log(fitted / measured)|)

    @property
    def latency_us(self) -> float:
        return self.latency_s * 1e6

    @property
    def bandwidth_gbps(self) -> float:
        return self.bandwidth_bytes_s / 1e9

    def predict(self, op: str, nbytes: float, n: int) -> float:
        a, b = collective_terms(op, nbytes, n)
        return a * self.latency_s + b / self.bandwidth_bytes_s


def fit_alpha_beta(samples: list[tuple[str, float, float]], n: int) -> Fit:
    """Least squares of time = a*latency + b/bandwidth over (op, nbytes, seconds) samples, in log(fitted / measured).

    Plain least squares would fit the 64 MiB messages alone and leave the latency meaningless; errors in ratio weigh
    a 4 KiB message as much as a 64 MiB one. Dividing each row by its time (relative error) gives the starting
    point; Gauss-Newton on the log ratio then treats a 2x-too-slow and a 2x-too-fast sample alike, where relative
    error would bound the first at -100% and let a few fast outliers pull the line down. Both coefficients >= 0."""
    if n < 2 or not samples:
        raise ValueError("the alpha-beta fit needs at least 2 ranks and one sample")
    rows = [(*collective_terms(op, nbytes, n), t) for op, nbytes, t in samples]
    lat, inv_bw = non_negative_least_squares([[a / t, b / t] for a, b, t in rows], [1.0] * len(rows))

    def log_sse(x: tuple[float, float]) -> float:
        return sum(math.log(max(a * x[0] + b * x[1], 1e-300) / t) ** 2 for a, b, t in rows)
    for _ in range(100):
        # Linearised at p = a*lat + b*inv_bw: log(p'/t) ~ log(p/t) + (a*dlat + b*dinv)/p, i.e. a linear fit of
        # (a/p, b/p) . x' to 1 - log(p/t).
        preds = [a * lat + b * inv_bw for a, b, _ in rows]
        step = non_negative_least_squares([[a / p, b / p] for (a, b, _), p in zip(rows, preds)],
                                          [1 - math.log(p / t) for (_, _, t), p in zip(rows, preds)])
        before, x = log_sse((lat, inv_bw)), tuple(step)
        for _ in range(30):                          # halve the step until it does not make things worse
            if log_sse(x) <= before:
                break
            x = ((x[0] + lat) / 2, (x[1] + inv_bw) / 2)
        else:
            break
        done = abs(x[0] - lat) <= 1e-12 * max(lat, 1e-30) and abs(x[1] - inv_bw) <= 1e-12 * max(inv_bw, 1e-30)
        lat, inv_bw = x
        if done:
            break
    if inv_bw <= 0:                                  # latency-bound throughout: the best rate seen bounds bandwidth
        inv_bw = min(t / b for _, b, t in rows)
    logs = [math.log((a * lat + b * inv_bw) / t) for a, b, t in rows]
    return Fit(latency_s=lat, bandwidth_bytes_s=1 / inv_bw,
               typical_error=math.exp(math.sqrt(sum(r * r for r in logs) / len(logs))),
               worst_error=math.exp(max(abs(r) for r in logs)))


# --- compute efficiency, host overhead, optimizer bandwidth, overlap (pure; cost.py's terms) ---------------------

MIN_COMPUTE_SHARE = 0.05   # the host estimate may claim at most 95% of a real Llama step


@dataclass(frozen=True)
class AttentionFit:
    efficiency: dict[str, float]   # per dtype: whole (non-causal) SDPA fwd+bwd FLOP/s over the GEMM peak
    causal_block: int              # key-block width that reproduces the causal run's share of the whole one's time
    causal_ratio: float            # that share, measured

    def seconds(self, flops: float, context: int, peak: float, dtype: str) -> float:
        """cost.py's time of causal attention with these (whole-matrix) FLOPs."""
        return flops * causal_share(context, self.causal_block) / (peak * self.efficiency[dtype])


def fit_attention(sdpa: list[dict], peak: dict[str, float], primary: str) -> AttentionFit:
    whole = {r["dtype"]: r for r in sdpa if not r.get("causal")}
    causal = {r["dtype"]: r for r in sdpa if r.get("causal")}
    ratio = causal[primary]["seconds"] / whole[primary]["seconds"]
    return AttentionFit(efficiency={d: r["flops"] / r["seconds"] / peak[d] for d, r in whole.items()},
                        causal_block=causal_block(ratio, whole[primary]["shape"][2]), causal_ratio=ratio)


def causal_block(ratio: float, seq: int) -> int:
    """The power-of-two block width whose causal share (n + 1) / 2n at this seq is nearest the measured time ratio;
    0 when the causal kernel saved under 10% (nothing to model)."""
    if ratio >= 0.9:
        return 0
    n = 1 / (2 * max(ratio, 0.5 + 0.5 / seq) - 1)   # blocks per side; the ratio cannot go below 1/2
    return 2 ** max(0, round(math.log2(seq / n)))


def llama_attention_flops(config: dict[str, int], layers: int | None = None) -> float:
    """FlopCounterMode's SDPA FLOPs of a Llama fwd+bwd: 3 x 4·b·s²·hidden per layer (the whole score matrix)."""
    seq = config["seq_len"]
    return 12.0 * (layers or config["layers"]) * config["batch"] * seq * seq * config["hidden_size"]


def llama_host_seconds(layers: int, layer_overhead_s: float, step_overhead_s: float) -> float:
    """cost.py's host time of one micro-batch of a bare (unsharded) Llama: each layer runs a forward, and a
    backward that counts as two."""
    return 3 * layers * layer_overhead_s + step_overhead_s


def fit_host_overhead(tiny: list[dict], compute_s: Callable[[dict], float]) -> tuple[float, float]:
    """(layer_overhead_s, step_overhead_s), both >= 0: least squares of what the tiny Llamas' compute time leaves
    unexplained, against 3 x layers and 1. Their FLOPs are linear in layers, so this is the slope of time vs layers
    less one layer's compute time, over 3, and the intercept less the embeddings / head / loss compute time."""
    rows = [[3.0 * r["layers"], 1.0] for r in tiny]
    layer, step = non_negative_least_squares(rows, [r["seconds"] - compute_s(r) for r in tiny])
    return layer, step


def compute_efficiency(layer: dict, host_s: float, attention_s: float, peak: float) -> float:
    """Matmul FLOP rate of the real Llama step less host_s and its attention (attention_s), over the GEMM rate: per
    rank the median over (GEMM block, step) pairs, then the slowest rank; over `peak` when no pairs were recorded."""
    matmul_flops = layer["flops"] - llama_attention_flops(layer["config"])

    def rate(t: float) -> float:
        return matmul_flops / max(t - host_s - attention_s, MIN_COMPUTE_SHARE * t)
    if layer.get("pairs_by_rank"):
        return min(statistics.median(rate(t) / g for t, g in pairs) for pairs in layer["pairs_by_rank"])
    return rate(layer["seconds"]) / peak


@dataclass(frozen=True)
class ComputeFit:
    efficiency: dict[str, float]       # per dtype, host and attention time removed: peak x efficiency is the matmul rate
    with_host: dict[str, float]        # the same ratio with host time left in the step
    layer_overhead_s: float
    step_overhead_s: float
    iterations: int
    attention: AttentionFit

    def compute_s(self, flops: float, config: dict[str, int], layers: int, peak: float, dtype: str) -> float:
        """cost.py's compute time of a Llama fwd+bwd with these FLOPs: matmuls, then attention at its own rate."""
        attention = llama_attention_flops(config, layers)
        return ((flops - attention) / (peak * self.efficiency[dtype])
                + self.attention.seconds(attention, config["seq_len"], peak, dtype))

    def predict(self, flops: float, config: dict[str, int], layers: int, peak: float, dtype: str) -> float:
        """cost.py's fwd+bwd time of a Llama with these FLOPs and layers."""
        return (self.compute_s(flops, config, layers, peak, dtype)
                + llama_host_seconds(layers, self.layer_overhead_s, self.step_overhead_s))


def fit_compute(layers: list[dict], tiny: list[dict], peak: dict[str, float], primary: str,
                attention: AttentionFit) -> ComputeFit:
    """Efficiency and host overhead together, so that matmul FLOPs / (peak x efficiency) + attention + host reproduces
    both the real Llama and the tiny ones (attention at its own measured rate).

    Each needs the other: the tiny Llamas' FLOP time needs the efficiency, the real one's compute time needs the host
    overhead. Iterate from no host overhead: a higher efficiency shortens the tiny FLOP time, which raises the
    overhead, which raises the efficiency, so the sequence climbs; it is bounded (MIN_COMPUTE_SHARE) and the feedback
    is weak (the tiny steps are mostly host time, the real one mostly FLOPs), so it settles in a few rounds."""
    by_dtype = {r["dtype"]: r for r in layers}

    def efficiencies(o: float, s: float) -> dict[str, float]:
        return {d: compute_efficiency(r, llama_host_seconds(r["config"]["layers"], o, s),
                                      attention.seconds(llama_attention_flops(r["config"]), r["config"]["seq_len"],
                                                        peak[d], d), peak[d])
                for d, r in by_dtype.items()}
    with_host = eff = efficiencies(0.0, 0.0)
    fit = ComputeFit(efficiency=eff, with_host=with_host, layer_overhead_s=0.0, step_overhead_s=0.0, iterations=0,
                     attention=attention)
    for i in range(1, 201) if tiny else ():
        o, s = fit_host_overhead(tiny, lambda r: fit.compute_s(r["flops"], r["config"], r["layers"], peak[primary],
                                                               primary))
        new = efficiencies(o, s)
        done = abs(new[primary] - fit.efficiency[primary]) <= 1e-12 * fit.efficiency[primary]
        fit = replace(fit, efficiency=new, layer_overhead_s=o, step_overhead_s=s, iterations=i)
        if done:
            break
    return fit


def effective_bandwidth_gbps(params: int, seconds: float) -> float:
    """The memory bandwidth with which cost.py's optimizer term (bytes per parameter / bandwidth) gives `seconds`:
    an effective figure (it folds in per-tensor launch costs and the arithmetic), not the memory's datasheet rate."""
    from .cost import OPTIMIZER_BYTES_PER_PARAM
    return OPTIMIZER_BYTES_PER_PARAM * params / seconds / 1e9


def overlap_share(compute_s: float, comm_s: float, both_s: float) -> float:
    """Share of the compute block's time a collective launched before it hid behind it, in [0, 1]."""
    return min(max((compute_s + comm_s - both_s) / compute_s, 0.0), 1.0)


# --- the worker: runs on every rank under torchrun ------------------------------------------------------------

def _timer(device: str) -> Callable[[], float]:
    import torch
    if device == "cuda":
        def now() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()
        return now
    return time.perf_counter


def _median_seconds(fn: Callable[[], Any], now: Callable[[], float], repeats: int, block_s: float) -> float:
    """Warm up, size a block to about block_s, and return the median per-call time over `repeats` blocks."""
    t0 = now()
    fn()
    t1 = now()
    fn()
    first = max(now() - t1, 1e-7)
    calls = max(1, min(1000, round(block_s / first))) if t1 - t0 < 10 * block_s else 1
    times = []
    for _ in range(repeats):
        t0 = now()
        for _ in range(calls):
            fn()
        times.append((now() - t0) / calls)
    return statistics.median(times)


def measure_gemms(dev, s: Settings, now) -> list[dict]:
    import torch
    out = []
    for name in DTYPES:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        for m, k, n in s.gemms:
            a, b = torch.randn(m, k, device=dev, dtype=dtype), torch.randn(k, n, device=dev, dtype=dtype)
            t = _median_seconds(lambda: a @ b, now, s.repeats, s.block_s)
            out.append({"dtype": name, "shape": [m, k, n], "seconds": t, "flops": 2.0 * m * k * n})
    return out


def measure_sdpa(dev, s: Settings, now) -> list[dict]:
    """fwd+bwd of SDPA, whole and causal; FLOPs as FlopCounterMode counts them either way: 4·b·h·s²·d forward,
    twice that backward."""
    import torch
    import torch.nn.functional as F
    b, h, seq, d = s.sdpa
    out = []
    for name in DTYPES:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
        q, k, v = (torch.randn(b, h, seq, d, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(b, h, seq, d, device=dev, dtype=dtype)
        for causal in (False, True):
            def step():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(grad)
                q.grad = k.grad = v.grad = None
            t = _median_seconds(step, now, s.repeats, s.block_s)
            out.append({"dtype": name, "shape": [b, h, seq, d], "causal": causal, "seconds": t,
                        "flops": 3 * 4.0 * b * h * seq * seq * d})
    return out


def _torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _llama(dev, dtype, L: dict[str, int]) -> tuple[Any, Callable[[], None]]:
    """A random-init LlamaForCausalLM (sdpa attention) and its fwd+bwd step: loss included, optimizer not."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    h = L["hidden_size"]
    cfg = LlamaConfig(hidden_size=h, intermediate_size=int(8 * h / 3 + 63) // 64 * 64, num_hidden_layers=L["layers"],
                      num_attention_heads=L["heads"], num_key_value_heads=L["kv_heads"],
                      vocab_size=L.get("vocab_size", 1024), max_position_embeddings=L["seq_len"],
                      tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=dev, dtype=dtype)
    ids = torch.randint(0, cfg.vocab_size, (L["batch"], L["seq_len"]), device=dev)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)
    return cfg, step


def _count_flops(step: Callable[[], None]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from .flops import register_missing_flop_formulas
    register_missing_flop_formulas()
    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def measure_layers(dev, s: Settings, now, gemms: list[dict]) -> list[dict]:
    """fwd+bwd (loss included, optimizer not) of a LlamaForCausalLM stack; FLOPs counted by FlopCounterMode.

    Each timed step is paired with a block of this rank's fastest GEMM right before it, so the ratio of their rates
    holds even when other work on the machine slows both by a varying amount. `pairs` keeps (step seconds, GEMM
    FLOP/s) so that the driver can take the host overhead out of each step before taking the ratio."""
    import torch
    out = []
    for name in DTYPES:
        dtype = _torch_dtype(name)
        cfg, step = _llama(dev, dtype, s.layer)
        flops = _count_flops(step)
        best = max((g for g in gemms if g["dtype"] == name), key=lambda g: g["flops"] / g["seconds"])
        m, k, n = best["shape"]
        a, b = torch.randn(m, k, device=dev, dtype=dtype), torch.randn(k, n, device=dev, dtype=dtype)
        step()
        gemm_calls = max(1, round(s.block_s / best["seconds"]))
        pairs = []
        for _ in range(2 * s.repeats + 1):     # a median of few pairs moves with every burst of load
            t0 = now()
            for _ in range(gemm_calls):
                a @ b
            t1 = now()
            step()
            t2 = now()
            pairs.append([t2 - t1, best["flops"] * gemm_calls / (t1 - t0)])
        out.append({"dtype": name, "seconds": statistics.median(t for t, _ in pairs), "flops": flops,
                    "pairs": pairs, "paired_gemm": best["shape"],
                    "config": {**s.layer, "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size}})
        del step
    return out


def measure_host(dev, s: Settings, now, dtype_name: str) -> list[dict]:
    """fwd+bwd of tiny Llamas at each of s.tiny_layers, timed round-robin so that load drifting on the machine hits
    every depth alike; per depth the median over repeats."""
    runs = []
    for layers in s.tiny_layers:
        _, step = _llama(dev, _torch_dtype(dtype_name), {**s.tiny, "layers": layers})
        flops = _count_flops(step)
        step()
        t0 = now()
        step()
        calls = max(1, round(2.5 * s.block_s / max(now() - t0, 1e-7)))
        runs.append((layers, flops, step, calls, []))
    for _ in range(max(11, 2 * s.repeats + 1)):       # cheap, and a line through 3-5 points needs steady ones
        for _, _, step, calls, times in runs:
            t0 = now()
            for _ in range(calls):
                step()
            times.append((now() - t0) / calls)
    return [{"layers": layers, "flops": flops, "dtype": dtype_name, "seconds": statistics.median(times),
             "config": s.tiny} for layers, flops, _, _, times in runs]


def measure_optimizer(dev, s: Settings, now) -> list[dict]:
    """clip_grad_norm_ + AdamW(foreach) step over fp32 parameters shaped like Llama layers, after a warm-up step
    (which allocates the optimizer state); grads stay as they are between steps."""
    import torch
    h, layers = s.optimizer
    inter = int(8 * h / 3 + 63) // 64 * 64
    shapes = [(h, h)] * 4 + [(inter, h)] * 3 + [(h,)] * 2      # q k v o, gate up down, two norms
    torch.manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(shape, device=dev)) for _ in range(layers) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
    seconds = _median_seconds(step, now, 2 * s.repeats + 1, s.block_s)
    return [{"params": sum(p.numel() for p in params), "tensors": len(params), "seconds": seconds}]


def measure_collectives(dev, s: Settings, now, n: int) -> list[dict]:
    """Per (op, size) and repeat, every rank times a block of back-to-back calls started after a barrier."""
    import torch
    import torch.distributed as dist
    out = []
    for nbytes in s.comm_bytes:
        numel = max(n, nbytes // 4 // n * n)
        full = torch.ones(numel, device=dev)
        part = torch.ones(numel // n, device=dev)
        sink = torch.empty(numel, device=dev)
        ops = {"all_gather": lambda: dist.all_gather_into_tensor(full, part),
               "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full),
               "all_reduce": lambda: dist.all_reduce(full),
               "all_to_all": lambda: dist.all_to_all_single(sink, full)}
        for op in COLLECTIVES:
            fn = ops[op]
            fn()
            dist.barrier()
            t0 = now()
            fn()
            first = now() - t0
            calls = max(1, min(200, round(s.block_s / max(first, 1e-7))))
            calls = torch.tensor([calls], device=dev)
            dist.all_reduce(calls, op=dist.ReduceOp.MIN)   # every rank must make the same number of calls
            times = []
            for _ in range(s.repeats):
                dist.barrier()
                t0 = now()
                for _ in range(int(calls)):
                    fn()
                times.append((now() - t0) / int(calls))
            out.append({"op": op, "bytes": numel * 4, "seconds": times})
    return out


def measure_overlap(dev, s: Settings, now, gemms: list[dict], comm: list[dict], dtype_name: str) -> list[dict]:
    """A GEMM block alone, an all-gather alone, and the all-gather launched with async_op=True, the GEMM block run,
    then waited on. The gather is sized from this run's all-gather rate to last about s.overlap_s, the GEMM block to
    last as long as the gather then measures (within 1/4-2x s.overlap_s), so that the GEMM block is not too short to
    hide the gather behind."""
    import torch
    import torch.distributed as dist
    n = dist.get_world_size()
    dtype = _torch_dtype(dtype_name)
    # The smallest GEMM: one call of the largest can outlast the whole block on a loaded machine.
    gemm = min((g for g in gemms if g["dtype"] == dtype_name), key=lambda g: g["flops"])
    m, k, nn = gemm["shape"]
    a, b = torch.randn(m, k, device=dev, dtype=dtype), torch.randn(k, nn, device=dev, dtype=dtype)
    gathers = [r for r in comm if r["op"] == "all_gather"]
    largest = max(gathers, key=lambda r: r["bytes"])
    rate = largest["bytes"] / statistics.median(largest["seconds"])
    numel = torch.tensor([max(n, int(min(rate * s.overlap_s, s.overlap_max_bytes)) // 4 // n * n)], device=dev)
    dist.all_reduce(numel, op=dist.ReduceOp.MIN)                 # one size on every rank
    full = torch.empty(int(numel), device=dev)
    part = torch.ones(int(numel) // n, device=dev)

    def gather():
        dist.all_gather_into_tensor(full, part)

    def gemm_block(calls: int) -> None:
        for _ in range(calls):
            a @ b

    def timed(fn: Callable[[], Any]) -> float:     # every rank at it at once
        dist.barrier()
        t0 = now()
        fn()
        return now() - t0
    # Size the GEMM block to the gather from medians of both timed as below: the GEMM phase's rate can be a
    # whole core's when ranks share cores, or a quiet moment's.
    trial = max(1, round(s.overlap_s / gemm["seconds"]))
    gather()
    gather_s, trial_s = zip(*((timed(gather), timed(lambda: gemm_block(trial))) for _ in range(3)))
    block_s = min(max(statistics.median(gather_s), s.overlap_s / 4), 2 * s.overlap_s)
    calls = torch.tensor([max(1, round(trial * block_s / statistics.median(trial_s)))], device=dev)
    dist.all_reduce(calls, op=dist.ReduceOp.MIN)

    def compute():
        gemm_block(int(calls))

    def both():
        work = dist.all_gather_into_tensor(full, part, async_op=True)
        compute()
        work.wait()
    both()
    runs = {"compute": compute, "comm": gather, "both": both}
    times: dict[str, list[float]] = {what: [] for what in runs}
    for _ in range(2 * s.repeats + 1):
        for what, fn in runs.items():
            times[what].append(timed(fn))
    return [{"what": what, "bytes": int(numel) * 4, "gemm": gemm["shape"], "gemm_calls": int(calls),
             "dtype": dtype_name, "seconds": times[what]} for what in runs]


def _slowest(per_rank: list[list[dict]]) -> list[dict]:
    """Merge the ranks' records: each figure becomes the slowest rank's; `seconds_by_rank` keeps them all."""
    merged = []
    for records in zip(*per_rank):
        rec = dict(records[0])
        if isinstance(rec["seconds"], list):   # repeat-wise max over ranks, then the median
            repeats = range(len(rec["seconds"]))
            rec["seconds"] = statistics.median(max(r["seconds"][i] for r in records) for i in repeats)
        else:
            rec["seconds_by_rank"] = [r["seconds"] for r in records]
            rec["seconds"] = max(r["seconds"] for r in records)
        if "pairs" in rec:
            rec["pairs_by_rank"] = [r["pairs"] for r in records]
            del rec["pairs"]
        merged.append(rec)
    return merged


def _import_like_generated_script() -> None:
    """What a generated train.py imports before it builds a model, so that the RSS sampled after it is its start."""
    import torch.nn.functional  # noqa: F401
    import transformers
    from torch.distributed.device_mesh import init_device_mesh  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    transformers.LlamaForCausalLM   # resolving a model class imports transformers' modelling stack (~90 MB RSS)


def peak_rss_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB   # Linux: KiB, read as train.py does


def worker(device: str, quick: bool, result_path: str) -> None:
    import torch
    import torch.distributed as dist
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    _import_like_generated_script()
    dist.init_process_group("nccl" if device == "cuda" else "gloo", device_id=dev if device == "cuda" else None)
    dist.all_reduce(torch.ones(1, device=dev))
    rss_gib = peak_rss_gib()    # now, before any measurement allocates: the peak so far is the process's fixed cost
    s, now = settings(device, quick), _timer(device)
    primary = "bf16" if device == "cuda" else "fp32"

    def say(msg):
        if rank == 0:
            print(f"[calibrate] {msg} ({time.perf_counter() - started:.1f} s)", flush=True)
    dist.barrier()
    started = time.perf_counter()
    say(f"{n} ranks, {torch.get_num_threads()} thread(s) each, {rss_gib:.2f} GiB RSS at start; GEMMs ...")
    mine: dict[str, Any] = {"gemm": measure_gemms(dev, s, now)}
    say("SDPA ...")
    mine["sdpa"] = measure_sdpa(dev, s, now)
    say("Llama fwd+bwd ...")
    mine["layer"] = measure_layers(dev, s, now, mine["gemm"])
    say(f"host overhead: tiny Llamas at {', '.join(map(str, s.tiny_layers))} layers ...")
    mine["host"] = measure_host(dev, s, now, primary)
    say("clip_grad_norm_ + AdamW ...")
    mine["optimizer"] = measure_optimizer(dev, s, now)
    dist.barrier()
    say("collectives ...")
    mine["comm"] = measure_collectives(dev, s, now, n) if n > 1 else []
    if n > 1:
        say("overlap of an async all-gather with GEMMs ...")
        mine["overlap"] = measure_overlap(dev, s, now, mine["gemm"], mine["comm"], primary)
    gathered: list[Any] = [None] * n
    dist.all_gather_object(gathered, {"records": mine, "rss_gib": rss_gib})
    if rank == 0:
        result: dict[str, Any] = {k: _slowest([g["records"][k] for g in gathered]) for k in mine}
        result["rss_gib_by_rank"] = [g["rss_gib"] for g in gathered]
        result["rss_gib"] = max(result["rss_gib_by_rank"])
        result["world_size"] = n
        result["threads"] = torch.get_num_threads()
        result["torch"] = torch.__version__
        result["backend"] = dist.get_backend()
        result["device_name"] = torch.cuda.get_device_name(dev) if device == "cuda" else cpu_name()
        result["memory_gib"] = torch.cuda.get_device_properties(dev).total_memory / GIB if device == "cuda" else None
        result["measure_s"] = time.perf_counter() - started
        Path(result_path).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# --- the driver -----------------------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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


def check_args(device: str, ranks: int | None, base: str | None, out: str | None) -> tuple[int, str, Path]:
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
    path = Path(out or f"{device}_measured.yaml")
    if path.suffix not in (".yaml", ".yml"):
        raise OmnigenError(f"-o: {path} must end in .yaml or .yml (specs load `hardware: <file>.yaml`)")
    if path.is_dir():
        raise OmnigenError(f"-o: {path} is a folder")
    return ranks, base or ("h100" if device == "cuda" else "cpu"), path


def run_workers(device: str, ranks: int, quick: bool, echo: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="omnigen-calibrate-") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
               "--nproc-per-node", str(ranks), "-m", "omnigen.calibrate", "--device", device, "--result", str(result)]
        cmd += ["--quick"] if quick else []
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        echo(f"$ {' '.join(cmd[1:])}")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail: list[str] = []
        for line in proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("[calibrate]"):
                echo(line)
            tail = (tail + [line])[-40:]
        if proc.wait() != 0 or not result.is_file():
            raise CalibrationFailed(f"the measurement run failed (exit {proc.returncode}):\n" + "\n".join(tail))
        return json.loads(result.read_text())


class CalibrationFailed(Exception):
    """The torchrun measurement did not complete (not a user error: exit 1)."""


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
           f"parameters in {opt['tensors']} tensors / clip_grad_norm_ + AdamW(foreach) step time"]
    if overlap:
        how.append(f"overlap = (GEMM block + all-gather of {_bytes(overlap['comm']['bytes'])} apart - together) / "
                   "GEMM block, async all-gather")
    if rss:
        how.append(f"overhead_gib = peak RSS after importing torch + transformers, {raw['backend']} init and one "
                   "all_reduce")
    if fit:
        sizes = sorted({r["bytes"] for r in raw["comm"]})
        how.append(f"intra_node = alpha-beta least-squares fit (log ratio) of {raw['backend']} all_gather, "
                   f"reduce_scatter, all_reduce, all_to_all at {_bytes(sizes[0])}-{_bytes(sizes[-1])}")
        how.append(f"{', '.join(COLLECTIVES)} = the same fit of each one's samples alone (the cost model prices "
                   "each collective on its own link within a node)")
    else:
        how.append("one rank: no communication measured")
    return "; ".join(how)


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
    profile = {"name": name, "peak_flops": {d: significant(peak[d]) for d in DTYPES},
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


def _bytes(n: float) -> str:
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
             f"AdamW(foreach) over {opt['params'] / 1e6:.3g} M fp32 params",
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
    out.append(f"\noptimizer: clip_grad_norm_ + AdamW(foreach) over {opt['params'] / 1e6:.3g} M fp32 params in "
               f"{opt['tensors']} tensors: {_si(opt['seconds'], 's')} -> effective "
               f"{c.profile['memory_bandwidth_gbps']} GB/s")
    out.append(f"process memory: peak RSS at start {', '.join(f'{x:.3f}' for x in raw['rss_gib_by_rank'])} GiB by rank")
    if "overlap" in c.measured:
        o = c.measured["overlap"]
        out.append(f"overlap: GEMM block {_si(o['compute_s'], 's')}, all-gather {_bytes(o['bytes'])} "
                   f"{_si(o['comm_s'], 's')}, both {_si(o['both_s'], 's')} -> overlap {c.profile['overlap']}")
    if c.fit:
        n = raw["world_size"]
        out.append(f"\ncollectives ({raw['backend']}, {n} ranks): measured vs fitted "
                   f"time = a*{c.fit.latency_us:.1f} us + bytes_on_link / {c.fit.bandwidth_gbps:.3g} GB/s")
        out.append(f"  {'op':<15} {'bytes':>9} {'measured':>10} {'fitted':>10} {'error':>7} {'link GB/s':>10}")
        for r in raw["comm"]:
            pred = c.fit.predict(r["op"], r["bytes"], n)
            link = collective_terms(r["op"], r["bytes"], n)[1] / r["seconds"] / 1e9
            out.append(f"  {r['op']:<15} {_bytes(r['bytes']):>9} {_si(r['seconds'], 's'):>10} {_si(pred, 's'):>10} "
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
              quick: bool = False, stack: bool = True, echo: Callable[[str], None] = print) -> Calibration:
    ranks, base_name, path = check_args(device, ranks, base, out)
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
    echo(f"\nwrote {path} ({time.perf_counter() - started:.0f} s); use it with `cluster: {{hardware: {path}}}`")
    return c


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="omnigen calibrate worker (run by torchrun; see `omnigen calibrate`)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--result", required=True)
    args = parser.parse_args()
    worker(args.device, args.quick, args.result)
