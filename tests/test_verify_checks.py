"""verify can neither cry wolf nor be fooled.

Real runs, not mocks: a spec is compiled, the generated train.py is run under torchrun next to the single-process
reference, and runner.compare judges the dumps. A planted bug is a few lines edited into the generated script (each
marked PLANTED), the way a template bug would put them there; each must fail a check. Correct scripts must pass at
lr 1e-3 and 1e-2 over 10 steps, where AdamW turns rounding noise on near-zero gradients into whole +-lr steps (the
absolute parameter tolerance verify used before failed such a script). The CI subset shares one reference run; the
10-step sweep is marked slow (pytest --slow).
"""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from omnigen import runner
from omnigen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.distributed
STEPS = 2
# llama_tiny's data and global batch (4 sequences) under sp=2: the same single-process reference as dp_shard=2.
SP2_SAME_BATCH = ("train.global_batch_size=4",)


def spec(name, sets=()):
    return load_spec(ROOT / "specs" / f"{name}.yaml", list(sets))


def run(s, folder, steps, plants=(), single_process=False):
    """Compile `s` into `folder`, make the planted edits (old text, new text), run it; the Run it dumped."""
    runner.compile_to(runner.reference_spec(s) if single_process else s, folder)
    script = folder / "train.py"
    for old, new in plants:
        text = script.read_text()
        assert text.count(old) == 1, f"the planted bug's anchor is not in the script once: {old!r}"
        script.write_text(text.replace(old, new))
    result = runner.run_script(s, folder, steps, single_process=single_process)
    assert result is not None, f"{script} failed"
    return result


def checks(ref, par, steps, precision="fp32", routed_experts=False):
    found = {c.what: c for c in runner.compare(ref, par, steps, runner.tolerances(precision, routed_experts))}
    print({what: f"{c.worst:.2e}" + ("" if c.ok else " FAIL") for what, c in found.items()})
    return found


def failing_tensors(ref, par):
    """Per tensor, the step-0 gradients that fail their check, with their relative deviations."""
    tol = runner.TOLERANCES["fp32"].grad
    return {d.name: d.rel for d in runner.tensor_deviations(ref.grads, par.grads) if d.rel > tol}


@pytest.fixture(scope="module")
def llama_reference(tmp_path_factory):
    return run(spec("llama_tiny"), tmp_path_factory.mktemp("reference"), STEPS, single_process=True)


# Planted bugs: (text in the generated script, what it becomes). Each edit before the gradient dump goes in front of
# this line of the training loop.
AFTER_BACKWARD = "        if args.dump_grads and step == start_step:\n"
ROOT_FSDP = '    fully_shard(model, mesh=mesh["dp_shard"], reshard_after_forward=False, mp_policy=MIXED_PRECISION)\n'
GRADIENT_BUGS = {
    # A scale bug in one layer (a divide factor applied twice, say): AdamW's update is blind to it, the gradient is not.
    "one layer's gradient x 1.01": ([f"model.layers.1.{p}" for p in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
        "post_attention_layernorm.weight")], (AFTER_BACKWARD, (
            "        for p in model.model.layers[1].parameters():  # PLANTED: this layer's gradient 1% too large\n"
            "            p.grad.mul_(1.01)\n" + AFTER_BACKWARD))),
    # A missing reduction on a small tensor: the final norm in its own FSDP unit on a one-rank mesh, so its gradient
    # is this rank's alone, never summed over the DP ranks.
    "the final norm's gradient not summed over DP": (["model.norm.weight"], (ROOT_FSDP, (
        '    alone = init_device_mesh(mesh.device_type, (mesh.size(), 1), mesh_dim_names=("dp", "alone"))["alone"]\n'
        "    fully_shard(model.model.norm, mesh=alone, mp_policy=MIXED_PRECISION)  # PLANTED: a unit of one rank\n"
        + ROOT_FSDP))),
    # Two rows of one rank's gradient shard swapped: the global gradient norm cannot see it.
    "two rows of a gradient shard swapped": (["model.layers.0.mlp.down_proj.weight"], (AFTER_BACKWARD, (
        "        if rank == 1:  # PLANTED: two rows of this rank's gradient shard swapped\n"
        "            shard = model.model.layers[0].mlp.down_proj.weight.grad.to_local()\n"
        "            shard[[0, 1]] = shard[[1, 0]]\n" + AFTER_BACKWARD))),
}
# A layout bug in placing weights: rank 1's first row of one shard holds its second row.
WRONG_ROW_OF_A_SHARD = ("    model = apply_fsdp(model, mesh)\n", (
    "    model = apply_fsdp(model, mesh)\n"
    "    if rank == 1:  # PLANTED: one row of this rank's shard loaded from the wrong place\n"
    "        with torch.no_grad():\n"
    "            shard = model.model.layers[0].self_attn.o_proj.weight.to_local()\n"
    "            shard[0] = shard[1]\n"))
