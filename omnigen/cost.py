"""The cost model: predicted step time and peak memory of one (mesh, per-group choices) candidate.

Pure arithmetic over the ModelGraph, a HardwareProfile and the training shape. Every prediction keeps
its breakdown (compute / exposed communication / recompute; parameters / gradients / optimizer /
activations / transients / overhead) so `omnigen plan --explain` and `omnigen bench` can show it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .hardware import GIB, HardwareProfile, Link
from .model_graph import Group, ModelGraph

BYTES = {"fp32": 4, "bf16": 2}
ADAM_STATES = 2                 # exp_avg and exp_avg_sq, fp32, sharded like the parameters
FSDP_PREFETCH_UNITS = 2         # the running unit and the one prefetched ahead of it stay unsharded
# Selective AC (the script's save_matmuls_context) keeps attention and every other matmul output; it recomputes the
# other matmuls (k, o and up projections in a Llama layer: about this share of the matmul FLOPs) and the pointwise ops.
SELECTIVE_RECOMPUTE = 0.37
# What it keeps, as a share of the layer's activations without checkpointing: measured as peak allocated memory of a
# 4-layer Llama (hidden 256, intermediate 896, 8 / 2 heads, seq 2048: Llama 3 8B's proportions) less the loss's part,
# 99.7 MiB under the policy vs 186.8 MiB without (CPU, torch 2.13, profiler memory events).
SELECTIVE_KEPT = 0.53
OPTIMIZER_BYTES_PER_PARAM = 40  # AdamW reads p, g, m, v and writes p, m, v (28 B fp32); clipping reads and scales g


@dataclass(frozen=True)
class TrainShape:
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    precision: str
    tokens_per_sample: dict[str, float] = field(default_factory=dict)  # role -> tokens a sample brings
    # Foundation attention under a dense [B, 1, S, S] boolean mask, whose blocks no causal kernel skips and which
    # backward keeps: "documents" (packed rows: omnigen's attention builds one in each layer) or "model"
    # (token_type_ids: transformers builds one per attention pattern before the stack, and every layer reads it).
    dense_mask: str = ""
    loss_chunk_tokens: int = 0  # the loss runs this many of a rank's tokens at a time (0: all of them at once)
    # Gradients reduced once per step, after the last micro-batch: the earlier ones accumulate them unsharded.
    sync_once_per_step: bool = False

    @property
    def reductions_per_micro_batch(self) -> float:
        """Gradient reductions (reduce-scatters, all-reduces) per micro-batch: one each, or one per step spread
        over its micro-batches."""
        return 1 / self.grad_accum if self.sync_once_per_step else 1.0

    def tokens(self, role: str) -> float:
        """Tokens per micro-batch that blocks of this role process."""
        per_sample = self.tokens_per_sample.get(role, self.seq_len if not role.startswith("encoder") else 0)
        return per_sample * self.micro_batch_size

    def context(self, role: str) -> float:
        """Attention context length for this role (encoders attend within their own items)."""
        return self.tokens_per_sample.get(f"{role}:context", self.seq_len)


@dataclass(frozen=True)
class GroupChoice:
    reshard_after_forward: bool = True
    activation_checkpointing: str = "none"   # none | selective | full
    frozen: bool = False
    replicate: bool = False                  # whole parameters on every rank: no gathers, gradients all-reduced


@dataclass(frozen=True)
class Mesh:
    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        """Ranks in the mesh: EP folds inside the data-parallel dims."""
        return self.dp * self.sp

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Estimate:
    step_time_s: float
    compute_s: float
    recompute_s: float
    comm_s: float
    exposed_comm_s: float
    host_s: float
    optimizer_s: float
    peak_memory_bytes: int
    memory: dict[str, int]
    tokens_per_s_per_device: float
    mfu: float

    def summary(self) -> dict[str, Any]:
        return {"step_time_s": round(self.step_time_s, 6),
                "tokens_per_s_per_device": round(self.tokens_per_s_per_device, 2),
                "peak_memory_bytes": int(self.peak_memory_bytes), "mfu": round(self.mfu, 4),
                "breakdown": {"compute_s": round(self.compute_s, 6), "recompute_s": round(self.recompute_s, 6),
                              "comm_s": round(self.comm_s, 6), "exposed_comm_s": round(self.exposed_comm_s, 6),
                              "host_s": round(self.host_s, 6), "optimizer_s": round(self.optimizer_s, 6)},
                "memory": self.memory}


# --- collectives: alpha-beta, ring algorithms --------------------------------------------------------------

def all_gather_s(total_bytes: float, n: int, link: Link) -> float:
    """Ring all-gather of a tensor whose full size is total_bytes over n ranks."""
    return 0.0 if n <= 1 else (n - 1) * link.latency_s + total_bytes * (n - 1) / n / link.bytes_per_s


def reduce_scatter_s(total_bytes: float, n: int, link: Link) -> float:
    return all_gather_s(total_bytes, n, link)


def all_reduce_s(total_bytes: float, n: int, link: Link) -> float:
    return reduce_scatter_s(total_bytes, n, link) + all_gather_s(total_bytes, n, link)


def shard_link(mesh: Mesh, procs_per_node: int, hw: HardwareProfile, collective: str) -> Link:
    """FSDP's shard dim is innermost: it stays on NVLink while it fits in a node."""
    return hw.link(collective, mesh.dp_shard * mesh.sp <= procs_per_node)


