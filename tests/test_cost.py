"""Each cost-model term against a value computed by hand, and searches whose best plan is known."""

from dataclasses import replace
from pathlib import Path

import pytest

from omnigen import cost
from omnigen.cost import GroupChoice, Mesh, TrainShape
from omnigen.hardware import GIB, HardwareProfile, Link
from omnigen.model_graph import Block, Group, ModelGraph
from omnigen.plan import make_plan, pareto
from omnigen.spec import spec_from_dict

LLAMA = Path(__file__).resolve().parent.parent / "specs" / "models" / "llama_tiny"
MB = 1_000_000


def group(name, role, count, params, hidden=256, heads=4, kv_heads=4, experts=0, top_k=0, expert_params=0,
          tensors=9):
    return Group(name=name, pattern=f"{name}.*", role=role, layer_class="Layer", tensors=tensors,
                 members=tuple(f"{name}.{i}" for i in range(count)), params=params, param_bytes=4 * params,
                 flops_per_token=2 * params, attn_flops_per_token_per_seq=4 * hidden, act_bytes_per_token=20 * hidden,
                 heads=heads, kv_heads=kv_heads, head_dim=hidden // heads, hidden=hidden, experts=experts,
                 top_k=top_k, expert_params=expert_params)


def model(*groups, root_params=MB, vocab=1000):
    blocks = [Block("model.embed_tokens", "foundation", "embedding", None, None, root_params, 4 * root_params, 0.0,
                    tensors=1)]
    for g in groups:
        blocks += [Block(m, g.role, "layer", None, g.name, g.params, g.param_bytes, g.flops_per_token)
                   for m in g.members]
    total = root_params + sum(g.params * g.count for g in groups)
    return ModelGraph("M", "m", tuple(blocks), tuple(groups), total, 4 * total, vocab_size=vocab)


def hw(memory_gib=80.0, overlap=0.0, layer_us=0.0, step_ms=0.0, mem_bw=0.0, collective_us=0.0, fsdp_us=0.0,
       tensor_us=0.0, a2a_us=0.0):
    return HardwareProfile("test", {"fp32": 1e12, "bf16": 2e12}, {"fp32": 0.5, "bf16": 0.25}, memory_gib,
                           Link(100.0, 5), Link(10.0, 10), 1.0, "", overlap=overlap, memory_bandwidth_gbps=mem_bw,
                           layer_overhead_us=layer_us, step_overhead_ms=step_ms, collective_hop_overhead_us=collective_us,
                           fsdp_call_overhead_us=fsdp_us, optimizer_tensor_us=tensor_us,
                           all_to_all_hop_overhead_us=a2a_us)


FOUNDATION = group("model.layers", "foundation", 4, 10 * MB)
SHAPE = TrainShape(seq_len=128, micro_batch_size=2, grad_accum=1, precision="fp32")
LINK = Link(100.0, 5)


def test_efficiency_may_be_given_per_precision():
    assert hw().achieved_flops("fp32") == 0.5e12 and hw().achieved_flops("bf16") == 0.5e12


def test_compute_host_and_optimizer_terms_by_hand():
    g = model(FOUNDATION)
    e = cost.estimate(g, Mesh(), {"model.layers": GroupChoice()}, SHAPE,
                      hw(layer_us=100.0, step_ms=2.0, mem_bw=10.0), procs_per_node=1)
    tokens = 2 * 128
    forward = 4 * tokens * (2 * 10 * MB + 4 * 256 * 128)  # 4 layers: 2 FLOPs/param + attention over 128 tokens
    assert e.compute_s == pytest.approx(3 * forward / 0.5e12)  # the embedding lookup counts no FLOPs
    assert e.host_s == pytest.approx(4 * 3 * 100e-6 + 2e-3)  # each layer: a forward and a backward worth two
    trainable = 4 * 10 * MB + MB
    assert e.optimizer_s == pytest.approx(cost.OPTIMIZER_BYTES_PER_PARAM * trainable / 10e9)
    assert e.exposed_comm_s == 0.0  # one rank: no collectives
    assert e.step_time_s == pytest.approx(e.compute_s + e.host_s + e.optimizer_s)


