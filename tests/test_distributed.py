"""Every parallel layout is proven against a single-process reference: same seed, data and global batch.

Each case runs `omnigen verify` for real: the generated script under torchrun (gloo, CPU ranks) and the
single-process reference, then compares per-step losses and gradient norms, the first step's gradients and the
parameter updates per tensor (runner.compare; tests/test_verify_checks.py shows that planted bugs fail).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnigen import runner
from omnigen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.distributed


def verify(name, tmp_path, steps=2, sets=()):
    code = runner.verify(load_spec(ROOT / "specs" / f"{name}.yaml", sets), steps=steps, workdir=str(tmp_path))
    return code, runner.read_metrics(tmp_path / "parallel" / "metrics.jsonl")


@pytest.mark.parametrize("name", ["llama_tiny", "qwen2_vl_tiny", "qwen25_omni_tiny"])
def test_fsdp_two_ranks_matches_single_process(name, tmp_path):
    code, metrics = verify(name, tmp_path)
    assert code == 0 and len(metrics) == 2


@pytest.mark.parametrize("name", ["llama_tiny_hsdp", "qwen2_vl_tiny_hsdp"])
def test_hsdp_2x2_matches_single_process(name, tmp_path):
    plan = json.loads((ROOT / "generated" / name / "plan.json").read_text())
    assert plan["mesh"]["dp_replicate"] == 2 and plan["mesh"]["dp_shard"] == 2
    code, _ = verify(name, tmp_path)
    assert code == 0


@pytest.mark.parametrize("name,frozen", [("qwen2_vl_tiny_frozen_vit", True), ("qwen2_vl_tiny_replicated", False)])
def test_replicated_groups_match_single_process(name, frozen, tmp_path):
    """Replicated layer groups next to the FSDP-sharded root: a frozen ViT (no gradients) and trainable replicated
    groups, whose gradients sit on another mesh than the root's when the norm is clipped."""
    plan = json.loads((ROOT / "generated" / name / "plan.json").read_text())
    vit = next(g for g in plan["groups"] if g["role"] == "encoder:vision")
    assert vit["replicate"] and vit["frozen"] == frozen
    code, metrics = verify(name, tmp_path)
    assert code == 0 and len(metrics) == 2


def test_two_torchrun_agents_as_two_nodes(tmp_path):
    """--nnodes 2 with c10d rendezvous on localhost runs the same generated script."""
    code, metrics = verify("llama_tiny_2node", tmp_path)
    assert code == 0 and len(metrics) == 2


@pytest.mark.parametrize("name", ["llama_tiny_sp2", "qwen2_vl_tiny_dp2_sp2", "qwen25_omni_tiny_sp2",
                                  "llama_tiny_sp2_packed", "qwen2_vl_tiny_dp2_sp2_noimage"])
def test_ulysses_matches_single_process_and_sends_the_planned_bytes(name, tmp_path):
    code, metrics = verify(name, tmp_path)
    assert code == 0
    plan = json.loads((tmp_path / "parallel" / "plan.json").read_text())
    assert plan["mesh"]["sp"] == 2
    planned = plan["sequence_parallel"]["all_to_all_bytes_per_step"]
    assert planned > 0 and all(m["comm_bytes"]["sp_all_to_all"] == planned for m in metrics)


def test_one_rank_without_audio_still_joins_every_collective(tmp_path):
    """The omni thinker runs audio before images: a rank lacking audio but holding an image must keep that order."""
    code, _ = verify("qwen25_omni_tiny", tmp_path, sets=("train.synthetic.audio_every=2",))
    assert code == 0


@pytest.mark.parametrize("name", ["llama_tiny", "qwen2_vl_tiny_dp2_sp2", "qwen3_moe_tiny_ep2", "qwen25_omni_tiny"])
def test_chunked_loss_matches_the_whole_sequence_reference(name, tmp_path):
    """The loss in chunks of 40 tokens (none divides a rank's tokens) inside FSDP's root unit, with Ulysses (labels
    are the rank's chunk), EP with the router aux loss, and towers run on idle ranks, against the reference's
    whole-sequence loss (runner.reference_spec)."""
    code, _ = verify(name, tmp_path, sets=["train.loss_chunk_tokens=40"])
    assert code == 0
    assert json.loads((tmp_path / "parallel" / "plan.json").read_text())["train"]["loss_chunk_tokens"] == 40
    assert json.loads((tmp_path / "reference" / "plan.json").read_text())["train"]["loss_chunk_tokens"] == 0


# DeepSeek-V3 balances its experts with a router bias, not an aux loss; the Qwen tiny configs turn the aux loss on.
ROUTER_AUX = {"qwen3_moe_tiny_ep2": True, "qwen2_moe_tiny_ep2": True, "deepseek_v3_tiny_ep2": False,
              "qwen3_omni_moe_tiny_sp2_ep2": True}


def check_expert_metrics(metrics, reference, ep, router_aux):
    """A real router is not balanced: what it sends stays within the plan's bounds. The router aux loss (part of
    "loss", which verify compares) is also logged on its own and equals the reference's."""
    for m, r in zip(metrics, reference, strict=True):
        assert 0 < m["comm_bytes"]["ep_all_to_all"] <= ep["all_to_all_bytes_max_per_step"]
        assert len(m["tokens_per_expert"]) == ep["num_experts"] and m["imbalance"] >= 1.0
        assert ("aux_loss" in m) == ("aux_loss" in r) == router_aux
        if router_aux:
            assert m["aux_loss"] == pytest.approx(r["aux_loss"], rel=1e-5) and m["aux_loss"] > 1.0


