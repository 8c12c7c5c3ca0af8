"""The models `omnigen calibrate` fits to its measurements (pure: no torch, no I/O); cost.py uses the same terms.

The alpha-beta link is fitted by least squares in log ratio; compute efficiency jointly with the host overhead, so that
  time = matmul FLOPs / (peak x efficiency) + attention + 3 x layers x layer_overhead + step_overhead
reproduces both the tiny Llamas and the real one.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Callable

from .fitting import non_negative_least_squares
from .hardware import causal_share


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
