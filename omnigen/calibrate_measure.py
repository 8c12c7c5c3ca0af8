"""What `omnigen calibrate` measures on every rank, at once, as ranks of a training job share the machine.

  compute        median FLOP/s of transformer-shaped GEMMs (tokens x h x 4h) per dtype; the best shape is `peak_flops`
  efficiency     fwd+bwd of a real LlamaForCausalLM stack, each step paired with a block of the best GEMM timed just
                 before it (calibrate_fit turns the pairs into matmul_efficiency)
  host overhead  fwd+bwd of tiny Llamas at a few layer counts, timed round-robin
  optimizer      clip_grad_norm_ + AdamW(fused, as the generated scripts) over model-shaped fp32 parameters
  attention      fwd+bwd SDPA at a long-ish sequence, whole and causal
  collectives    all_gather_into_tensor, reduce_scatter_tensor, all_reduce, all_to_all_single from 4 KiB to 64 MiB
  overlap        a GEMM block, an all-gather of about the same length, and both at once (async all-gather)
Each function returns plain records (dtype, shape, seconds, FLOPs); torch is imported inside them, so the driver and
the fits load without it. calibrate_worker runs them under torchrun and merges the ranks' records.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .hardware import COLLECTIVES

DTYPES = ("fp32", "bf16")


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


# --- timing and the micro-benchmarks (torch is imported inside each) -----------------------------------------

def timer(device: str) -> Callable[[], float]:
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
    """clip_grad_norm_ + AdamW(fused) step over fp32 parameters shaped like Llama layers, after a warm-up step
    (which allocates the optimizer state); grads stay as they are between steps."""
    import torch
    h, layers = s.optimizer
    inter = int(8 * h / 3 + 63) // 64 * 64
    shapes = [(h, h)] * 4 + [(inter, h)] * 3 + [(h,)] * 2      # q k v o, gate up down, two norms
    torch.manual_seed(0)
    params = [torch.nn.Parameter(0.02 * torch.randn(shape, device=dev)) for _ in range(layers) for shape in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

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


# --- what this machine is --------------------------------------------------------------------------------------

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