def test_attention_at_its_own_rate_and_causal_share_by_hand():
    """A calibrated profile prices the score FLOPs apart: at their own rate, and a causal kernel with 64-wide key
    blocks computes (n + 1) / 2n of them (n = 128 / 64 = 2: 3/4). Encoders and packed documents attend unmasked."""
    g = model(FOUNDATION)
    profile = replace(hw(), attention_efficiency={"fp32": 0.25, "bf16": 0.1}, causal_block=64)
    tokens = 2 * 128
    matmul, attention = 4 * tokens * 2 * 10 * MB, 4 * tokens * 4 * 256 * 128
    e = cost.estimate(g, Mesh(), {"model.layers": GroupChoice()}, SHAPE, profile, procs_per_node=1)
    assert e.compute_s == pytest.approx(3 * (matmul / 0.5e12 + attention * 3 / 4 / 0.25e12))
    assert e.mfu == pytest.approx(3 * (matmul + attention) / e.step_time_s / 1e12)   # MFU counts the FLOPs whole
    packed = cost.estimate(g, Mesh(), {"model.layers": GroupChoice()}, replace(SHAPE, dense_mask="documents"),
                           profile, procs_per_node=1)
    assert packed.compute_s == pytest.approx(3 * (matmul / 0.5e12 + attention / 0.25e12))
    vision = group("visual.blocks", "encoder:vision", 4, 10 * MB)
    shape = TrainShape(128, 1, 1, "fp32", {"encoder:vision": 128.0, "encoder:vision:context": 128.0})
    c = cost.group_cost(model(vision), vision, GroupChoice(), Mesh(), shape, profile, 1)
    assert c.forward_s == pytest.approx(4 * 128 * (2 * 10 * MB / 0.5e12 + 4 * 256 * 128 / 0.25e12))
    full = cost.group_cost(g, FOUNDATION, GroupChoice(activation_checkpointing="full"), Mesh(), SHAPE, profile, 1)
    assert full.recompute_s == pytest.approx(full.forward_s) and full.compute_s == pytest.approx(4 * full.forward_s)
    # an uncalibrated profile prices attention like the matmuls, whole
    plain = cost.estimate(g, Mesh(), {"model.layers": GroupChoice()}, SHAPE, hw(), procs_per_node=1)
    assert plain.compute_s == pytest.approx(3 * (matmul + attention) / 0.5e12)


def test_dense_masks_are_kept_for_backward_by_hand():
    """A dense [B, 1, S, S] boolean mask is memory the kernel's own activations do not count: packed documents keep
    one per layer (one when checkpointed: each layer rebuilds its own), the model's token-type masks one per
    attention pattern for the whole stack, and the Ulysses ranks hold the whole sequence's masks."""
    g = model(FOUNDATION)
    mask = 2 * 128 * 128  # B x S x S booleans
    for dense, ac, masks in (("documents", "none", 4), ("documents", "full", 1), ("model", "none", 1)):
        choice = GroupChoice(activation_checkpointing=ac)
        without = cost.group_cost(g, FOUNDATION, choice, Mesh(), SHAPE, hw(), 1).activations
        masked = cost.group_cost(g, FOUNDATION, choice, Mesh(), replace(SHAPE, dense_mask=dense), hw(), 1)
        assert masked.activations - without == masks * mask, (dense, ac)
    windowed = replace(FOUNDATION, attention_spans=(("sliding_window", 32), ("causal", 0)))
    shape = replace(SHAPE, dense_mask="model")
    for sp in (1, 2):
        mesh = Mesh(sp=sp)
        c = cost.group_cost(model(windowed), windowed, GroupChoice(), mesh, shape, hw(), 2)
        assert c.activations - cost.group_cost(model(windowed), windowed, GroupChoice(), mesh, SHAPE, hw(), 2
                                               ).activations == 2 * mask
        # the model's masks are dense, Ulysses or not: every key of the window's layer is scored
        assert cost.attention_keys(windowed, shape, mesh) == [(128, False), (128, False)]


def test_fsdp_collectives_by_hand():
    g = model(FOUNDATION)
    mesh = Mesh(dp_shard=4)
    member = 4 * 10 * MB  # fp32 bytes of one layer
    ring = 3 * 5e-6 + member * 3 / 4 / 100e9
    resharding = cost.group_cost(g, FOUNDATION, GroupChoice(True), mesh, SHAPE, hw(), 8)
    kept = cost.group_cost(g, FOUNDATION, GroupChoice(False), mesh, SHAPE, hw(), 8)
    assert resharding.fsdp_comm_s == pytest.approx(4 * 3 * ring)  # gather in forward and backward, reduce-scatter
    assert kept.fsdp_comm_s == pytest.approx(4 * 2 * ring)
    assert kept.kept_gathered == 3 * member and resharding.kept_gathered == 0
    frozen = cost.group_cost(g, FOUNDATION, GroupChoice(True, frozen=True), mesh, SHAPE, hw(), 8)
    assert frozen.fsdp_comm_s == pytest.approx(4 * 2 * ring)  # no gradients to reduce
    assert (frozen.gradients, frozen.optimizer, frozen.backward_factor) == (0, 0, 1.0)