# Ulysses attention with an off-by-one causal mask: every token also sees the next one.
SP_MASK_OFF_BY_ONE = ("    mask = None if document_ids is None else document_causal_mask(document_ids)\n",
                      "    mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool).tril(1)  # PLANTED\n")


def test_the_correct_script_passes_every_check(llama_reference, tmp_path):
    found = checks(llama_reference, run(spec("llama_tiny"), tmp_path, STEPS), STEPS)
    assert all(c.ok for c in found.values())
    assert found["initial parameters"].worst == 0  # same seed, same weights: bit for bit


def test_gradient_bugs_are_caught_in_exactly_their_tensors(llama_reference, tmp_path):
    """The three bugs touch only their own tensors' step-0 gradients (forward and backward stay right), so one run
    holds them all: the gradient check flags exactly those tensors, each far beyond tolerance, and nothing else."""
    par = run(spec("llama_tiny"), tmp_path, STEPS, [plant for _, plant in GRADIENT_BUGS.values()])
    flagged = failing_tensors(llama_reference, par)
    for bug, (tensors, _) in GRADIENT_BUGS.items():
        print(f"{bug}: {', '.join(f'{flagged.get(t, 0):.2e}' for t in tensors)}")
    assert set(flagged) == {t for tensors, _ in GRADIENT_BUGS.values() for t in tensors}
    assert min(flagged.values()) > 10 * runner.TOLERANCES["fp32"].grad
    assert not checks(llama_reference, par, STEPS)["step-0 gradients"].ok


@pytest.mark.slow
@pytest.mark.parametrize("bug", list(GRADIENT_BUGS))
def test_each_gradient_bug_alone_fails(bug, llama_reference, tmp_path):
    tensors, plant = GRADIENT_BUGS[bug]
    par = run(spec("llama_tiny"), tmp_path, STEPS, [plant])
    assert set(failing_tensors(llama_reference, par)) == set(tensors)
    assert not checks(llama_reference, par, STEPS)["step-0 gradients"].ok


def test_a_wrong_row_of_a_shard_fails_the_initial_parameters(llama_reference, tmp_path):
    found = checks(llama_reference, run(spec("llama_tiny"), tmp_path, STEPS, [WRONG_ROW_OF_A_SHARD]), STEPS)
    assert not found["initial parameters"].ok
    assert found["initial parameters"].worst_tensors[0].name == "model.layers.0.self_attn.o_proj.weight"


def test_a_wrong_mask_under_sp_fails(llama_reference, tmp_path):
    found = checks(llama_reference, run(spec("llama_tiny_sp2", SP2_SAME_BATCH), tmp_path, STEPS, [SP_MASK_OFF_BY_ONE]),
                   STEPS)
    assert not found["step-0 loss, grad norm"].ok and not found["step-0 gradients"].ok
    assert found["initial parameters"].worst == 0


def test_compare_fails_on_missing_steps_names_shapes_and_nan():
    t = {"w": torch.ones(4, 2), "b": torch.ones(2)}
    metrics = [{"step": 0, "loss": 2.0, "grad_norm": 1.0}, {"step": 1, "loss": 1.9, "grad_norm": 0.9}]
    ref = runner.Run(metrics, t, t, {k: v + 0.1 for k, v in t.items()})

    def failed(**changes):
        return {c.what for c in runner.compare(ref, replace(ref, **changes), 2, runner.TOLERANCES["fp32"]) if not c.ok}

    assert failed() == set()
    assert failed(metrics=metrics[:1]) == {"steps run"}
    assert failed(metrics=[{**metrics[0], "grad_norm": 1.00002}, metrics[1]]) == {"step-0 loss, grad norm"}
    assert failed(metrics=[metrics[0], {**metrics[1], "loss": math.nan}]) == {"later losses, grad norms"}
    assert failed(initial={**t, "b": torch.tensor([1.0, 1.0 + 1e-5])}) == {"initial parameters"}
    assert failed(grads={"w": t["w"]}) == {"step-0 gradients"}
    assert failed(grads={**t, "b": torch.ones(3)}) == {"step-0 gradients"}
    assert failed(grads={**t, "b": torch.tensor([1.0, math.nan])}) == {"step-0 gradients"}
    assert failed(final={**ref.final, "b": ref.final["b"] + 0.01}) == {"parameter updates"}