def replicate_link(mesh: Mesh, procs_per_node: int, hw: HardwareProfile) -> Link:
    """Where gradients are all-reduced across replicas (or over every rank, for a replicated group)."""
    return hw.link("all_reduce", mesh.dp_replicate * mesh.dp_shard * mesh.sp <= procs_per_node)


# --- the model ---------------------------------------------------------------------------------------------

SEQUENCE_SPLIT_ROLES = ("foundation", "head", "decoder")  # encoders and projectors run replicated across an SP group


def sp_share(role: str, mesh: Mesh) -> float:
    """Fraction of a micro-batch's tokens of this role that one rank processes."""
    return 1 / mesh.sp if role in SEQUENCE_SPLIT_ROLES else 1.0


def group_forward_flops(g: Group, shape: TrainShape, mesh: Mesh = Mesh()) -> float:
    """Forward FLOPs of one member for one micro-batch on one rank (attention still sees the full context)."""
    tokens = shape.tokens(g.role) * sp_share(g.role, mesh)
    return tokens * g.flops_per_token + group_attention_flops(g, shape, mesh)


def group_attention_flops(g: Group, shape: TrainShape, mesh: Mesh = Mesh()) -> float:
    """The attention scores' share of those FLOPs: the score entries the kernel computes, counted whole (a
    windowed / chunked layer computes about 2 x its span per query, not the whole context; see attention_keys)."""
    keys = attention_keys(g, shape, mesh)
    return (shape.tokens(g.role) * sp_share(g.role, mesh) * g.attn_flops_per_token_per_seq
            * sum(k for k, _ in keys) / len(keys))