def test_host_time_per_collective_and_per_parameter_tensor_by_hand():
    g = model(FOUNDATION)
    profile = hw(collective_us=1000.0, fsdp_us=500.0, tensor_us=100.0, a2a_us=200.0)
    shape = TrainShape(seq_len=128, micro_batch_size=2, grad_accum=3, precision="fp32")
    quiet = cost.estimate(g, Mesh(dp_shard=4), {"model.layers": GroupChoice()}, shape, hw(), 8)
    e = cost.estimate(g, Mesh(dp_shard=4), {"model.layers": GroupChoice()}, shape, profile, 8)
    # per micro-batch, FSDP's collectives over 4 ranks, 3 hops each: each layer gathers twice and reduce-scatters once,
    # the root gathers and reduce-scatters once; per step, a bare one: the label-token all-reduce (2 x 3 hops)
    # FSDP's own hooks and copies are per call
    assert e.host_s - quiet.host_s == pytest.approx(3 * (4 * 3 + 2) * (3 * 1e-3 + 0.5e-3) + 6 * 1e-3)
    # the optimizer: 4 x 9 layer tensors + the embedding, and the clipping and loss all-reduces
    assert e.optimizer_s - quiet.optimizer_s == pytest.approx((4 * 9 + 1) * 100e-6 + 2 * 6 * 1e-3)
    hsdp = cost.group_cost(g, FOUNDATION, GroupChoice(False), Mesh(dp_replicate=2, dp_shard=2), SHAPE, profile, 8)
    assert hsdp.fsdp_hops == 4 * (1 + 1 + 2)  # gather and reduce-scatter over 2, all-reduce across 2 replicas
    assert hsdp.fsdp_calls == 4 * 3
    replicated = cost.group_cost(g, FOUNDATION, GroupChoice(replicate=True), Mesh(dp_shard=4), SHAPE, profile, 8)
    # plain parameters outside FSDP: no hooks; the whole group's gradients in the one flat all-reduce over 4, after
    # backward, where nothing hides it
    assert (replicated.fsdp_hops, replicated.fsdp_calls, replicated.fsdp_comm_s) == (6, 0, 0)
    assert replicated.after_backward_s == pytest.approx(cost.all_reduce_s(4 * 40 * MB, 4, LINK))
    assert replicated.flattened_gradients == 4 * 40 * MB
    frozen = cost.group_cost(g, FOUNDATION, GroupChoice(frozen=True), Mesh(dp_shard=4), SHAPE, profile, 8)
    assert (frozen.fsdp_hops, frozen.tensors) == (4 * 2 * 3, 0)
    sp = cost.group_cost(g, FOUNDATION, GroupChoice(True, "full"), Mesh(sp=2), SHAPE, profile, 8)
    assert (sp.fsdp_hops, sp.all_to_all_hops) == (4 * 3, 4 * 2 * 3)  # Ulysses: q/k/v together, out x 3 passes; 1 hop each
    assert cost.group_time_s(sp, profile) - cost.group_time_s(sp, hw()) == pytest.approx(
        4 * 3 * 1.5e-3 + 4 * 2 * 3 * 200e-6)  # bare all-to-alls pay their own hops, not FSDP's hooks
    one = cost.estimate(g, Mesh(), {"model.layers": GroupChoice()}, shape, profile, 8)
    assert one.host_s == 0 and one.optimizer_s == pytest.approx((4 * 9 + 1) * 100e-6)  # one rank: no collectives


