"""`omnigen calibrate`: the alpha-beta fit, the profile file it writes, and one quick measurement on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from omnigen.calibrate import (COLLECTIVES, Fit, analyse, collective_terms, fit_alpha_beta, profile_yaml, read_base,
                               read_measured)
from omnigen.cli import main
from omnigen.cost import all_gather_s, all_reduce_s, reduce_scatter_s
from omnigen.hardware import Link, load_profile
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

def fake_raw(memory_gib=None) -> dict:
    layer = {"hidden_size": 256, "layers": 2, "heads": 8, "kv_heads": 4, "seq_len": 512, "batch": 1,
             "intermediate_size": 704, "vocab_size": 1024}
    return {"world_size": 2, "threads": 1, "torch": "2.13.0+cpu", "backend": "gloo", "device_name": "Test CPU",
            "memory_gib": memory_gib, "measure_s": 12.0,
            "gemm": [{"dtype": d, "shape": [512, 256, 1024], "seconds": s, "flops": 2.0 * 512 * 256 * 1024}
                     for d, s in (("fp32", 4e-3), ("bf16", 8e-4))],
            "sdpa": [{"dtype": d, "shape": [1, 8, 1024, 64], "seconds": 0.1, "flops": 3 * 4.0 * 8 * 1024**2 * 64}
                     for d in ("fp32", "bf16")],
            "layer": [{"dtype": d, "seconds": s, "flops": 7e9, "config": layer}
                      for d, s in (("fp32", 0.25), ("bf16", 0.1))],
            "comm": [{"op": op, "bytes": b, "seconds": t} for op, b, t in synthetic(300e-6, 0.8e9, 2)]}


def test_profile_file_loads_and_keeps_base_fields(tmp_path):
    base = read_base("cpu")
    c = analyse(fake_raw(), "cpu", "cpu", base, name="box", quick=True, today="2030-01-02")
    path = tmp_path / "box.yaml"
    path.write_text(profile_yaml(c, "omnigen calibrate --quick"))
    hw = load_via_spec(path)
    assert hw.name == "box"
    assert hw.peak_flops["fp32"] == pytest.approx(2 * 512 * 256 * 1024 / 4e-3, rel=1e-3)
    assert hw.matmul_efficiency == pytest.approx(7e9 / 0.25 / hw.peak_flops["fp32"], rel=1e-2)
    assert hw.intra_node.latency_us == pytest.approx(300, rel=1e-3)
    assert hw.intra_node.bandwidth_gbps == pytest.approx(0.8, rel=1e-3)
    assert (hw.inter_node.bandwidth_gbps, hw.memory_gib, hw.overhead_gib) == \
        (base["inter_node"]["bandwidth_gbps"], base["memory_gib"], base["overhead_gib"])
    assert "2030-01-02" in hw.source and "torch 2.13.0+cpu" in hw.source and "Test CPU" in hw.source
    assert "kept from cpu: memory_gib, inter_node, overhead_gib" in hw.source
    measured = read_measured(path)
    assert measured["attention_flops"]["fp32"] == pytest.approx(3 * 4.0 * 8 * 1024**2 * 64 / 0.1, rel=1e-3)
    assert set(measured["collectives_us"]) == set(COLLECTIVES)
    # a live `measured:` key would not load: load_profile builds the dataclass from every top-level key
    data = yaml.safe_load(path.read_text())
    assert "measured" not in data


def test_cuda_run_records_device_memory():
    c = analyse(fake_raw(memory_gib=79.11), "cuda", "h100", read_base("h100"), name="gpu", quick=False)
    assert c.profile["memory_gib"] == 79.1 and "memory_gib" not in c.kept
    assert c.profile["matmul_efficiency"] == pytest.approx(7e9 / 0.1 / c.profile["peak_flops"]["bf16"], rel=1e-2)


# --- the command -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,message", [
    (["--ranks", "0"], "--ranks: must be at least 1"),
    (["--base", "tpu9"], "unknown profile 'tpu9'; built-in profiles: a100, cpu"),
    (["--base", "missing.yaml"], "profile file missing.yaml not found"),
    (["-o", "profile.txt"], "must end in .yaml"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["calibrate", "--quick", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert list(tmp_path.iterdir()) == []


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
    assert 0 < hw.matmul_efficiency <= 1.5
    assert hw.intra_node.bandwidth_gbps > 0 and hw.intra_node.latency_us >= 0
    assert hw.inter_node == Link(**read_base("cpu")["inter_node"])
    assert f"torch {torch.__version__}" in hw.source
    measured = read_measured(out)
    assert all(measured["attention_flops"][d] > 0 for d in ("fp32", "bf16"))
    assert len(measured["collectives_us"]["all_reduce"]) == 4