@pytest.mark.parametrize("name", list(ROUTER_AUX))
def test_expert_parallel_matches_single_process(name, tmp_path):
    code, metrics = verify(name, tmp_path)
    assert code == 0
    ep = json.loads((tmp_path / "parallel" / "plan.json").read_text())["expert_parallel"]
    assert ep["degree"] == 2
    check_expert_metrics(metrics, runner.read_metrics(tmp_path / "reference" / "metrics.jsonl"), ep, ROUTER_AUX[name])


def test_selective_checkpointing_with_expert_parallel_matches_single_process(tmp_path):
    """Each MoE layer's experts are their own FSDP unit inside the checkpointed layer; its hooks' profiler ops run a
    different number of times in the recompute, which selective checkpointing must not count."""
    code, _ = verify("qwen2_moe_tiny_ep2", tmp_path, sets=["parallel.activation_checkpointing=selective"])
    assert code == 0
    plan = json.loads((tmp_path / "parallel" / "plan.json").read_text())
    assert {g["activation_checkpointing"] for g in plan["groups"]} == {"selective"}


def test_expert_parallel_checkpoint_holds_the_full_experts_and_resumes(tmp_path):
    """dp_shard=4 x ep=2: each EP rank's 4 experts are FSDP-sharded over ep_fsdp=2. Train 2 steps and save a DCP
    checkpoint: its expert tensors are the full [8, ...] ones, equal to the gathered parameters, with the keys and
    shapes of the model without EP. Then resume from it twice, in the same layout and on one plain process: both
    continue exactly like the reference that never stopped (this is also the layout's verify)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    spec = load_spec(ROOT / "specs" / "qwen3_moe_tiny_dp4_ep2.yaml")
    ref, par, ckpt = tmp_path / "reference", tmp_path / "parallel", tmp_path / "checkpoint"
    runner.compile_to(runner.reference_spec(spec), ref)
    ep = runner.compile_to(spec, par).expert_parallel
    assert ep["degree"] == 2 and ep["ep_fsdp"] == 2

    def run(folder, name, *args, ranks=True):
        args = [*args, "--metrics", str(folder / f"{name}.jsonl"), "--dump-params", str(folder / f"{name}.pt"),
                "--dump-initial-params", str(folder / f"{name}_initial.pt"),
                "--dump-grads", str(folder / f"{name}_grads.pt")]
        script = folder / "train.py"
        code = (runner.launch(spec, script, args) if ranks
                else subprocess.run([sys.executable, str(script), *args], cwd=folder).returncode)
        assert code == 0
        dumps = (torch.load(folder / f"{name}{part}.pt", weights_only=True) for part in ("_initial", "_grads", ""))
        return runner.Run(runner.read_metrics(folder / f"{name}.jsonl"), *dumps)

    straight = run(ref, "straight", "--steps", "3", ranks=False)
    first = run(par, "first", "--steps", "2", "--checkpoint-dir", str(ckpt), "--count-comm-bytes")
    ref_metrics, ref_params, first_metrics, first_params = straight.metrics, straight.final, first.metrics, first.final
    dcp_to_torch_save(ckpt / "step_00000002", tmp_path / "checkpoint.pt")  # the step folder of the save at the end
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert int(saved["steps_done"]) == 2
    assert set(saved["model"]) == set(first_params) == set(ref_params)
    for key, value in first_params.items():
        assert torch.equal(saved["model"][key], value), key  # the expert slices in the right places, bit for bit
        moments = saved["optim"]["state"][key]
        assert moments["exp_avg"].shape == moments["exp_avg_sq"].shape == value.shape == ref_params[key].shape
    experts = "model.layers.0.mlp.experts.gate_up_proj"
    assert saved["model"][experts].shape[0] == ep["num_experts"] and saved["optim"]["state"][experts]["exp_avg"].abs().sum() > 0

    resumed = run(par, "resumed", "--steps", "3", "--resume", str(ckpt), "--count-comm-bytes")
    assert [m["step"] for m in resumed.metrics] == [2]
    parallel = first_metrics + resumed.metrics
    check_expert_metrics(parallel, ref_metrics, ep, router_aux=True)
    # the whole story: first run's start and step-0 gradients, both runs' steps, the resumed run's end
    stitched = runner.Run(parallel, first.initial, first.grads, resumed.final)
    assert runner.report(straight, stitched, 3, runner.tolerances("fp32", routed_experts=True)) == 0

    one_process_metrics = run(ref, "resumed", "--steps", "3", "--resume", str(ckpt), ranks=False).metrics
    assert [m["step"] for m in one_process_metrics] == [2]
    for key in ("loss", "grad_norm", "aux_loss"):
        # resumed from a checkpoint 2 steps in: rounding has barely parted the runs at this step
        assert one_process_metrics[0][key] == pytest.approx(ref_metrics[2][key], rel=runner.TOLERANCES["fp32"].first_step)