def test_a_vanishing_gradient_is_judged_against_the_floor():
    """Rounding noise on a gradient that is ~0 next to the model's is not a 100% relative error."""
    t = {"w": torch.ones(4, 2), "b": torch.ones(2)}
    grads = {**t, "b": torch.full((2,), 1e-12)}
    ref = runner.Run([], t, grads, t)
    found = runner.compare(ref, replace(ref, grads={**t, "b": torch.zeros(2)}), 0, runner.TOLERANCES["fp32"])
    assert all(c.ok for c in found)


# --- 10 steps at lr 1e-3 and 1e-2: no false alarm (slow) -------------------------------------------------------

CORRECT = {  # spec, --set overrides, whether the model routes tokens to experts
    "llama_dp2": ("llama_tiny", (), False),
    "llama_h128_dp2": ("llama_tiny", ("model.overrides.hidden_size=128",), False),  # the case that cried wolf
    "llama_sp2": ("llama_tiny_sp2", (), False),
    "qwen3_moe_ep2": ("qwen3_moe_tiny_ep2", (), True),
    "qwen2_vl_dp2_sp2_noimage": ("qwen2_vl_tiny_dp2_sp2_noimage", (), False),  # 4 ranks; the widest dense parting
}


@pytest.mark.slow
@pytest.mark.parametrize("lr", ["1e-3", "1e-2"])
@pytest.mark.parametrize("case", list(CORRECT))
def test_correct_scripts_pass_over_ten_steps(case, lr, tmp_path):
    name, sets, routed = CORRECT[case]
    s = spec(name, [*sets, f"train.lr={lr}", "train.steps=10"])
    found = checks(run(s, tmp_path / "reference", 10, single_process=True), run(s, tmp_path / "parallel", 10), 10,
                   routed_experts=routed)
    assert all(c.ok for c in found.values())


def test_dropout_is_off_in_both_verify_runs(tmp_path):
    """One process and N ranks draw different dropout masks for the same samples: verify zeroes every dropout and
    drop-path rate (nested configs too) in both runs' config.json, and says which."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"attention_dropout": 0.2, "use_dropout": True, "hidden_size": 64,
                                  "vision_config": {"drop_path_rate": 0.1, "dropout": 0.0}}))
    assert runner.dropout_off(config) == ["attention_dropout 0.2", "vision_config.drop_path_rate 0.1"]
    assert json.loads(config.read_text()) == {"attention_dropout": 0.0, "use_dropout": True, "hidden_size": 64,
                                              "vision_config": {"drop_path_rate": 0.0, "dropout": 0.0}}


@pytest.mark.distributed
def test_verify_passes_on_a_model_with_dropout(tmp_path):
    spec = load_spec(ROOT / "specs" / "llama_tiny.yaml", ["model.overrides.attention_dropout=0.2"])
    assert runner.verify(spec, steps=2, workdir=str(tmp_path)) == 0


def test_a_model_random_in_training_is_reported_as_not_comparable(tmp_path):
    """Phi-MoE's router samples its experts in training (sparsemixer), which no config turns off: one process and
    2 ranks draw differently and verify cannot match them. The probe tells it from a deterministic model (the tiny
    Llama with dropout in its config, which verify turns off), and verify says so under its MISMATCH."""
    import transformers

    from omnigen import zoo
    from omnigen.spec import spec_from_dict

    llama = tmp_path / "llama"
    runner.compile_to(spec("llama_tiny", ["model.overrides.attention_dropout=0.2"]), llama)
    runner.dropout_off(llama / "config.json")
    assert not runner.random_in_training(llama)
    raw = zoo.write_tiny(transformers.PhimoeForCausalLM, tmp_path / "phimoe_model", name="phimoe",
                         cluster={"nodes": 1, "procs_per_node": 2, "device": "cpu", "hardware": "cpu"},
                         train={"seq_len": 128, "micro_batch_size": 1, "global_batch_size": 4, "steps": 1},
                         parallel={"dp_shard": 2, "dp_replicate": 1})
    phimoe = spec_from_dict(raw, "<test>", str(tmp_path))
    runner.compile_to(phimoe, tmp_path / "phimoe")
    runner.dropout_off(tmp_path / "phimoe" / "config.json")
    assert runner.random_in_training(tmp_path / "phimoe")
    assert runner.verify(phimoe, steps=1, workdir=str(tmp_path / "verify")) == 1
