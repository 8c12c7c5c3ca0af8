"""Layers that build their own attention mask (Doge's dynamic mask attention: a bias computed from the values,
dt_proj and a top-k keep window) cannot run under omnigen's attention (Ulysses, packed documents), which builds the
mask itself and would drop theirs: compile refuses them, asked of the model (a meta-device probe of the stack's
first attention call), and the generated attention function refuses at run time any mask the stack did not pass,
for models the probe cannot run. Normal models pass no mask there: tests/test_local_attention.py,
tests/test_token_types.py and the Ulysses cases of tests/test_distributed.py verify them with the check in place."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import transformers
import yaml

from omnigen import analyze, attention, hf, runner, zoo
from omnigen.errors import PlanError
from omnigen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
REASON = "DogeAttention ('model.layers.0.self_attn') builds its own attention mask inside the layer"


def doge_spec(tmp_path, sp=2, pack=1, name="doge"):
    spec = zoo.write_tiny(transformers.DogeForCausalLM, tmp_path / "doge",
                          cluster={"nodes": 1, "procs_per_node": 2, "device": "cpu", "hardware": "cpu"},
                          train={"seq_len": 64, "micro_batch_size": 1, "global_batch_size": 2, "steps": 2,
                                 "lr": 1e-3, "seed": 0, "precision": "fp32", "pack_documents": pack},
                          parallel={"dp_replicate": 1, "dp_shard": 2 // sp, "sp": sp, "ep": 1})
    spec["name"], spec["model"]["config"] = name, "doge"
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("sp,pack,asked", [(2, 1, "parallel.sp=2"), (1, 3, "train.pack_documents=3")])
def test_doge_is_refused_at_compile_with_the_reason(sp, pack, asked, tmp_path):
    path = doge_spec(tmp_path, sp, pack)
    done = subprocess.run([sys.executable, "-m", "omnigen.cli", "compile", str(path), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert asked in done.stderr and REASON in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out" / "train.py").exists()


def test_doge_without_omnigens_attention_compiles(tmp_path):
    """FSDP keeps the model's own attention (and its mask): nothing to refuse."""
    plan = runner.compile_to(load_spec(doge_spec(tmp_path, sp=1)), tmp_path / "out")
    assert plan.sequence_parallel is None


@pytest.mark.parametrize("name,config", [("DogeForCausalLM", "DogeConfig"), ("LlamaForCausalLM", "LlamaConfig")])
def test_the_probe_is_cheap_at_real_size_and_asks_the_model(name, config):
    """The released shapes (Doge-320M, Llama-2-7B defaults) on the meta device: only Doge's layer hands the attention
    function a mask of its own; the probe leaves the config's attention implementation as it found it."""
    model = hf.build_meta_model(getattr(transformers, name), getattr(transformers, config)())
    layers = model.model.layers
    attentions = [(f"model.layers.{i}.self_attn", layer.self_attn) for i, layer in enumerate(layers)]
    before = model.config._attn_implementation
    start = time.perf_counter()
    found = attention.mask_built_in_layer(model.model, attentions)
    assert time.perf_counter() - start < 1.0
    assert model.config._attn_implementation == before
    assert ("builds its own attention mask" in found) == (name == "DogeForCausalLM"), found


@pytest.mark.distributed
def test_the_run_time_check_stops_a_layer_mask_the_probe_missed(tmp_path, monkeypatch):
    """A model the probe cannot run (here: the probe switched off, so Doge compiles at sp=2) still cannot train
    another attention: the generated ulysses_attention raises naming the layer. Without that check the same script
    trains and deviates from the single-process reference (what the supported-models sweep found: sp FAIL)."""
    monkeypatch.setattr(attention, "mask_built_in_layer", lambda stack, modules: "")
    spec = load_spec(doge_spec(tmp_path, sp=2))
    assert analyze.analyze(spec).attention_refused == ""
    guarded = tmp_path / "guarded"
    runner.compile_to(spec, guarded)
    assert runner.run_script(spec, guarded, 2) is None
    log = (guarded / "run.log").read_text()
    assert "RuntimeError: DogeAttention (layer 0) builds its own 1x4x32x32 attention mask" in log, log[-2000:]

    unguarded = tmp_path / "unguarded"
    runner.compile_to(spec, unguarded)
    script = unguarded / "train.py"
    text = script.read_text()
    assert text.count("    check_attention_mask(module, attention_mask)\n") == 1
    script.write_text(text.replace("    check_attention_mask(module, attention_mask)\n", ""))
    trained = runner.run_script(spec, unguarded, 2)
    reference_dir = tmp_path / "reference"
    runner.compile_to(runner.reference_spec(spec), reference_dir)
    reference = runner.run_script(runner.reference_spec(spec), reference_dir, 2, single_process=True)
    assert trained is not None and reference is not None
    checks = {c.what: c for c in runner.compare(reference, trained, 2, runner.tolerances("fp32", False))}
    assert not checks["step-0 gradients"].ok, checks