def test_gradients_reduced_once_per_step_by_hand():
    """With 3 micro-batches, reducing gradients once per step does a third of the reduce-scatters (their seconds,
    hops and calls), gathers as often, and holds the gradients unsharded between micro-batches; the planner takes it
    when it fits and falls back to every micro-batch's reduction when it does not."""
    g = model(FOUNDATION)
    profile = hw(collective_us=1000.0, fsdp_us=500.0)
    every = TrainShape(seq_len=128, micro_batch_size=2, grad_accum=3, precision="fp32")
    once = replace(every, sync_once_per_step=True)
    mesh = Mesh(dp_shard=4)
    a, b = (cost.group_cost(g, FOUNDATION, GroupChoice(), mesh, s, profile, 8) for s in (every, once))
    gather = 4 * 2 * cost.all_gather_s(40 * MB, 4, LINK)  # 4 layers x 2 gathers of 40 MB each
    scatter = 4 * cost.reduce_scatter_s(40 * MB, 4, LINK)
    assert a.fsdp_comm_s == pytest.approx(gather + scatter) and b.fsdp_comm_s == pytest.approx(gather + scatter / 3)
    assert (a.fsdp_hops, b.fsdp_hops) == (4 * 3 * 3, pytest.approx(4 * (2 + 1 / 3) * 3))
    assert (a.fsdp_calls, b.fsdp_calls) == (4 * 3, pytest.approx(4 * (2 + 1 / 3)))
    assert (a.accumulated_gradients, b.accumulated_gradients) == (a.gradients, 4 * 40 * MB)
    replicated = cost.group_cost(g, FOUNDATION, GroupChoice(replicate=True), mesh, once, profile, 8)
    assert replicated.accumulated_gradients == replicated.gradients == 4 * 40 * MB  # whole already: nothing more held
    e_every, e_once = (cost.estimate(g, mesh, {"model.layers": GroupChoice()}, s, profile, 8) for s in (every, once))
    assert e_once.step_time_s < e_every.step_time_s
    assert e_once.memory["gradients"] - e_every.memory["gradients"] == pytest.approx((4 * 40 + 4) * MB * 3 / 4)

    # Short sequences: activation checkpointing cannot win back the unsharded gradients' memory. Between what
    # sharded layers need either way, only reducing every micro-batch fits (replicated layers need more still).
    s = spec(cluster={"procs_per_node": 4}, parallel={"dp_shard": 4},
             train={"seq_len": 8, "micro_batch_size": 2, "global_batch_size": 24})
    every, once = replace(every, seq_len=8), replace(once, seq_len=8)
    roomy = make_plan(s, g, replace(profile, memory_gib=80.0), {})
    assert roomy.train["grad_accum"] == 3 and roomy.train["sync_gradients_once_per_step"]
    need = [cost.estimate(g, mesh, {"model.layers": GroupChoice()}, shape, profile, 8).peak_memory_bytes
            for shape in (every, once)]
    tight = make_plan(s, g, replace(profile, memory_gib=sum(need) / 2 / GIB / (1 - s.parallel.memory_headroom)), {})
    assert not tight.train["sync_gradients_once_per_step"] and not tight.groups[0].replicate


def test_all_to_all_link_and_encoder_tower_host_time_by_hand():
    g = model(FOUNDATION)
    pairwise = replace(hw(), all_to_all=Link(50.0, 1))
    ring = cost.group_cost(g, FOUNDATION, GroupChoice(), Mesh(sp=2), SHAPE, hw(), 8)
    direct = cost.group_cost(g, FOUNDATION, GroupChoice(), Mesh(sp=2), SHAPE, pairwise, 8)
    sent = cost.sp_all_to_all_bytes(FOUNDATION, SHAPE, 2, False)
    calls = 2 * 2 * 4  # q, k and v together, then out; forward and backward; 4 layers
    assert ring.all_to_all_s == pytest.approx(calls * 5e-6 + 4 * sent / 100e9)
    assert direct.all_to_all_s == pytest.approx(calls * 1e-6 + 4 * sent / 50e9)
    assert cost.group_cost(g, FOUNDATION, GroupChoice(), Mesh(sp=16), SHAPE, pairwise, 8).all_to_all_s == \
        pytest.approx(calls * 15 * 10e-6 + 4 * cost.sp_all_to_all_bytes(FOUNDATION, SHAPE, 16, False) / 10e9)
    vision, audio = group("model.visual.blocks", "encoder:vision", 2, MB), group("model.audio.layers", "encoder:audio",
                                                                                 2, MB)
    omni = model(FOUNDATION, vision, audio)
    omni = replace(omni, towers={"encoder:vision": "model.visual", "encoder:audio": "model.audio", "foundation": "model"})
    choices = {g.name: GroupChoice() for g in omni.groups}
    towers = replace(hw(), vision_tower_overhead_ms=4.0, audio_tower_overhead_ms=7.0)
    for tokens, per_micro in (({"encoder:vision": 64, "encoder:audio": 32}, 11e-3), ({"encoder:vision": 64}, 4e-3),
                              ({}, 0.0)):
        shape = replace(SHAPE, grad_accum=3, tokens_per_sample=tokens)
        gap = cost.estimate(omni, Mesh(), choices, shape, towers, 8).host_s - cost.estimate(omni, Mesh(), choices,
                                                                                            shape, hw(), 8).host_s
        assert gap == pytest.approx(3 * per_micro)  # each micro-batch runs the towers its samples bring tokens for


def test_clipping_reduces_norms_over_shard_groups_only():
    # the loss all-reduce spans every rank; each mesh's squared gradient norm only the ranks its gradients are split on
    assert cost.optimizer_hops(Mesh(dp_shard=4)) == 6 + 6
    assert cost.optimizer_hops(Mesh(dp_replicate=2, dp_shard=2)) == 6 + 2
    assert cost.optimizer_hops(Mesh(dp_replicate=4)) == 6 + 0  # whole gradients on every rank: nothing to reduce
    assert cost.optimizer_hops(Mesh(dp_shard=4, ep=2)) == 6 + 6 + 2 + 2  # experts: over ep_fsdp = 2, then the EP group
    assert cost.optimizer_hops(Mesh(dp_shard=4), router_aux=True) == 6 + 6 + 6  # and the aux loss's all-reduce


