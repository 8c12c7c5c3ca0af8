"""`omnigen calibrate`: the alpha-beta fit, the profile file it writes, and one quick measurement on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from omnigen.calibrate import format_summary, read_measured
from omnigen.calibrate_fit import (Fit, causal_block, collective_terms, fit_alpha_beta, fit_attention, fit_compute,
                                   llama_attention_flops, overlap_share)
from omnigen.calibrate_measure import cpu_cores
from omnigen.calibrate_profile import analyse, profile_yaml, read_base, with_stack
from omnigen.calibrate_stack import HOST_TERMS, RUNS, StackRun, calibration_spec, price, runs_on, write_configs
from omnigen.calibrate_stack import fit as fit_stack_runs
from omnigen.calibrate_worker import _slowest
from omnigen.cli import main
from omnigen.fitting import non_negative_least_squares
from omnigen.cost import OPTIMIZER_BYTES_PER_PARAM, all_gather_s, all_reduce_s, reduce_scatter_s
from omnigen.hardware import COLLECTIVES, Link, causal_share, load_profile
from omnigen.spec import spec_from_dict

ROOT = Path(__file__).resolve().parents[1]
SIZES = [4096 * 4**i for i in range(8)]


def load_via_spec(path: Path):
    spec = spec_from_dict({"name": "t", "model": {"config": str(ROOT / "specs/models/llama_tiny")},
                           "cluster": {"hardware": str(path.resolve())}}, "spec.yaml", "/")
    return load_profile(spec)


# --- the fit ---------------------------------------------------------------------------------------------------

def synthetic(latency_s: float, bandwidth: float, n: int, noise: float = 0.0) -> list[tuple[str, float, float]]:
    samples = []
    for i, (op, nbytes) in enumerate((op, b) for b in SIZES for op in COLLECTIVES):
        a, b = collective_terms(op, nbytes, n)
        wobble = noise * ((-1) ** i) * (1 + i % 3) / 3          # deterministic, zero-mean-ish, up to +-noise
        samples.append((op, nbytes, (a * latency_s + b / bandwidth) * (1 + wobble)))
    return samples


@pytest.mark.parametrize("n", [2, 4, 8])
def test_fit_recovers_known_latency_and_bandwidth(n):
    fit = fit_alpha_beta(synthetic(37e-6, 1.7e9, n), n)
    assert fit.latency_us == pytest.approx(37.0, rel=0.01)
    assert fit.bandwidth_gbps == pytest.approx(1.7, rel=0.01)
    assert fit.worst_error < 1 + 1e-9


def test_fit_tolerates_noise():
    fit = fit_alpha_beta(synthetic(250e-6, 0.9e9, 2, noise=0.005), 2)
    assert fit.latency_us == pytest.approx(250.0, rel=0.01)
    assert fit.bandwidth_gbps == pytest.approx(0.9, rel=0.01)


def test_fit_matches_cost_model_formulas():
    """The model fitted is the one cost.py evaluates: a fitted line predicts exactly what cost.py would."""
    link = Link(bandwidth_gbps=2.5, latency_us=40)
    fit = Fit(latency_s=link.latency_s, bandwidth_bytes_s=link.bytes_per_s, typical_error=1, worst_error=1)
    for n in (2, 8):
        assert fit.predict("all_gather", 1e6, n) == pytest.approx(all_gather_s(1e6, n, link))
        assert fit.predict("reduce_scatter", 1e6, n) == pytest.approx(reduce_scatter_s(1e6, n, link))
        assert fit.predict("all_reduce", 1e6, n) == pytest.approx(all_reduce_s(1e6, n, link))
        # Ulysses in cost.py: (n-1) latencies + the (n-1)/n of the buffer that leaves the rank, over the link
        assert fit.predict("all_to_all", 1e6, n) == pytest.approx((n - 1) * link.latency_s + 1e6 * (n - 1) / n / 2.5e9)


def test_fit_keeps_coefficients_non_negative():
    pure_bandwidth = [(op, b, collective_terms(op, b, 2)[1] / 1e9) for op in COLLECTIVES for b in SIZES]
    fit = fit_alpha_beta(pure_bandwidth, 2)
    assert fit.latency_s == 0 and fit.bandwidth_gbps == pytest.approx(1.0)
    pure_latency = [(op, b, collective_terms(op, b, 2)[0] * 1e-4) for op in COLLECTIVES for b in SIZES[:3]]
    fit = fit_alpha_beta(pure_latency, 2)
    assert fit.latency_us == pytest.approx(100.0) and fit.bandwidth_bytes_s > 0


# --- the file --------------------------------------------------------------------------------------------------

GEMM_FLOPS = 2.0 * 512 * 256 * 1024
PEAK = {"fp32": GEMM_FLOPS / 4e-3, "bf16": GEMM_FLOPS / 8e-4}
EFFICIENCY = {"fp32": 0.6, "bf16": 0.3}
ATTENTION_EFFICIENCY, CAUSAL_BLOCK = {"fp32": 0.4, "bf16": 0.2}, 256
LAYER_OVERHEAD_S, STEP_OVERHEAD_S = 150e-6, 2e-3
LLAMA_FLOPS, TINY_FLOPS = 7e9, (4e6, 10e6)     # tiny: embeddings/head + per layer, attention included
SDPA_SHAPE = [1, 8, 1024, 64]


def compute_s(flops: float, config: dict, layers: int, dtype: str, efficiency: float | None = None) -> float:
    """Matmuls at the matmul rate, causal attention at its own: the split cost.py makes."""
    attention = llama_attention_flops(config, layers)
    return ((flops - attention) / (PEAK[dtype] * (efficiency or EFFICIENCY[dtype]))
            + attention * causal_share(config["seq_len"], CAUSAL_BLOCK) / (PEAK[dtype] * ATTENTION_EFFICIENCY[dtype]))


def fake_sdpa() -> list[dict]:
    b, h, seq, d = SDPA_SHAPE
    flops = 3 * 4.0 * b * h * seq * seq * d
    return [{"dtype": dt, "shape": SDPA_SHAPE, "causal": causal, "flops": flops,
             "seconds": flops / (PEAK[dt] * ATTENTION_EFFICIENCY[dt]) * (causal_share(seq, CAUSAL_BLOCK) if causal
                                                                         else 1.0)}
            for dt in ("fp32", "bf16") for causal in (False, True)]


def fake_host(noise: float = 0.0, efficiency: float = EFFICIENCY["fp32"], layer_s: float = LAYER_OVERHEAD_S,
              step_s: float = STEP_OVERHEAD_S) -> list[dict]:
    """Tiny-Llama times as cost.py would predict them from known efficiency and host overhead, +- noise."""
    tiny = {"hidden_size": 64, "heads": 4, "kv_heads": 2, "seq_len": 32, "batch": 1, "vocab_size": 256}
    out = []
    for i, layers in enumerate((1, 2, 4, 8)):
        flops = TINY_FLOPS[0] + layers * TINY_FLOPS[1]
        t = compute_s(flops, tiny, layers, "fp32", efficiency) + 3 * layers * layer_s + step_s
        out.append({"layers": layers, "flops": flops, "dtype": "fp32", "seconds": t * (1 + noise * (-1) ** i),
                    "config": tiny})
    return out


def fake_layer(dtype: str, layer_s: float = LAYER_OVERHEAD_S, step_s: float = STEP_OVERHEAD_S,
               slow_rank: float = 1.0) -> dict:
    """The real Llama's (step seconds, GEMM rate) pairs: the machine's speed drifts, the paired ratio does not."""
    config = {"hidden_size": 256, "layers": 2, "heads": 8, "kv_heads": 4, "seq_len": 512, "batch": 1,
              "intermediate_size": 704, "vocab_size": 1024}
    host = 3 * config["layers"] * layer_s + step_s
    attention = llama_attention_flops(config)
    attention_s = compute_s(attention, config, config["layers"], dtype)   # all attention: its time alone
    pairs = [[(LLAMA_FLOPS - attention) / (PEAK[dtype] * f * EFFICIENCY[dtype]) + attention_s + host, PEAK[dtype] * f]
             for f in (1.0, 0.8, 1.1)]
    return {"dtype": dtype, "seconds": sorted(t for t, _ in pairs)[1], "flops": LLAMA_FLOPS, "config": config,
            "pairs_by_rank": [pairs, [[t * slow_rank, g] for t, g in pairs]]}


def fake_raw(memory_gib=None, world_size=2) -> dict:
    return {"world_size": world_size, "threads": 1, "torch": "2.13.0+cpu", "backend": "gloo",
            "device_name": "Test CPU", "memory_gib": memory_gib, "measure_s": 12.0,
            "rss_gib": 0.41, "rss_gib_by_rank": [0.4, 0.41],
            "gemm": [{"dtype": d, "shape": [512, 256, 1024], "seconds": GEMM_FLOPS / PEAK[d], "flops": GEMM_FLOPS}
                     for d in ("fp32", "bf16")],
            "sdpa": fake_sdpa(),
            "layer": [fake_layer(d) for d in ("fp32", "bf16")],
            "host": fake_host(),
            "optimizer": [{"params": 3_000_000, "tensors": 36, "seconds": 0.03}],
            "overlap": [{"what": w, "bytes": 64 * 2**20, "gemm": [512, 256, 1024], "gemm_calls": 25, "dtype": "fp32",
                         "seconds": s} for w, s in (("compute", 0.1), ("comm", 0.1), ("both", 0.15))]
            if world_size > 1 else [],
            "comm": [{"op": op, "bytes": b, "seconds": t} for op, b, t in synthetic(300e-6, 0.8e9, 2)]
            if world_size > 1 else []}


def attention_fit():
    return fit_attention(fake_sdpa(), PEAK, "fp32")


def test_attention_fit_recovers_efficiency_and_causal_block():
    fit = attention_fit()
    assert fit.efficiency == pytest.approx(ATTENTION_EFFICIENCY, rel=1e-9)
    assert fit.causal_block == CAUSAL_BLOCK and fit.causal_ratio == pytest.approx(5 / 8)   # 4 blocks a side
    assert causal_block(0.95, 1024) == 0            # a kernel that skips nothing: none modelled
    assert causal_block(0.5, 4096) == 1             # as fine as the ratio can say
    assert causal_block(0.75 * 1.03, 1024) == 512   # noise rounds to the nearest power of two


def test_compute_fit_recovers_efficiency_and_host_overhead():
    """Both unknowns at once: the tiny models need the efficiency, the real one the host overhead."""
    raw = fake_raw()
    fit = fit_compute(raw["layer"], raw["host"], PEAK, "fp32", attention_fit())
    assert fit.layer_overhead_s == pytest.approx(LAYER_OVERHEAD_S, rel=1e-3)
    assert fit.step_overhead_s == pytest.approx(STEP_OVERHEAD_S, rel=1e-3)
    assert fit.efficiency["fp32"] == pytest.approx(EFFICIENCY["fp32"], rel=1e-3)
    assert fit.efficiency["bf16"] == pytest.approx(EFFICIENCY["bf16"], rel=1e-3)
    assert fit.with_host["fp32"] < fit.efficiency["fp32"]
    for r in raw["host"]:         # the fitted model reproduces the tiny steps it was fitted to
        assert fit.predict(r["flops"], r["config"], r["layers"], PEAK["fp32"], "fp32") == pytest.approx(r["seconds"],
                                                                                                      rel=1e-3)
    # a rank 10% slower on the real Llama sets the efficiency: a step waits for it
    slow = fit_compute([fake_layer(d, slow_rank=1.1) for d in ("fp32", "bf16")], raw["host"], PEAK, "fp32",
                       attention_fit())
    assert slow.efficiency["fp32"] < 0.93 * EFFICIENCY["fp32"]


def test_compute_fit_tolerates_noise_and_clamps_at_zero():
    raw = fake_raw()
    noisy = fit_compute(raw["layer"], fake_host(noise=0.03), PEAK, "fp32", attention_fit())
    assert noisy.layer_overhead_s == pytest.approx(LAYER_OVERHEAD_S, rel=0.15)
    assert noisy.efficiency["fp32"] == pytest.approx(EFFICIENCY["fp32"], rel=0.02)
    # no host overhead at all: nothing negative, the efficiency is the plain paired ratio
    layers = [fake_layer(d, layer_s=0.0, step_s=0.0) for d in ("fp32", "bf16")]
    none = fit_compute(layers, fake_host(layer_s=0.0, step_s=0.0), PEAK, "fp32", attention_fit())
    assert none.layer_overhead_s == pytest.approx(0.0, abs=1e-9) and none.step_overhead_s >= 0
    assert none.efficiency["fp32"] == pytest.approx(EFFICIENCY["fp32"], rel=1e-3)
    # tiny steps faster than their FLOPs allow (too-high efficiency elsewhere): clamped, not negative
    fast = fit_compute(layers, fake_host(efficiency=5.0, layer_s=0.0, step_s=0.0), PEAK, "fp32", attention_fit())
    assert fast.layer_overhead_s == 0 and fast.step_overhead_s == 0


def test_overlap_share():
    assert overlap_share(0.1, 0.1, 0.15) == pytest.approx(0.5)
    assert overlap_share(0.1, 0.1, 0.1) == 1.0                 # the collective hid entirely
    assert overlap_share(0.1, 0.1, 0.25) == 0.0                # together slower than apart: no overlap, not negative


def test_slowest_keeps_every_ranks_pairs():
    per_rank = [[{"seconds": 1.0, "pairs": [[1.0, 5.0]]}], [{"seconds": 2.0, "pairs": [[2.0, 4.0]]}]]
    merged = _slowest(per_rank)[0]
    assert merged["seconds"] == 2.0 and merged["pairs_by_rank"] == [[[1.0, 5.0]], [[2.0, 4.0]]]
    assert "pairs" not in merged and per_rank[0][0]["pairs"] == [[1.0, 5.0]]


def test_profile_file_loads_and_keeps_base_fields(tmp_path):
    base = read_base("cpu")
    c = analyse(fake_raw(), "cpu", "cpu", base, name="box", quick=True, today="2030-01-02")
    path = tmp_path / "box.yaml"
    path.write_text(profile_yaml(c, "omnigen calibrate --quick"))
    hw = load_via_spec(path)
    assert hw.name == "box" and hw.measured_on == f"Test CPU, {cpu_cores()} cores, 2 CPU ranks"
    assert hw.peak_flops["fp32"] == pytest.approx(PEAK["fp32"], rel=1e-3)
    assert hw.efficiency("fp32") == pytest.approx(EFFICIENCY["fp32"], rel=1e-2)
    assert hw.efficiency("bf16") == pytest.approx(EFFICIENCY["bf16"], rel=1e-2)
    assert hw.attention_flops("fp32") == pytest.approx(PEAK["fp32"] * ATTENTION_EFFICIENCY["fp32"], rel=1e-2)
    assert hw.causal_block == CAUSAL_BLOCK
    assert hw.layer_overhead_us == pytest.approx(150, rel=1e-2)
    assert hw.step_overhead_ms == pytest.approx(2.0, rel=1e-2)
    # cost.py's optimizer term with this bandwidth gives back the measured step
    assert OPTIMIZER_BYTES_PER_PARAM * 3e6 / (hw.memory_bandwidth_gbps * 1e9) == pytest.approx(0.03, rel=1e-2)
    assert hw.overlap == pytest.approx(0.5)
    assert hw.overhead_gib == pytest.approx(0.41)
    assert hw.intra_node.latency_us == pytest.approx(300, rel=1e-3)
    assert hw.intra_node.bandwidth_gbps == pytest.approx(0.8, rel=1e-3)
    # each collective's samples alone lie on the same line here
    for op in COLLECTIVES:
        assert (getattr(hw, op).latency_us, getattr(hw, op).bandwidth_gbps) == pytest.approx((300, 0.8), rel=1e-3)
    assert (hw.inter_node.bandwidth_gbps, hw.memory_gib) == (base["inter_node"]["bandwidth_gbps"], base["memory_gib"])
    assert "2030-01-02" in hw.source and "torch 2.13.0+cpu" in hw.source and "Test CPU" in hw.source
    assert "kept from cpu: memory_gib, inter_node" in hw.source and "overhead_gib = peak RSS" in hw.source
    measured = read_measured(path)
    assert measured["attention_flops"]["fp32"] == pytest.approx(PEAK["fp32"] * ATTENTION_EFFICIENCY["fp32"], rel=1e-3)
    assert measured["causal_time_ratio"] == pytest.approx(5 / 8, rel=1e-3)
    assert set(measured["collectives_us"]) == set(COLLECTIVES)
    assert measured["host"]["layers"] == [1, 2, 4, 8] and measured["overlap"]["both_s"] == 0.15
    assert measured["rss_gib_by_rank"] == [0.4, 0.41]
    # a live `measured:` key would not load: load_profile builds the dataclass from every top-level key
    data = yaml.safe_load(path.read_text())
    assert "measured" not in data


def test_one_rank_keeps_overlap_and_link():
    c = analyse(fake_raw(world_size=1), "cpu", "cpu", read_base("cpu"), name="one", quick=True)
    assert c.profile["overlap"] == 0.8 and {"overlap", "intra_node"} <= set(c.kept)   # HardwareProfile's default
    assert not set(COLLECTIVES) & set(c.profile)
    assert "one rank: no communication measured" in c.profile["source"]
    assert c.profile["layer_overhead_us"] == pytest.approx(150, rel=1e-2)
    assert c.profile["measured_on"] == f"Test CPU, {cpu_cores()} cores, 1 CPU rank"

def test_cuda_run_records_device_memory():
    c = analyse(fake_raw(memory_gib=79.11), "cuda", "h100", read_base("h100"), name="gpu", quick=False)
    assert c.profile["memory_gib"] == 79.1 and "memory_gib" not in c.kept
    assert c.profile["matmul_efficiency"]["bf16"] == pytest.approx(EFFICIENCY["bf16"], rel=1e-2)
    # host RSS does not see the device: overhead_gib stays the base profile's
    assert c.profile["overhead_gib"] == read_base("h100")["overhead_gib"] and "overhead_gib" in c.kept


# --- the command -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--ranks", "0"], "--ranks: must be at least 1"),
    (["--base", "tpu9"], "unknown profile 'tpu9'; built-in profiles: a100, cpu"),
    (["--base", "missing.yaml"], "profile file missing.yaml not found"),
    (["-o", "profile.txt"], "must end in .yaml"),
    (["--cache", "-o", "profile.yaml"], "--cache: writes this machine's CPU fit"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["calibrate", "--quick", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


def test_cache_writes_where_plan_run_and_bench_look(tmp_path, monkeypatch):
    from omnigen import machine
    from omnigen.calibrate import check_args
    monkeypatch.setenv("OMNIGEN_CACHE_DIR", str(tmp_path))
    ranks, base, path = check_args("cpu", 4, None, None, cache=True)
    assert (ranks, base) == (4, "cpu") and path == machine.cached_profile_path(4)
    assert path.parent == tmp_path / "profiles" and path.stem.endswith("cores_4ranks")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_user_error():
    result = CliRunner().invoke(main, ["calibrate", "--device", "cuda"])
    assert result.exit_code == 2 and "no CUDA device" in result.output


@pytest.mark.distributed
def test_quick_calibration_on_this_machine(tmp_path):
    out = tmp_path / "tmp" / "profile.yaml"
    result = CliRunner().invoke(main, ["calibrate", "--quick", "--ranks", "2", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "pooled fit" in result.output and "all_to_all" in result.output
    hw = load_via_spec(out)
    assert 1e8 < hw.peak_flops["fp32"] < 1e13
    assert 1e8 < hw.peak_flops["bf16"] < 1e14
    assert all(0 < hw.efficiency(d) <= 1.5 for d in ("fp32", "bf16"))
    assert hw.layer_overhead_us > 0 and hw.step_overhead_ms >= 0 and hw.memory_bandwidth_gbps > 0
    assert 0 <= hw.overlap <= 1 and 0.1 < hw.overhead_gib < 2
    assert hw.intra_node.bandwidth_gbps > 0 and hw.intra_node.latency_us >= 0
    assert hw.inter_node == Link(**read_base("cpu")["inter_node"])
    assert f"torch {torch.__version__}" in hw.source
    measured = read_measured(out)
    assert all(measured["attention_flops"][d] > 0 for d in ("fp32", "bf16"))
    assert len(measured["collectives_us"]["all_reduce"]) == 4
    # the host terms were refitted on generated train.py runs
    assert "generated train.py runs" in result.output and len(measured["stack"]) == 8
    assert min(hw.collective_hop_overhead_us, hw.fsdp_call_overhead_us, hw.optimizer_tensor_us) >= 0
    assert all(r["forward_backward_s"]["measured"] > 0 for r in measured["stack"])


# --- the host terms, refitted on generated scripts ------------------------------------------------------------

KNOWN_TERMS = {"layer_overhead_us": 900.0, "step_overhead_ms": 1.5, "collective_hop_overhead_us": 600.0,
               "fsdp_call_overhead_us": 700.0, "local_expert_overhead_us": 2000.0, "optimizer_tensor_us": 120.0,
               "all_to_all_hop_overhead_us": 300.0, "vision_tower_overhead_ms": 4.0, "audio_tower_overhead_ms": 6.0}


def priced_runs(tmp_path, terms: dict[str, float], noise: float = 0.0) -> list[StackRun]:
    """The calibration runs as the cost model prices them, 'measured' as what the known terms add (+- noise)."""
    write_configs(tmp_path)
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump({**read_base("cpu"), **{t: 0.0 for t in HOST_TERMS}}))
    runs = []
    for i, run in enumerate(r for r in RUNS if runs_on(r, 2)):
        spec = calibration_spec(tmp_path, profile, "cpu", 2, run)
        rest, features = price(spec)
        wobble = 1 + noise * (-1) ** i
        measured = {k: (rest[k] + sum(terms[t] * features[t][k] for t in HOST_TERMS)) * wobble
                    for k in ("forward_backward_s", "optimizer_s")}
        measured["peak_memory_bytes"] = rest["peak_memory_bytes"] + 0.4 * 2**30
        runs.append(StackRun(run, spec.parallel.model_dump(), measured, rest, features))
    return runs


def test_stack_fit_recovers_known_host_terms(tmp_path):
    fit = fit_stack_runs(priced_runs(tmp_path, KNOWN_TERMS))
    assert fit.terms == pytest.approx(KNOWN_TERMS, rel=1e-2)
    assert fit.overhead_gib == pytest.approx(0.4, rel=1e-2)
    # every term moves differently across the runs: layers, checkpointing and tensors are told apart
    runs = priced_runs(tmp_path, KNOWN_TERMS)
    full, none = (next(r for r in runs if r.shape == ("llama", 4, ac, False, False, False)) for ac in ("full", "none"))
    ulysses = next(r for r in runs if r.shape.ulysses)
    assert all(r.features["local_expert_overhead_us"]["forward_backward_s"] == 0 for r in runs
               if not r.shape.expert_parallel)
    assert none.features["all_to_all_hop_overhead_us"]["forward_backward_s"] == 0 < ulysses.features[
        "all_to_all_hop_overhead_us"]["forward_backward_s"]
    assert all((r.features["vision_tower_overhead_ms"]["forward_backward_s"] > 0) == (r.shape.model in ("vl", "omni"))
               for r in runs)
    assert all((r.features["audio_tower_overhead_ms"]["forward_backward_s"] > 0) == (r.shape.model == "omni")
               for r in runs)
    hsdp = next(r for r in runs if r.shape.hsdp)  # two replicas on 2 ranks: no gathers, one all-reduce per unit
    assert (hsdp.mesh["dp_replicate"], hsdp.mesh["dp_shard"]) == (2, 1)
    assert full.features["layer_overhead_us"]["forward_backward_s"] > none.features["layer_overhead_us"][
        "forward_backward_s"]
    assert full.features["collective_hop_overhead_us"] == none.features["collective_hop_overhead_us"]
    assert none.features["optimizer_tensor_us"]["optimizer_s"] > runs[0].features["optimizer_tensor_us"]["optimizer_s"]


def test_stack_fit_tolerates_noise_and_keeps_terms_non_negative(tmp_path):
    fit = fit_stack_runs(priced_runs(tmp_path, KNOWN_TERMS, noise=0.05))
    for r in fit.runs:  # the fit explains every run about as well as the noise allows...
        for key in ("forward_backward_s", "optimizer_s"):
            assert fit.predicted(r, key) == pytest.approx(r.measured[key], rel=0.1)
    for term in ("layer_overhead_us", "optimizer_tensor_us"):  # ...and finds the best-determined terms
        assert fit.terms[term] == pytest.approx(KNOWN_TERMS[term], rel=0.5)
    no_tensor_cost = {**KNOWN_TERMS, "optimizer_tensor_us": 0.0}
    runs = priced_runs(tmp_path, no_tensor_cost)
    for r in runs:  # optimizer steps faster than its collectives alone: the tensor term would go negative
        r.measured["optimizer_s"] = 1e-4 + r.rest["optimizer_s"]
    fit = fit_stack_runs(runs)
    assert all(v >= 0 for v in fit.terms.values()) and fit.terms["optimizer_tensor_us"] < 5  # not 120


def test_non_negative_least_squares():
    assert non_negative_least_squares([[1, 0], [0, 1], [1, 1]], [2, 3, 5]) == pytest.approx([2, 3])
    assert non_negative_least_squares([[1, 0], [0, 1]], [2, -3]) == pytest.approx([2, 0])


def test_refitted_profile_file_loads(tmp_path):
    c = analyse(fake_raw(), "cpu", "cpu", read_base("cpu"), name="box", quick=True, today="2030-01-02")
    assert c.profile["collective_hop_overhead_us"] == 0 and c.profile["optimizer_tensor_us"] == 0
    c = with_stack(c, fit_stack_runs(priced_runs(tmp_path, KNOWN_TERMS)), "cpu")
    path = tmp_path / "box.yaml"
    path.write_text(profile_yaml(c, "omnigen calibrate --quick"))
    hw = load_via_spec(path)
    assert hw.collective_hop_overhead_us == pytest.approx(600, rel=1e-2)
    assert hw.fsdp_call_overhead_us == pytest.approx(700, rel=1e-2)
    assert hw.local_expert_overhead_us == pytest.approx(2000, rel=1e-2)
    assert hw.optimizer_tensor_us == pytest.approx(120, rel=1e-2)
    assert hw.layer_overhead_us == pytest.approx(900, rel=1e-2) and hw.overhead_gib == pytest.approx(0.4, rel=1e-2)
    assert "non-negative least squares" in hw.source and "generated train.py" in hw.source
    stack = read_measured(path)["stack"]
    assert [(r["model"], r["layers"], r["checkpointing"], r["sp"] > 1, r["ep"] > 1, r["dp_replicate"] > 1)
            for r in stack] == [r for r in RUNS if runs_on(r, 2)]
    assert all(r["forward_backward_s"]["fitted"] == pytest.approx(r["forward_backward_s"]["measured"], rel=1e-2)
               for r in stack)
    assert "generated train.py runs" in format_summary(c)