def attention_keys(g: Group, shape: TrainShape, mesh: Mesh = Mesh()) -> list[tuple[float, bool]]:
    """Per member (one entry for a group of plain layers): the keys each query is scored against, and whether a
    causal kernel skips the blocks above the diagonal.

    Causal layers score the whole context; the causal kernel (the foundation's, unless its mask is dense) skips
    above the diagonal. A sliding-window or chunked layer narrower than the context runs omnigen's banded_attention
    under Ulysses or packing (blocks of span queries against 2 x span keys) and SDPA under a mask dense over the
    whole context otherwise (transformers' own, or the model's token-type masks, which Ulysses applies as built)."""
    context = shape.context(g.role)
    banded = (mesh.sp > 1 or shape.dense_mask == "documents") and shape.dense_mask != "model"
    out = []
    for kind, span in g.attention_spans or (("causal", 0),):
        if kind != "causal" and span < context:
            out.append((-(-context // span) * span * 2 * span / context if banded else context, False))
        else:
            out.append((context, g.role == "foundation" and not shape.dense_mask))
    return out


def dense_mask_bytes(g: Group, shape: TrainShape, activation_checkpointing: str) -> float:
    """The dense boolean masks a group keeps alive at the end of forward (see TrainShape.dense_mask): every rank
    holds the whole sequence's mask, Ulysses or not. A checkpointed layer rebuilds its own mask in backward."""
    if g.role != "foundation" or not shape.dense_mask:
        return 0.0
    mask = shape.micro_batch_size * shape.context(g.role) ** 2
    if shape.dense_mask == "model":
        return mask * len({kind for kind, _ in g.attention_spans or (("causal", 0),)})
    return mask * (g.count if activation_checkpointing == "none" else 1)


def attention_s(g: Group, flops: float, shape: TrainShape, hw: HardwareProfile, mesh: Mesh = Mesh()) -> float:
    """Time of a group's attention-score FLOPs (counted whole, as group_attention_flops counts them) at the attention
    rate, less the blocks a causal kernel skips."""
    keys = attention_keys(g, shape, mesh)
    share = sum(k * (hw.causal_share(shape.context(g.role)) if causal else 1.0) for k, causal in keys) / sum(
        k for k, _ in keys)
    return flops * share / hw.attention_flops(shape.precision)


def root_forward_flops(graph: ModelGraph, shape: TrainShape, mesh: Mesh = Mesh()) -> float:
    """Blocks outside the repeated groups (embeddings, projector, lm_head): no sequence term."""
    return sum(shape.tokens(b.role) * sp_share(b.role, mesh) * b.flops_per_token for b in graph.blocks
               if b.parent is None and b.group is None)


def root_param_bytes(graph: ModelGraph) -> int:
    return graph.total_param_bytes - sum(g.param_bytes * g.count for g in graph.groups)


def padded_seq_len(seq_len: int, sp: int) -> int:
    return -(-seq_len // sp) * sp


SP_CALLS_PER_PASS = 2  # Ulysses all-to-alls per layer and pass: query, key and value in one, then the output


def sp_all_to_all_bytes(g: Group, shape: TrainShape, sp: int, recompute: bool) -> int:
    """Bytes one rank sends in Ulysses all-to-alls for one member and one micro-batch.

    Forward moves q, k, v (kv heads repeated up to sp when fewer) and the attention output; backward moves their
    gradients; a checkpointed layer repeats its forward. Each all-to-all keeps 1/sp of its input local."""
    if sp == 1 or g.role != "foundation" or not g.heads:
        return 0
    local = shape.micro_batch_size * (padded_seq_len(shape.seq_len, sp) // sp) * g.head_dim * BYTES[shape.precision]
    kv_heads = max(g.kv_heads, sp)
    per_pass = sum(local * heads * (sp - 1) // sp for heads in (g.heads, kv_heads, kv_heads, g.heads))
    return per_pass * (3 if recompute else 2)


def moe_layers(graph: ModelGraph, g: Group) -> int:
    """Members of the group that route to experts (DeepSeek-V3's first layers are dense)."""
    return sum(1 for b in graph.blocks if b.kind == "moe" and b.group == g.name)


def expert_bytes(g: Group) -> float:
    """Routed-expert parameter bytes of one member (fp32 masters): the part EP splits."""
    return g.expert_params * (g.param_bytes / g.params if g.params else 4)


def unsharded_member_bytes(g: Group, mesh: Mesh) -> float:
    """What FSDP all-gathers for one member: with EP, only this rank's 1/ep of the experts."""
    return g.param_bytes - expert_bytes(g) * (1 - 1 / mesh.ep)


def ep_all_to_all_bytes(g: Group, shape: TrainShape, mesh: Mesh, recompute: bool, balanced: bool = True) -> int:
    """Bytes one rank sends in one MoE layer's EP exchanges for one micro-batch.

    Balanced router: each rank sends T*K/ep rows to every rank (itself included): forward dispatch + combine and
    the backward pair move 4*T*K*(ep-1)/ep rows of H*b bytes, plus the int64 per-expert counts (forward only); a
    checkpointed layer repeats its forward. Worst case (balanced=False): all of a rank's rows leave it and it
    receives every other rank's rows, 2*ep*T*K rows per pass pair."""
    if mesh.ep == 1 or not g.experts:
        return 0
    ep, k, b = mesh.ep, g.top_k, BYTES[shape.precision]
    tokens = int(shape.tokens(g.role) * sp_share(g.role, mesh))
    rows_per_pass = tokens * k * (ep - 1) // ep if balanced else ep * tokens * k
    passes = 3 if recompute else 2  # forward, backward, and the recomputed forward
    counts = 8 * g.experts * (ep - 1) // ep
    return passes * (2 * rows_per_pass * g.hidden * b) + (passes - 1) * counts


def all_to_all_s(bytes_sent: float, calls: int, n: int, link: Link) -> float:
    """`calls` all-to-alls over n ranks that together send bytes_sent from this rank."""
    return calls * (n - 1) * link.latency_s + bytes_sent / link.bytes_per_s


@dataclass(frozen=True)
class GroupCost:
    """One block group's share of a micro-batch (time) and of the device (memory), on one rank."""
    forward_flops: float
    recompute_flops: float
    forward_s: float            # forward_flops' time on this hardware
    recompute_s: float          # recompute_flops' time
    backward_factor: float      # backward FLOPs per forward FLOP: 2, 1 for frozen layers, 0 for a frozen encoder
    layer_calls: float          # layer forwards per micro-batch, recomputed ones included
    local_expert_calls: float   # expert forwards under EP: MoE layers x this rank's experts (recomputed ones too)
    fsdp_comm_s: float          # all-gathers, reduce-scatters, gradient all-reduces: prefetching can hide them
    all_to_all_s: float         # Ulysses and EP exchanges: on the critical path
    after_backward_s: float     # a replicated group's share of the one gradient all-reduce after backward: exposed
    flattened_gradients: float  # bytes that all-reduce copies the group's gradients into
    fsdp_hops: float            # latency hops of the collectives FSDP2 launches from its hooks: each costs host time
    fsdp_calls: float           # those collectives, counted per call: FSDP's hooks and copies around each
    all_to_all_hops: float      # hops of the script's own Ulysses and EP all-to-alls: bare calls, cheaper to launch
    tensors: float              # trainable local parameter tensors: the optimizer's per-tensor work
    parameters: float
    gradients: float
    accumulated_gradients: float  # gradient bytes held from one micro-batch to the next (unsharded when synced once)
    optimizer: float
    activations: float
    gathered_member: float      # bytes one unsharded member holds while it runs (0 when replicated)
    kept_gathered: float        # unsharded bytes held from forward to backward (reshard_after_forward=False)

    @property
    def compute_flops(self) -> float:
        return self.forward_flops * (1 + self.backward_factor) + self.recompute_flops

    @property
    def compute_s(self) -> float:
        return self.forward_s * (1 + self.backward_factor) + self.recompute_s


def backward_factor(g: Group, choice: GroupChoice) -> float:
    """Frozen layers still pass gradients to their inputs, unless nothing before them trains (a frozen encoder)."""
    if not choice.frozen:
        return 2.0
    return 0.0 if g.role.startswith("encoder") else 1.0


def group_cost(graph: ModelGraph, g: Group, choice: GroupChoice, mesh: Mesh, shape: TrainShape,
               hw: HardwareProfile, procs_per_node: int) -> GroupCost:
    fsdp_n = mesh.dp_shard * mesh.sp
    compute_bytes = BYTES[shape.precision]
    to_compute = compute_bytes / 4  # parameters are fp32 masters; collectives and activations use the compute dtype
    forward = group_forward_flops(g, shape, mesh) * g.count
    attention = group_attention_flops(g, shape, mesh) * g.count
    matmul = forward - attention
    matmul_s = matmul / hw.achieved_flops(shape.precision)
    forward_s = matmul_s + attention_s(g, attention, shape, hw, mesh)
    recompute, recompute_s = {"none": (0.0, 0.0), "full": (forward, forward_s),
                              "selective": (SELECTIVE_RECOMPUTE * matmul, SELECTIVE_RECOMPUTE * matmul_s)
                              }[choice.activation_checkpointing]
    recomputes = choice.activation_checkpointing != "none"
    forwards = 2 if recomputes else 1  # a checkpointed layer runs its forward again in backward
    trains = not choice.frozen

    # Parameters: a replicated group holds them whole; EP splits the routed experts before FSDP shards the rest.
    experts, dense = expert_bytes(g) / mesh.ep, g.param_bytes - expert_bytes(g)
    reductions = shape.reductions_per_micro_batch if trains else 0.0
    after_backward, flattened = 0.0, 0.0
    if choice.replicate:
        # Plain parameters outside FSDP: no gathers, no hooks; the script sums every replicated gradient in one
        # flat all-reduce per step, after the last micro-batch's backward (a 1/grad_accum share of it each).
        held = g.count * (dense + experts)
        per_step = 1 / shape.grad_accum if trains and mesh.world_size > 1 else 0.0
        after_backward = per_step * all_reduce_s(held, mesh.world_size, replicate_link(mesh, procs_per_node, hw))
        flattened = held if per_step else 0.0
        comm, fsdp, calls = 0.0, per_step * all_reduce_hops(mesh.world_size), 0
        gathered = 0.0
    else:
        held = g.count * (dense / fsdp_n + experts / (fsdp_n // mesh.ep))
        gather_l, scatter_l = (shard_link(mesh, procs_per_node, hw, c) for c in ("all_gather", "reduce_scatter"))
        repl_l = replicate_link(mesh, procs_per_node, hw)
        # a resharded unit gathers again for backward, unless nothing flows back through it (a frozen encoder)
        gathers = 2 if choice.reshard_after_forward and backward_factor(g, choice) else 1
        comm, fsdp, calls = 0.0, 0, 0
        for member, n in ((dense * to_compute, fsdp_n), (experts * to_compute, fsdp_n // mesh.ep)):
            if member:
                comm += g.count * gathers * all_gather_s(member, n, gather_l)
                fsdp += g.count * fsdp_hops(n, mesh.dp_replicate, gathers, reductions)
                calls += g.count * fsdp_calls(n, mesh.dp_replicate, gathers, reductions)
                comm += reductions * g.count * (reduce_scatter_s(member, n, scatter_l)
                                                + all_reduce_s(member / n, mesh.dp_replicate, repl_l))
        gathered = unsharded_member_bytes(g, mesh) * to_compute

    # EP dispatch and Ulysses all-to-alls sit on the critical path: the experts (attention) wait for them.
    a2a_l = hw.link("all_to_all", mesh.sp <= procs_per_node)
    passes = forwards + 1  # and one backward
    a2a, a2a_hops = 0.0, 0
    ep_bytes = ep_all_to_all_bytes(g, shape, mesh, recomputes)
    if ep_bytes:
        # each forward exchanges the per-expert counts, then dispatches and combines the rows; backward moves the rows
        ep_calls = 3 * forwards + 2
        a2a += moe_layers(graph, g) * all_to_all_s(ep_bytes, ep_calls, mesh.ep, a2a_l)
        a2a_hops += moe_layers(graph, g) * ep_calls * (mesh.ep - 1)
    sp_bytes = sp_all_to_all_bytes(g, shape, mesh.sp, recomputes)
    if sp_bytes:
        a2a += g.count * all_to_all_s(sp_bytes, SP_CALLS_PER_PASS * passes, mesh.sp, a2a_l)
        a2a_hops += g.count * SP_CALLS_PER_PASS * passes * (mesh.sp - 1)

    tokens = shape.tokens(g.role) * sp_share(g.role, mesh)
    per_layer = g.act_bytes_per_token * tokens * to_compute
    activations = {"none": g.count * per_layer,
                   "selective": SELECTIVE_KEPT * g.count * per_layer,
                   # full: each layer's input is kept; one layer at a time is rebuilt in backward
                   "full": g.count * g.hidden * compute_bytes * tokens + per_layer}[choice.activation_checkpointing]
    if backward_factor(g, choice) == 0:
        activations = per_layer  # no backward through it: nothing is kept beyond the running layer
    activations += dense_mask_bytes(g, shape, choice.activation_checkpointing)
    return GroupCost(
        forward_flops=forward, recompute_flops=recompute, forward_s=forward_s, recompute_s=recompute_s,
        backward_factor=backward_factor(g, choice),
        layer_calls=g.count * forwards,
        local_expert_calls=moe_layers(graph, g) * forwards * g.experts // mesh.ep if mesh.ep > 1 else 0,
        fsdp_comm_s=comm, all_to_all_s=a2a, after_backward_s=after_backward, flattened_gradients=flattened,
        fsdp_hops=fsdp, fsdp_calls=calls, all_to_all_hops=a2a_hops, tensors=g.count * g.tensors if trains else 0,
        parameters=held, gradients=held if trains else 0.0,
        accumulated_gradients=(g.count * (dense + experts) if shape.sync_once_per_step else held) if trains else 0.0,
        optimizer=ADAM_STATES * held if trains else 0.0,
        activations=activations, gathered_member=gathered,
        kept_gathered=0.0 if choice.reshard_after_forward or choice.replicate else (g.count - 1) * gathered)


def fsdp_hops(shard: int, replicate: int, gathers: int, reductions: float) -> float:
    """Latency hops of the collectives one FSDP unit launches per micro-batch: its ring all-gathers, then
    `reductions` times (TrainShape.reductions_per_micro_batch; 0 when it does not train) the gradient reduce-scatter
    and, under HSDP, the all-reduce across replicas."""
    return (gathers + reductions) * (shard - 1) + reductions * all_reduce_hops(replicate)


def fsdp_calls(shard: int, replicate: int, gathers: int, reductions: float) -> float:
    """The same collectives counted per call; none on a mesh dim of one."""
    return gathers * (shard > 1) + reductions * ((shard > 1) + (replicate > 1))


def all_reduce_hops(n: int) -> int:
    return 2 * (n - 1)


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def root_cost(graph: ModelGraph, mesh: Mesh, shape: TrainShape, hw: HardwareProfile, procs_per_node: int,
              frozen: tuple[str, ...] = ()) -> GroupCost:
    """Embeddings, projector, norms and heads: one FSDP unit, kept unsharded from forward to backward."""
    fsdp_n = mesh.dp_shard * mesh.sp
    to_compute = BYTES[shape.precision] / 4
    full = root_param_bytes(graph)
    root_blocks = [b for b in graph.blocks if b.parent is None and b.group is None]
    trainable = full - sum(b.param_bytes for b in root_blocks if under(b.name, frozen))
    reductions = shape.reductions_per_micro_batch
    comm = (all_gather_s(full * to_compute, fsdp_n, shard_link(mesh, procs_per_node, hw, "all_gather"))
            + reductions * (reduce_scatter_s(full * to_compute, fsdp_n,
                                             shard_link(mesh, procs_per_node, hw, "reduce_scatter"))
                            + all_reduce_s(full * to_compute / fsdp_n, mesh.dp_replicate,
                                           replicate_link(mesh, procs_per_node, hw))))
    forward = root_forward_flops(graph, shape, mesh)
    # A chunked loss runs the LM head twice per chunk (forward, and again in backward): priced like a layer call each.
    chunks = loss_chunks(graph, shape, mesh)
    recompute = lm_head_forward_flops(graph, shape, mesh) if chunks else 0.0
    return GroupCost(forward_flops=forward, recompute_flops=recompute,
                     forward_s=forward / hw.achieved_flops(shape.precision),
                     recompute_s=recompute / hw.achieved_flops(shape.precision), backward_factor=2.0,
                     layer_calls=2.0 * chunks, local_expert_calls=0.0, fsdp_comm_s=comm, all_to_all_s=0.0,
                     after_backward_s=0.0, flattened_gradients=0.0,
                     fsdp_hops=fsdp_hops(fsdp_n, mesh.dp_replicate, 1, reductions),
                     fsdp_calls=fsdp_calls(fsdp_n, mesh.dp_replicate, 1, reductions), all_to_all_hops=0,
                     tensors=sum(b.tensors for b in root_blocks if not under(b.name, frozen)), parameters=full / fsdp_n,
                     gradients=trainable / fsdp_n,
                     accumulated_gradients=trainable if shape.sync_once_per_step else trainable / fsdp_n,
                     optimizer=ADAM_STATES * trainable / fsdp_n,
                     activations=logits_bytes(graph, shape, mesh), gathered_member=0.0,
                     kept_gathered=full * to_compute)


def all_costs(graph: ModelGraph, mesh: Mesh, choices: dict[str, GroupChoice], shape: TrainShape,
              hw: HardwareProfile, procs_per_node: int, frozen: tuple[str, ...] = ()) -> list[GroupCost]:
    return [root_cost(graph, mesh, shape, hw, procs_per_node, frozen)] + [
        group_cost(graph, g, choices[g.name], mesh, shape, hw, procs_per_node) for g in graph.groups]


def peak_memory(costs: list[GroupCost], shape: TrainShape, hw: HardwareProfile) -> dict[str, int]:
    """What is alive at the step's high-water mark, whichever comes higher:
    - end of forward: parameters, optimizer state, every kept activation, the prefetch window of unsharded layers
      (gradients only when an earlier micro-batch left them, unsharded when they are reduced once per step:
      zero_grad frees them after each step);
    - optimizer step: parameters, gradients and optimizer state (the fused AdamW and the in-place clipping allocate
      nothing more; foreach AdamW made about one gradient of temporaries), and just before it the flat copy of the
      replicated groups' gradients their all-reduce sums."""
    params, grads, optim = (sum(getattr(c, k) for c in costs) for k in ("parameters", "gradients", "optimizer"))
    transient = (FSDP_PREFETCH_UNITS * max(c.gathered_member for c in costs)
                 + sum(c.kept_gathered for c in costs))
    accumulated = sum(c.accumulated_gradients for c in costs) if shape.grad_accum > 1 else 0.0
    forward = {"parameters": params, "gradients": accumulated, "optimizer": optim,
               "activations": sum(c.activations for c in costs), "transient": transient}
    step = {"parameters": params, "gradients": grads, "optimizer": optim, "activations": 0.0,
            "transient": sum(c.flattened_gradients for c in costs)}
    at_peak = max((forward, step), key=lambda m: sum(m.values()))
    return {**{k: int(v) for k, v in at_peak.items()}, "overhead": int(hw.overhead_gib * GIB)}


def estimate(graph: ModelGraph, mesh: Mesh, choices: dict[str, GroupChoice], shape: TrainShape,
             hw: HardwareProfile, procs_per_node: int, frozen: tuple[str, ...] = (),
             costs: list[GroupCost] | None = None) -> Estimate:
    """Step time and peak memory of one rank; `frozen` lists the spec's frozen module prefixes. `costs`: all_costs'
    result when the caller has it already (the search reuses each group's and the root's costs across candidates)."""
    if costs is None:
        costs = all_costs(graph, mesh, choices, shape, hw, procs_per_node, frozen)
    micro = shape.grad_accum
    compute_s = sum(c.forward_s * (1 + c.backward_factor) for c in costs) * micro
    recompute_s = sum(c.recompute_s for c in costs) * micro
    host_s = host_seconds(costs, mesh, hw, micro, tower_host_ms(graph, shape, hw, choices), graph.router_aux_loss)
    fsdp_s = sum(c.fsdp_comm_s for c in costs) * micro
    a2a_s = sum(c.all_to_all_s + c.after_backward_s for c in costs) * micro  # on the critical path
    units = 1 + sum(g.count for g in graph.groups)
    # Prefetching hides FSDP collectives behind compute, except the first unit's gather, which nothing precedes.
    exposed = max(fsdp_s - hw.overlap * (compute_s + recompute_s), fsdp_s / units) + a2a_s
    optimizer_s = optimizer_step_s(costs, mesh, hw, graph.router_aux_loss)
    step = compute_s + recompute_s + host_s + exposed + optimizer_s
    memory = peak_memory(costs, shape, hw)
    tokens = shape.seq_len * shape.micro_batch_size * micro / mesh.sp
    return Estimate(step_time_s=step, compute_s=compute_s, recompute_s=recompute_s, comm_s=fsdp_s + a2a_s,
                    exposed_comm_s=exposed, host_s=host_s, optimizer_s=optimizer_s,
                    peak_memory_bytes=sum(memory.values()), memory=memory,
                    tokens_per_s_per_device=tokens / step,
                    mfu=sum(c.forward_flops * (1 + c.backward_factor) for c in costs) * micro / step
                    / hw.peak_flops[shape.precision])


def group_time_s(c: GroupCost, hw: HardwareProfile) -> float:
    """A group's time per micro-batch on its own, nothing hidden: how the planner ranks a group's options."""
    return c.compute_s + c.fsdp_comm_s + c.all_to_all_s + c.after_backward_s + group_host_us(c, hw) * 1e-6


def group_memory_bytes(c: GroupCost) -> float:
    """A group's memory on its own: its state, kept activations and unsharded copies (prefetch window included)."""
    return (c.parameters + c.gradients + c.optimizer + c.activations + FSDP_PREFETCH_UNITS * c.gathered_member
            + c.kept_gathered)


def group_host_us(c: GroupCost, hw: HardwareProfile) -> float:
    """Host time of a group per micro-batch: each layer call and, under EP, each local expert's call (a backward
    counts twice, none for a frozen encoder), every latency hop of its collectives (FSDP's and the bare
    all-to-alls), and FSDP's hooks and copies per call."""
    passes = 1 + c.backward_factor
    layers = passes * (c.layer_calls * hw.layer_overhead_us + c.local_expert_calls * hw.local_expert_overhead_us)
    return layers + (c.fsdp_hops * hw.collective_hop_overhead_us + c.fsdp_calls * hw.fsdp_call_overhead_us
                     + c.all_to_all_hops * hw.all_to_all_hop_overhead_us)


STEP_COLLECTIVES = 1  # per step, before the micro-batches: the all-reduce of the label-token count


def tower_host_ms(graph: ModelGraph, shape: TrainShape, hw: HardwareProfile,
                  choices: dict[str, GroupChoice]) -> float:
    """Host time per micro-batch of the encoder towers that run on it (those the samples bring tokens for). The
    calibrated figure is a trained tower's forward and backward; a frozen one runs its forward alone (a third)."""
    per_tower = {"encoder:vision": hw.vision_tower_overhead_ms, "encoder:audio": hw.audio_tower_overhead_ms}
    backward = {g.role: backward_factor(g, choices[g.name]) for g in graph.groups}
    return sum(per_tower.get(role, 0.0) * (1 + backward.get(role, 2.0)) / 3
               for role in graph.towers if shape.tokens(role) > 0)


def host_seconds(costs: list[GroupCost], mesh: Mesh, hw: HardwareProfile, micro: int, towers_ms: float,
                 router_aux: bool) -> float:
    """Host work of the forward and backward passes: every group's (group_host_us), each micro-batch's data,
    embeddings, loss and encoder towers' own work, and the script's own all-reduces: the step's label-token count;
    under Ulysses, the router aux loss's sums over the SP group (forward and backward) in every micro-batch."""
    micro_hops = 2 * all_reduce_hops(mesh.sp) if router_aux else 0
    per_micro_us = (sum(group_host_us(c, hw) for c in costs) + (hw.step_overhead_ms + towers_ms) * 1e3
                    + micro_hops * hw.collective_hop_overhead_us)
    step_hops = STEP_COLLECTIVES * all_reduce_hops(mesh.world_size)
    return (per_micro_us * micro + step_hops * hw.collective_hop_overhead_us) * 1e-6


def optimizer_step_s(costs: list[GroupCost], mesh: Mesh, hw: HardwareProfile, router_aux: bool) -> float:
    """Gradient clipping and AdamW stream every trainable local element through memory a few times, and pay a
    dispatch per parameter tensor and their own collectives."""
    trainable_elements = sum(c.gradients for c in costs) / 4  # fp32 masters
    streaming = (OPTIMIZER_BYTES_PER_PARAM * trainable_elements / (hw.memory_bandwidth_gbps * 1e9)
                 if hw.memory_bandwidth_gbps else 0.0)
    return (streaming + sum(c.tensors for c in costs) * hw.optimizer_tensor_us * 1e-6
            + optimizer_hops(mesh, router_aux) * hw.collective_hop_overhead_us * 1e-6)


def optimizer_hops(mesh: Mesh, router_aux: bool = False) -> int:
    """Latency hops of the step's collectives after backward: the loss all-reduce over every rank (and the router
    aux loss's, when the model has one), and clipping's squared-norm all-reduces, each over the ranks a mesh's
    gradients are sharded on (FSDP's shard group; the experts' shard group, then the EP group; a replicated
    group's gradients are whole: nothing to reduce)."""
    fsdp_n = mesh.dp_shard * mesh.sp
    hops = (1 + router_aux) * all_reduce_hops(mesh.world_size) + all_reduce_hops(fsdp_n)
    if mesh.ep > 1:
        hops += all_reduce_hops(fsdp_n // mesh.ep) + all_reduce_hops(mesh.ep)
    return hops


def memory_breakdown(graph: ModelGraph, mesh: Mesh, choices: dict[str, GroupChoice], shape: TrainShape,
                     hw: HardwareProfile, frozen: tuple[str, ...] = ()) -> dict[str, int]:
    """Peak memory per device by kind (links do not matter for memory: a single node is assumed)."""
    return peak_memory(all_costs(graph, mesh, choices, shape, hw, 1 << 30, frozen), shape, hw)


def loss_tokens(shape: TrainShape, mesh: Mesh) -> float:
    """Tokens of one micro-batch whose loss one rank computes (its SP chunk of the sequence)."""
    return shape.tokens("foundation") / mesh.sp


def loss_chunks(graph: ModelGraph, shape: TrainShape, mesh: Mesh) -> int:
    """How many chunks one rank's loss runs in per micro-batch; 0 for the whole-sequence loss."""
    if not shape.loss_chunk_tokens:
        return 0
    return max(1, -(-int(loss_tokens(shape, mesh)) // shape.loss_chunk_tokens))


def lm_head_forward_flops(graph: ModelGraph, shape: TrainShape, mesh: Mesh) -> float:
    """One forward of the LM head over a rank's tokens: what a chunked loss recomputes in backward."""
    head = [b for b in graph.blocks if b.name == graph.lm_head] or [b for b in graph.blocks if b.role == "head"]
    return sum(b.flops_per_token for b in head) * loss_tokens(shape, mesh)


def logits_bytes(graph: ModelGraph, shape: TrainShape, mesh: Mesh) -> float:
    """The loss's fp32 log-probabilities, their gradient and the logits' gradient, alive together as backward starts
    (log_softmax's backward): often the largest single activation of a small model, and at long context of any
    model. A chunked loss holds them for one chunk of tokens at a time: each chunk's are rebuilt in its backward."""
    tokens = loss_tokens(shape, mesh)
    if shape.loss_chunk_tokens:
        tokens = min(tokens, shape.loss_chunk_tokens)
    return 3 * 4 * graph.vocab_size * tokens