def test_router_aux_loss_all_reduces_by_hand():
    g = model(FOUNDATION)
    profile = hw(collective_us=1000.0)
    shape = replace(SHAPE, grad_accum=3)
    for mesh, micro_hops in ((Mesh(dp_shard=4), 0), (Mesh(dp_shard=2, sp=2), 2 * 2)):
        plain, aux = (cost.estimate(replace(g, router_aux_loss=a), mesh, {"model.layers": GroupChoice()}, shape,
                                    profile, 8) for a in (False, True))
        # per micro-batch under Ulysses: its sums over the SP group, forward and backward; per step: one over all ranks
        assert aux.host_s - plain.host_s == pytest.approx(3 * micro_hops * 1e-3)
        assert aux.optimizer_s - plain.optimizer_s == pytest.approx(6 * 1e-3)


def test_frozen_layers_pay_host_time_for_the_passes_they_run():
    enc = group("model.visual.blocks", "encoder:vision", 2, MB)
    g = replace(model(enc, FOUNDATION), towers={"encoder:vision": "model.visual"})
    profile = replace(hw(), layer_overhead_us=100.0, vision_tower_overhead_ms=3.0)
    shape = TrainShape(128, 1, 1, "fp32", {"encoder:vision": 64.0, "encoder:vision:context": 64.0})
    trained, frozen = (cost.group_cost(g, enc, GroupChoice(frozen=f), Mesh(), shape, profile, 1) for f in (False, True))
    assert cost.group_host_us(trained, profile) == pytest.approx(2 * 3 * 100)  # forward + a backward worth two
    assert cost.group_host_us(frozen, profile) == pytest.approx(2 * 100)  # a frozen encoder: forward alone
    frozen_llm = cost.group_cost(g, FOUNDATION, GroupChoice(frozen=True), Mesh(), shape, profile, 1)
    assert cost.group_host_us(frozen_llm, profile) == pytest.approx(4 * 2 * 100)  # backward to its inputs only
    for f, tower_ms in ((False, 3.0), (True, 1.0)):  # the tower's own work: a third of it when it runs forward only
        choices = {enc.name: GroupChoice(frozen=f), FOUNDATION.name: GroupChoice()}
        assert cost.tower_host_ms(g, shape, profile, choices) == pytest.approx(tower_ms)
    sharded = cost.group_cost(g, enc, GroupChoice(True, frozen=True), Mesh(dp_shard=2), shape, profile, 8)
    assert sharded.fsdp_calls == 2 * 1  # resharded after forward, but nothing gathers it again for backward


def test_each_collective_on_its_own_link_within_a_node():
    g = model(FOUNDATION)
    slow_scatter = replace(hw(), reduce_scatter=Link(100.0, 50), all_reduce=Link(100.0, 20))
    member = 4 * 10 * MB
    ring = lambda latency_s: 3 * latency_s + member * 3 / 4 / 100e9  # noqa: E731  over 4 ranks
    c = cost.group_cost(g, FOUNDATION, GroupChoice(False), Mesh(dp_shard=4), SHAPE, slow_scatter, 8)
    assert c.fsdp_comm_s == pytest.approx(4 * (ring(5e-6) + ring(50e-6)))  # gather on intra_node, scatter on its own
    replicated = cost.group_cost(g, FOUNDATION, GroupChoice(replicate=True), Mesh(dp_shard=4), SHAPE, slow_scatter, 8)
    # one flat all-reduce of the group's 4 layers: its latency once
    assert replicated.after_backward_s == pytest.approx(2 * (3 * 20e-6 + 4 * member * 3 / 4 / 100e9))
    across_nodes = cost.group_cost(g, FOUNDATION, GroupChoice(False), Mesh(dp_shard=4), SHAPE, slow_scatter, 2)
    assert across_nodes.fsdp_comm_s == pytest.approx(4 * 2 * (3 * 10e-6 + member * 3 / 4 / 10e9))  # inter_node


