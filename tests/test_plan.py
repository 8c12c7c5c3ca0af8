"""Planner v1 and cost model on hand-built graphs: the best plan is known, refusals say why."""

from pathlib import Path

import pytest

from omnigen import cost
from omnigen.errors import PlanError
from omnigen.hardware import GIB, HardwareProfile, Link
from omnigen.model_graph import Block, Group, ModelGraph
from omnigen.plan import Plan, format_explain, make_plan, mesh_candidates
from omnigen.spec import spec_from_dict

LLAMA = Path(__file__).resolve().parent.parent / "specs" / "models" / "llama_tiny"


def spec(**sections):
    return spec_from_dict({"name": "t", "model": {"config": str(LLAMA)}, **sections}, "spec.yaml", ".")


def graph(layers=4, layer_params=1_000_000, root_params=500_000, hidden=256):
    members = tuple(f"model.layers.{i}" for i in range(layers))
    g = Group(name="model.layers", pattern="model.layers.*", role="foundation", layer_class="Layer", members=members,
              params=layer_params, param_bytes=4 * layer_params, flops_per_token=2 * layer_params,
              attn_flops_per_token_per_seq=4 * hidden, act_bytes_per_token=16 * hidden, hidden=hidden, heads=4, kv_heads=2,
              head_dim=hidden // 4)
    blocks = [Block("model.embed_tokens", "foundation", "embedding", None, None, root_params, 4 * root_params, 0.0)]
    for m in members:
        blocks += [Block(m, "foundation", "layer", None, "model.layers", layer_params, 4 * layer_params, 2 * layer_params),
                   Block(f"{m}.self_attn", "foundation", "attention", m, "model.layers", 0, 0, 0.0, heads=4, kv_heads=2)]
    total = layers * layer_params + root_params
    return ModelGraph("LlamaForCausalLM", "llama", tuple(blocks), (g,), total, 4 * total, vocab_size=1000)


def hw(memory_gib=80.0, intra=100.0, inter=10.0):
    return HardwareProfile("test", {"fp32": 1e12, "bf16": 2e12}, 0.5, memory_gib, Link(intra, 5), Link(inter, 10), 0.0, "")


def test_all_gather_alpha_beta_by_hand():
    link = Link(bandwidth_gbps=10.0, latency_us=5.0)
    # 4 ranks, 1 GB tensor: 3 latency terms + 3/4 of the bytes over 10 GB/s.
    assert cost.all_gather_s(1e9, 4, link) == pytest.approx(3 * 5e-6 + 0.75 * 1e9 / 1e10)
    assert cost.all_reduce_s(1e9, 4, link) == pytest.approx(2 * cost.all_gather_s(1e9, 4, link))
    assert cost.all_gather_s(1e9, 1, link) == 0.0


def test_memory_shards_parameters_gradients_and_optimizer():
    g = graph()
    shape = cost.TrainShape(seq_len=2048, micro_batch_size=1, grad_accum=2, precision="fp32")  # grads live across micro-batches
    choices = {"model.layers": cost.GroupChoice()}
    one = cost.memory_breakdown(g, cost.Mesh(dp_shard=1), choices, shape, hw())
    four = cost.memory_breakdown(g, cost.Mesh(dp_shard=4), choices, shape, hw())
    assert one["parameters"] == g.total_param_bytes and four["parameters"] == g.total_param_bytes // 4
    assert four["optimizer"] == 2 * four["gradients"]
    assert one["activations"] == four["activations"]  # data parallelism does not split a micro-batch


def test_mesh_candidates_honour_fixed_dims():
    meshes = mesh_candidates(spec(cluster={"procs_per_node": 4}))
    assert {(m.dp_replicate, m.dp_shard) for m in meshes} == {(1, 4), (2, 2), (4, 1)}
    fixed = mesh_candidates(spec(cluster={"procs_per_node": 4}, parallel={"dp_replicate": 2}))
    assert [(m.dp_replicate, m.dp_shard) for m in fixed] == [(2, 2)]


def test_slow_inter_node_links_prefer_hsdp_across_nodes():
    s = spec(cluster={"nodes": 2, "procs_per_node": 2}, train={"global_batch_size": 4})
    plan = make_plan(s, graph(layer_params=20_000_000), hw(intra=100.0, inter=0.5), {})
    assert plan.mesh["dp_replicate"] == 2 and plan.mesh["dp_shard"] == 2
    assert plan.groups[0].shard_dims == ("dp_replicate", "dp_shard")
    assert any("slower" in a["reason"] for a in plan.alternatives)


def test_activation_checkpointing_only_when_memory_needs_it():
    roomy = make_plan(spec(train={"seq_len": 4096}), graph(), hw(memory_gib=80), {})
    assert roomy.groups[0].activation_checkpointing == "none"
    def peak(ac):
        return sum(cost.memory_breakdown(graph(), cost.Mesh(dp_shard=2), {"model.layers": cost.GroupChoice(True, ac)},
                                         cost.TrainShape(4096, 1, 1, "fp32"), hw()).values())
    assert peak("full") < peak("selective") < peak("none")
    tight_gib = (peak("full") + peak("selective")) / 2 / GIB  # only full checkpointing fits
    whole_loss = {"seq_len": 4096, "loss_chunk_tokens": 0}
    tight = make_plan(spec(train=whole_loss, parallel={"sp": 1, "memory_headroom": 0}), graph(),
                      hw(memory_gib=tight_gib), {})
    assert tight.groups[0].activation_checkpointing != "none"
    assert any("does not fit" in a["reason"] for a in tight.alternatives)
    # Computing the loss in chunks frees more than that here (its logits are most of this small model's
    # activations) for one extra LM head forward: the planner chunks the loss instead of checkpointing the layers.
    chunked = make_plan(spec(train={"seq_len": 4096}, parallel={"sp": 1, "memory_headroom": 0}), graph(),
                        hw(memory_gib=tight_gib), {})
    assert chunked.groups[0].activation_checkpointing == "none" and chunked.train["loss_chunk_tokens"] > 0


def test_plans_leave_the_memory_headroom_free():
    def peak(ac):
        return sum(cost.memory_breakdown(graph(), cost.Mesh(dp_shard=2), {"model.layers": cost.GroupChoice(True, ac)},
                                         cost.TrainShape(4096, 1, 1, "fp32"), hw()).values())
    exact = peak("full") / GIB  # full checkpointing fills the device to the byte
    fixed = {"sp": 1, "dp_shard": 2, "activation_checkpointing": "full"}
    train = {"seq_len": 4096, "loss_chunk_tokens": 0}
    assert make_plan(spec(train=train, parallel={**fixed, "memory_headroom": 0}), graph(),
                     hw(memory_gib=exact), {}).predicted["peak_memory_bytes"] <= exact * GIB
    with pytest.raises(PlanError) as e:  # the default keeps 5% free
        make_plan(spec(train=train, parallel=fixed), graph(), hw(memory_gib=exact), {})
    assert "parallel.memory_headroom 0.05 stays free" in str(e.value)


def test_refuses_with_reason_when_nothing_fits():
    with pytest.raises(PlanError) as e:
        make_plan(spec(), graph(layer_params=100_000_000), hw(memory_gib=0.1), {})
    assert "no parallel plan fits" in str(e.value) and "GiB" in str(e.value)


def test_sequence_parallel_degrees_follow_the_heads():
    meshes = mesh_candidates(spec(cluster={"procs_per_node": 8}), graph())  # 4 heads, 2 kv heads
    assert {m.sp for m in meshes} == {1, 2, 4}  # sp=4 repeats each kv head twice; sp=8 exceeds the heads
    with pytest.raises(PlanError, match="sp values that work: 1, 2, 4"):
        mesh_candidates(spec(cluster={"procs_per_node": 8}, parallel={"sp": 8}), graph())


def test_ulysses_bytes_by_hand():
    g = graph().groups[0]  # 4 heads, 2 kv heads, head_dim 64
    shape = cost.TrainShape(seq_len=128, micro_batch_size=1, grad_accum=1, precision="fp32")
    local = 1 * 64 * 64 * 4  # batch x (128 / sp=2) tokens x head_dim x 4 bytes, per head
    per_pass = (4 + 2 + 2 + 4) * local // 2  # q, k, v, out; half of each stays on this rank
    assert cost.sp_all_to_all_bytes(g, shape, 2, recompute=False) == 2 * per_pass  # forward + backward
    assert cost.sp_all_to_all_bytes(g, shape, 2, recompute=True) == 3 * per_pass
    # sp=4 > 2 kv heads: kv heads are repeated to 4 before the exchange
    local4 = 1 * 32 * 64 * 4
    assert cost.sp_all_to_all_bytes(g, shape, 4, recompute=False) == 2 * (4 + 4 + 4 + 4) * local4 * 3 // 4


def test_activations_fall_with_sp():
    g = graph()
    shape = cost.TrainShape(seq_len=4096, micro_batch_size=1, grad_accum=1, precision="fp32")
    choices = {"model.layers": cost.GroupChoice()}
    one = cost.memory_breakdown(g, cost.Mesh(dp_shard=4), choices, shape, hw())["activations"]
    four = cost.memory_breakdown(g, cost.Mesh(sp=4), choices, shape, hw())["activations"]
    assert four == pytest.approx(one / 4, rel=1e-6)


def test_plan_round_trips_through_json_and_explains():
    plan = make_plan(spec(cluster={"procs_per_node": 4}, train={"global_batch_size": 8}), graph(), hw(), {})
    assert Plan.from_dict(plan.to_dict()) == plan
    assert set(plan.predicted) >= {"step_time_s", "tokens_per_s_per_device", "peak_memory_bytes", "mfu"}
    text = format_explain(plan)
    assert "chosen: mesh" in text and "alternatives (" in text


def test_plan_says_whether_its_profile_was_measured():
    """The prediction names its profile: fitted on which machine, or uncalibrated, and how to calibrate."""
    from dataclasses import replace
    s = spec(cluster={"procs_per_node": 2})
    unmeasured = make_plan(s, graph(), hw(), {})
    assert unmeasured.cluster["hardware_measured_on"] == ""
    assert "cost profile test: uncalibrated" in format_explain(unmeasured)
    assert "`omnigen calibrate --ranks N -o FILE.yaml`, then cluster.hardware: FILE.yaml" in format_explain(unmeasured)
    measured = make_plan(s, graph(), replace(hw(), measured_on="Box CPU, 8 cores, 2 CPU ranks"), {})
    line = format_explain(measured).splitlines()[1]
    assert line == "  cost profile test: fitted by `omnigen calibrate` on Box CPU, 8 cores, 2 CPU ranks"
    assert Plan.from_dict(measured.to_dict()) == measured


def test_expert_parallel_degrees_must_divide_experts_and_fsdp_ranks():
    from omnigen.analyze import analyze
    moe = spec_from_dict({"name": "t", "model": {"config": str(LLAMA.parent / "qwen3_moe_tiny")},
                          "cluster": {"procs_per_node": 4}, "parallel": {"ep": 3}}, "spec.yaml", ".")
    with pytest.raises(PlanError, match="ep values that work: 1, 2, 4"):
        mesh_candidates(moe, analyze(moe))
    with pytest.raises(PlanError, match="no routed experts"):
        mesh_candidates(spec(parallel={"ep": 2}), graph())


SPECS = Path(__file__).resolve().parent.parent / "specs"


@pytest.mark.parametrize("name,seq_len,sets", [
    ("qwen3_omni_30b_h100x128", 163_840, []),             # VeOmni: the 30B omni MoE at 160K on 128 GPUs
    ("qwen2_vl_72b_h100x64", 65_536, ["parallel.sp=auto"]),  # and the 72B VLM at 64K on 64 (the spec fixes sp=1)
])
def test_long_context_targets_plan_with_the_loss_in_chunks(name, seq_len, sets):
    """The published VeOmni context lengths plan, with the loss in chunks; the chosen layout with the
    whole-sequence loss (its fp32 log-probabilities and gradients for every token x 152K vocabulary) would not fit."""
    from dataclasses import replace

    from omnigen.pipeline import plan as compile_plan
    from omnigen.plan import reprice, usable_memory_bytes
    from omnigen.spec import load_spec

    compiled = compile_plan(load_spec(SPECS / f"{name}.yaml", [f"train.seq_len={seq_len}", *sets]))
    plan = compiled.plan
    assert plan.train["loss_chunk_tokens"] > 0
    assert plan.max_seq_len_by_sp[str(plan.mesh["sp"])] >= seq_len
    whole = reprice(replace(plan, train={**plan.train, "loss_chunk_tokens": 0}), compiled.spec, compiled.graph,
                    compiled.hardware)
    assert whole.peak_memory_bytes > usable_memory_bytes(compiled.spec, compiled.hardware)


def test_a_batch_only_the_chosen_sp_can_split_still_plans():
    """Two sequences in one micro-batch on 2 ranks split only as sp=2 (sp=1 would need 2 x 2 samples): the plan is
    sp=2, and max_seq_len_by_sp leaves out the degree that cannot hold the batch instead of refusing the spec."""
    s = spec(cluster={"procs_per_node": 2}, parallel={"sp": 2},
             train={"seq_len": 128, "micro_batch_size": 2, "global_batch_size": 2})
    plan = make_plan(s, graph(), hw(), {})
    assert plan.mesh["sp"] == 2 and plan.train["grad_accum"] == 1 and list(plan.max_seq_len_by_sp) == ["2"]