def test_expert_parallel_all_to_all_hops():
    moe = group("model.layers", "foundation", 2, 10 * MB, experts=4, top_k=2, expert_params=8 * MB)
    g = model(moe)
    g = ModelGraph(g.model_class, g.model_type, g.blocks + tuple(
        Block(f"model.layers.{i}.mlp", "foundation", "moe", f"model.layers.{i}", "model.layers", 8 * MB, 32 * MB, 0.0)
        for i in range(2)), g.groups, g.total_params, g.total_param_bytes, g.vocab_size)
    plain = cost.group_cost(g, moe, GroupChoice(), Mesh(dp_shard=2, ep=2), SHAPE, hw(), 8)
    assert plain.all_to_all_hops == 2 * 5  # forward: counts, dispatch, combine; backward: combine, dispatch
    assert plain.local_expert_calls == 2 * 2 and plain.layer_calls == 2  # 2 MoE layers x 4 experts / ep 2
    # FSDP over 2 ranks for the dense part (2 gathers + a reduce-scatter per layer); each rank's experts unsharded
    assert (plain.fsdp_calls, plain.fsdp_hops) == (2 * 3, 2 * 3)
    profile = replace(hw(), local_expert_overhead_us=100.0, layer_overhead_us=10.0)
    assert cost.group_host_us(plain, profile) == pytest.approx(3 * 2 * (2 * 100 + 10))
    assert cost.group_cost(g, moe, GroupChoice(), Mesh(dp_shard=2), SHAPE, hw(), 8).local_expert_calls == 0
    recomputed = cost.group_cost(g, moe, GroupChoice(True, "full"), Mesh(dp_shard=2, ep=2), SHAPE, hw(), 8)
    assert recomputed.all_to_all_hops == 2 * 8  # the forward's three again
    wide = cost.group_cost(g, moe, GroupChoice(), Mesh(dp_shard=4, ep=4), SHAPE, hw(), 8)
    assert wide.all_to_all_hops == 2 * 5 * 3  # each all-to-all over 4 ranks: 3 hops
    assert wide.local_expert_calls == 2 * 1  # one expert per rank


def test_exposed_communication_uses_the_profile_overlap():
    g = model(FOUNDATION)
    mesh = Mesh(dp_shard=4)
    comm = sum(c.fsdp_comm_s for c in cost.all_costs(g, mesh, {"model.layers": GroupChoice()}, SHAPE, hw(), 8))
    none = cost.estimate(g, mesh, {"model.layers": GroupChoice()}, SHAPE, hw(overlap=0.0), 8)
    full = cost.estimate(g, mesh, {"model.layers": GroupChoice()}, SHAPE, hw(overlap=1.0), 8)
    assert none.exposed_comm_s == pytest.approx(comm)
    assert full.exposed_comm_s == pytest.approx(max(comm - full.compute_s, comm / 5))  # 4 layers + the root


def test_replicated_group_all_reduces_whole_gradients():
    g = model(FOUNDATION)
    mesh = Mesh(dp_shard=4)
    c = cost.group_cost(g, FOUNDATION, GroupChoice(replicate=True), mesh, SHAPE, hw(), 8)
    member = 4 * 10 * MB
    # one ring all-reduce of the whole group's gradients, after backward
    assert c.after_backward_s == pytest.approx(2 * (3 * 5e-6 + 4 * member * 3 / 4 / 100e9)) and c.fsdp_comm_s == 0
    assert c.parameters == 4 * member and c.optimizer == 2 * 4 * member and c.gathered_member == 0
    frozen = cost.group_cost(g, FOUNDATION, GroupChoice(frozen=True, replicate=True), mesh, SHAPE, hw(), 8)
    assert frozen.fsdp_comm_s == 0.0


def test_a_frozen_encoder_runs_no_backward_and_keeps_no_activations():
    enc = group("model.visual.blocks", "encoder:vision", 2, MB)
    g = model(enc, FOUNDATION)
    shape = TrainShape(128, 1, 1, "fp32", {"encoder:vision": 64.0, "encoder:vision:context": 64.0})
    c = cost.group_cost(g, enc, GroupChoice(frozen=True), Mesh(), shape, hw(), 1)
    assert c.backward_factor == 0.0 and c.compute_flops == c.forward_flops
    assert c.activations == pytest.approx(20 * 256 * 64)  # only the running layer's


def test_activation_checkpointing_terms():
    g = model(FOUNDATION)
    per_layer = 20 * 256 * 256  # bytes/token x tokens
    costs = {ac: cost.group_cost(g, FOUNDATION, GroupChoice(True, ac), Mesh(), SHAPE, hw(), 1)
             for ac in ("none", "selective", "full")}
    assert costs["none"].activations == pytest.approx(4 * per_layer)
    assert costs["selective"].activations == pytest.approx(cost.SELECTIVE_KEPT * 4 * per_layer)
    assert costs["full"].activations == pytest.approx(4 * 256 * 4 * 256 + per_layer)  # inputs kept, one rebuilt
    assert costs["full"].recompute_flops == costs["full"].forward_flops
    attention = 4 * 256 * 4 * 256 * 128  # layers x tokens x FLOPs per token per context token x context
    assert costs["selective"].recompute_flops == pytest.approx(
        cost.SELECTIVE_RECOMPUTE * (costs["none"].forward_flops - attention))  # every other matmul, no attention
    assert costs["full"].layer_calls == 8 and costs["none"].layer_calls == 4
    # the loss: fp32 log-probabilities, their gradient and the logits' gradient, as backward starts; split by SP
    root = cost.root_cost(g, Mesh(sp=2), SHAPE, hw(), 1)
    assert root.activations == pytest.approx(3 * 4 * 1000 * 256 / 2)


def test_peak_memory_picks_the_higher_phase():
    g = model(FOUNDATION)
    choices = {"model.layers": GroupChoice()}
    mesh = Mesh(dp_shard=4)
    params = (4 * 10 * MB + MB) * 4 / 4  # fp32 bytes held by one of 4 ranks

    def by_hand(shape):
        costs = cost.all_costs(g, mesh, choices, shape, hw(), 1)
        transient = 2 * 4 * 10 * MB + 4 * MB  # two unsharded layers (running + prefetched) and the root, kept
        forward = params * (3 if shape.grad_accum == 1 else 4) + sum(c.activations for c in costs) + transient
        step = params * 4  # parameters, gradients, two Adam states (fused AdamW: no temporaries)
        return max(forward, step) + GIB

    for shape in (SHAPE, TrainShape(seq_len=65536, micro_batch_size=1, grad_accum=2, precision="fp32")):
        memory = cost.memory_breakdown(g, mesh, choices, shape, hw())
        assert sum(memory.values()) == pytest.approx(by_hand(shape), abs=8)
    long = cost.memory_breakdown(g, mesh, choices, TrainShape(65536, 1, 2, "fp32"), hw())
    assert long["gradients"] == params  # an earlier micro-batch left its gradients
    # Replicated layers gather nothing: the optimizer step is the high-water mark, with the flat copy their
    # gradients' all-reduce makes.
    whole = {"model.layers": GroupChoice(replicate=True)}
    short = cost.memory_breakdown(g, mesh, whole, TrainShape(16, 1, 1, "fp32"), hw())
    assert short["activations"] == 0 and short["transient"] == 4 * 40 * MB
    assert short["gradients"] == 4 * 40 * MB + MB


def test_expert_parallel_bytes_by_hand():
    moe = group("model.layers", "foundation", 2, 10 * MB, hidden=64, experts=8, top_k=2, expert_params=8 * MB)
    blocks = tuple(Block(f"model.layers.{i}.mlp", "foundation", "moe", f"model.layers.{i}", "model.layers", 8 * MB,
                         32 * MB, 0.0, experts=8, top_k=2) for i in range(2))
    g = model(moe)
    g = ModelGraph(g.model_class, g.model_type, g.blocks + blocks, g.groups, g.total_params, g.total_param_bytes, 1000)
    mesh = Mesh(dp_shard=4, ep=2)
    rows = 256 * 2 // 2  # T*K*(ep-1)/ep rows leave the rank in each direction
    assert cost.ep_all_to_all_bytes(moe, SHAPE, mesh, recompute=False) == 2 * 2 * rows * 64 * 4 + 8 * 8 // 2
    assert cost.moe_layers(g, moe) == 2
    # EP keeps 1/ep of the experts per rank: FSDP gathers the dense part and this rank's experts only.
    assert cost.unsharded_member_bytes(moe, mesh) == 40 * MB - 32 * MB / 2


def spec(**sections):
    return spec_from_dict({"name": "t", "model": {"config": str(LLAMA)}, **sections}, "spec.yaml", ".")


def test_pareto_keeps_only_undominated_options():
    a, b, c, d = (GroupChoice(activation_checkpointing=x) for x in ("a", "b", "c", "d"))
    assert pareto([(a, 1.0, 5.0), (b, 2.0, 3.0), (c, 3.0, 4.0), (d, 4.0, 1.0)]) == [a, b, d]


def test_search_replicates_a_small_frozen_encoder_and_shards_the_foundation():
    enc = group("model.visual.blocks", "encoder:vision", 2, MB)
    big = group("model.layers", "foundation", 8, 50 * MB)
    s = spec(cluster={"procs_per_node": 4}, train={"global_batch_size": 4}, model={"config": str(LLAMA),
             "freeze": ["model.visual"]}, parallel={"dp_replicate": 1, "sp": 1})
    plan = make_plan(s, model(enc, big), hw(memory_gib=8.0), {"image": {"encoder_tokens_per_item": 64}})
    by_name = {g.name: g for g in plan.groups}
    assert by_name["model.visual.blocks"].replicate and by_name["model.visual.blocks"].frozen
    assert not by_name["model.layers"].replicate and by_name["model.layers"].shard_dims == ("dp_shard",)


def test_search_gives_groups_different_checkpointing_when_only_one_needs_it():
    enc = group("model.visual.blocks", "encoder:vision", 2, MB, hidden=64)
    big = group("model.layers", "foundation", 8, 20 * MB, hidden=1024)
    s = spec(cluster={"procs_per_node": 2}, train={"global_batch_size": 2, "seq_len": 8192},
             parallel={"dp_replicate": 1, "sp": 1})
    inputs = {"image": {"encoder_tokens_per_item": 64}}
    g = model(enc, big)
    roomy = make_plan(s, g, hw(memory_gib=80.0), inputs)
    assert {p.activation_checkpointing for p in roomy.groups} == {"none"}
    # Take away half the activations: the foundation's dominate, so it recomputes; the encoder keeps its own.
    budget = roomy.predicted["peak_memory_bytes"] - roomy.predicted["memory"]["activations"] / 2
    tight = make_plan(s, g, hw(memory_gib=budget / GIB), inputs)
    by_name = {p.name: p for p in tight.groups}
    assert by_name["model.visual.blocks"].activation_checkpointing == "none"
    assert by_name["model.layers"].activation_checkpointing != "none"


def with_lm_head(g, hidden=256):
    """The graph with an LM head block (hidden x vocab, as the analyzer prices it: 2 FLOPs per weight per token)."""
    head = Block("lm_head", "head", "head", None, None, hidden * g.vocab_size, 4 * hidden * g.vocab_size,
                 2.0 * hidden * g.vocab_size, tensors=1)
    return replace(g, blocks=g.blocks + (head,), lm_head="lm_head")


def test_chunked_loss_memory_recompute_and_calls_by_hand():
    """The whole-sequence loss holds ~12 B x vocab per token of the rank's micro-batch (fp32 log-probabilities,
    their gradient, the logits' gradient); in chunks, only one chunk's. The chunks cost one more LM head forward
    (the recompute in backward) and two calls each (forward and recompute), priced like layer calls."""
    g = with_lm_head(model(FOUNDATION, vocab=32_000))
    shape = TrainShape(seq_len=8192, micro_batch_size=2, grad_accum=1, precision="fp32")
    tokens = 2 * 8192 / 2  # per rank under sp=2
    mesh = Mesh(dp_shard=2, sp=2)
    assert cost.logits_bytes(g, shape, mesh) == 12 * 32_000 * tokens
    chunked = replace(shape, loss_chunk_tokens=1024)
    assert cost.logits_bytes(g, chunked, mesh) == 12 * 32_000 * 1024
    assert cost.logits_bytes(g, replace(shape, loss_chunk_tokens=1 << 20), mesh) == 12 * 32_000 * tokens  # one chunk
    whole_root = cost.root_cost(g, mesh, shape, hw(), 8)
    root = cost.root_cost(g, mesh, chunked, hw(), 8)
    assert whole_root.recompute_flops == 0 and whole_root.layer_calls == 0
    assert root.recompute_flops == 2 * 256 * 32_000 * tokens and root.layer_calls == 2 * 8  # 8 chunks of 1024
    assert root.activations == cost.logits_bytes(g, chunked, mesh)
    choices = {"model.layers": GroupChoice()}
    whole_e = cost.estimate(g, mesh, choices, shape, hw(layer_us=100.0), 8)
    e = cost.estimate(g, mesh, choices, chunked, hw(layer_us=100.0), 8)
    assert e.recompute_s - whole_e.recompute_s == pytest.approx(root.recompute_flops / 0.5e12)
    assert e.host_s - whole_e.host_s == pytest.approx(3 * 2 * 8 * 100e-6)  # forward + 2x backward per call
    assert whole_e.peak_memory_bytes - e.peak_memory_bytes == pytest.approx(12 * 32_000 * (tokens - 1024), abs=8)


def test_short_sequences_keep_the_whole_sequence_loss_and_its_prediction():
    """The planner only chunks the loss where chunks are shorter than a rank's tokens and it pays: a tiny spec's
    plan and prediction are what they were before chunking existed (loss_chunk_tokens 0)."""
    s = spec(cluster={"procs_per_node": 2}, train={"seq_len": 128, "global_batch_size": 4})
    g = with_lm_head(model(FOUNDATION, vocab=1024))
    plan = make_plan(s, g, hw(layer_us=100.0, step_ms=2.0), {})
    assert plan.train["loss_chunk_tokens"] == 0
    mesh, choices = Mesh(**plan.mesh), {"model.layers": GroupChoice(plan.groups[0].reshard_after_forward,
                                                                    plan.groups[0].activation_checkpointing,
                                                                    replicate=plan.groups[0].replicate)}
    shape = TrainShape(128, 1, plan.train["grad_accum"], "fp32",
                       sync_once_per_step=plan.train["sync_gradients_once_per_step"])
    before = cost.estimate(g, mesh, choices, shape, hw(layer_us=100.0, step_ms=2.0), 2)
    assert plan.predicted["step_time_s"] == pytest.approx(before.step_time_s, abs=1e-6)  # summary rounds to 1 us
