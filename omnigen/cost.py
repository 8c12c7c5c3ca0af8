"""The cost model: predicted step time and peak memory of one (mesh, per-group choices) candidate.

Pure arithmetic over the ModelGraph, a HardwareProfile and the training shape. Every prediction keeps
its breakdown (compute / exposed communication / recompute; parameters / gradients / optimizer /
activations / transients / overhead) so `omnigen plan --explain` and `omnigen bench` can show it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .hardware import HardwareProfile, Link
from .model_graph import Group, ModelGraph

BYTES = {"fp32": 4, "bf16": 2}
ADAM_STATES = 2                 # exp_avg and exp_avg_sq, fp32, sharded like the parameters
FSDP_PREFETCH_UNITS = 2         # the running unit and the one prefetched ahead of it stay unsharded
OVERLAP = 0.8                   # share of compute that FSDP prefetching can hide communication behind


@dataclass(frozen=True)
class TrainShape:
    seq_len: int
    micro_batch_size: int
    grad_accum: int
    precision: str
    tokens_per_sample: dict[str, float] = field(default_factory=dict)  # role -> tokens a sample brings

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


@dataclass(frozen=True)
class Mesh:
    dp_replicate: int = 1
    dp_shard: int = 1
    sp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Estimate:
    step_time_s: float
    compute_s: float
    recompute_s: float
    comm_s: float
    exposed_comm_s: float
    peak_memory_bytes: int
    memory: dict[str, int]
    tokens_per_s_per_device: float
    mfu: float

    def summary(self) -> dict[str, Any]:
        return {"step_time_s": round(self.step_time_s, 6),
                "tokens_per_s_per_device": round(self.tokens_per_s_per_device, 2),
                "peak_memory_bytes": int(self.peak_memory_bytes), "mfu": round(self.mfu, 4),
                "breakdown": {"compute_s": round(self.compute_s, 6), "recompute_s": round(self.recompute_s, 6),
                              "comm_s": round(self.comm_s, 6), "exposed_comm_s": round(self.exposed_comm_s, 6)},
                "memory": self.memory}


# --- collectives: alpha-beta, ring algorithms --------------------------------------------------------------

def all_gather_s(total_bytes: float, n: int, link: Link) -> float:
    """Ring all-gather of a tensor whose full size is total_bytes over n ranks."""
    return 0.0 if n <= 1 else (n - 1) * link.latency_s + total_bytes * (n - 1) / n / link.bytes_per_s


def reduce_scatter_s(total_bytes: float, n: int, link: Link) -> float:
    return all_gather_s(total_bytes, n, link)


def all_reduce_s(total_bytes: float, n: int, link: Link) -> float:
    return reduce_scatter_s(total_bytes, n, link) + all_gather_s(total_bytes, n, link)


def shard_link(mesh: Mesh, procs_per_node: int, hw: HardwareProfile) -> Link:
    """FSDP's shard dim is innermost: it stays on NVLink while it fits in a node."""
    return hw.intra_node if mesh.dp_shard * mesh.sp <= procs_per_node else hw.inter_node


def replicate_link(mesh: Mesh, procs_per_node: int, hw: HardwareProfile) -> Link:
    return hw.intra_node if mesh.dp_replicate * mesh.dp_shard * mesh.sp <= procs_per_node else hw.inter_node


# --- the model ---------------------------------------------------------------------------------------------

SEQUENCE_SPLIT_ROLES = ("foundation", "head")  # encoders and projectors run replicated across an SP group


def sp_share(role: str, mesh: Mesh) -> float:
    """Fraction of a micro-batch's tokens of this role that one rank processes."""
    return 1 / mesh.sp if role in SEQUENCE_SPLIT_ROLES else 1.0


def group_forward_flops(g: Group, shape: TrainShape, mesh: Mesh = Mesh()) -> float:
    """Forward FLOPs of one member for one micro-batch on one rank (attention still sees the full context)."""
    tokens = shape.tokens(g.role) * sp_share(g.role, mesh)
    return tokens * (g.flops_per_token + g.attn_flops_per_token_per_seq * shape.context(g.role))


def root_forward_flops(graph: ModelGraph, shape: TrainShape, mesh: Mesh = Mesh()) -> float:
    """Blocks outside the repeated groups (embeddings, projector, lm_head): no sequence term."""
    return sum(shape.tokens(b.role) * sp_share(b.role, mesh) * b.flops_per_token for b in graph.blocks
               if b.parent is None and b.group is None)


def root_param_bytes(graph: ModelGraph) -> int:
    return graph.total_param_bytes - sum(g.param_bytes * g.count for g in graph.groups)


def padded_seq_len(seq_len: int, sp: int) -> int:
    return -(-seq_len // sp) * sp


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


def estimate(graph: ModelGraph, mesh: Mesh, choices: dict[str, GroupChoice], shape: TrainShape,
             hw: HardwareProfile, procs_per_node: int) -> Estimate:
    achieved = hw.achieved_flops(shape.precision)
    shard_l, repl_l = shard_link(mesh, procs_per_node, hw), replicate_link(mesh, procs_per_node, hw)
    sp_l = hw.intra_node if mesh.sp <= procs_per_node else hw.inter_node
    fsdp_n = mesh.dp_shard * mesh.sp
    compute_scale = BYTES[shape.precision] / 4  # params are fp32 masters; collectives move compute dtype

    fwd = root_forward_flops(graph, shape, mesh)
    recompute = comm = exposed_a2a = 0.0
    for g in graph.groups:
        c = choices[g.name]
        f = group_forward_flops(g, shape, mesh) * g.count
        fwd += f
        recompute += {"none": 0.0, "full": f, "selective": 0.15 * f}[c.activation_checkpointing]
        gathers = 2 if c.reshard_after_forward else 1
        experts = expert_bytes(g) / mesh.ep * compute_scale  # sharded over the ep_fsdp ranks only
        dense = (g.param_bytes - expert_bytes(g)) * compute_scale
        for member, n in ((dense, fsdp_n), (experts, fsdp_n // mesh.ep)):
            if not member:
                continue
            comm += g.count * gathers * all_gather_s(member, n, shard_l)
            if not c.frozen:
                comm += g.count * reduce_scatter_s(member, n, shard_l)
                comm += g.count * all_reduce_s(member / n, mesh.dp_replicate, repl_l)
        # EP dispatch and Ulysses all-to-alls sit on the critical path: the experts (attention) wait for them.
        recomputes = c.activation_checkpointing != "none"
        passes = 3 if recomputes else 2
        ep_bytes = ep_all_to_all_bytes(g, shape, mesh, recomputes)
        if ep_bytes:
            exposed_a2a += moe_layers(graph, g) * all_to_all_s(ep_bytes, 2 * passes, mesh.ep, sp_l)
        sp_bytes = sp_all_to_all_bytes(g, shape, mesh.sp, recomputes)
        if sp_bytes:
            exposed_a2a += g.count * all_to_all_s(sp_bytes, 4 * passes, mesh.sp, sp_l)
    root = root_param_bytes(graph) * compute_scale
    comm += all_gather_s(root, fsdp_n, shard_l) + reduce_scatter_s(root, fsdp_n, shard_l)
    comm += all_reduce_s(root / fsdp_n, mesh.dp_replicate, repl_l)

    micro = shape.grad_accum
    compute_s = 3 * fwd / achieved * micro
    recompute_s = recompute / achieved * micro
    comm_s = comm * micro
    exposed = max(comm_s - OVERLAP * (compute_s + recompute_s), comm_s / max(1, sum(g.count for g in graph.groups) + 1))
    exposed += exposed_a2a * micro
    comm_s += exposed_a2a * micro
    step = compute_s + recompute_s + exposed
    memory = memory_breakdown(graph, mesh, choices, shape, hw)
    tokens = shape.seq_len * shape.micro_batch_size * micro / mesh.sp
    return Estimate(step_time_s=step, compute_s=compute_s, recompute_s=recompute_s, comm_s=comm_s,
                    exposed_comm_s=exposed, peak_memory_bytes=sum(memory.values()), memory=memory,
                    tokens_per_s_per_device=tokens / step,
                    mfu=3 * fwd * micro / step / hw.peak_flops[shape.precision])


def memory_breakdown(graph: ModelGraph, mesh: Mesh, choices: dict[str, GroupChoice], shape: TrainShape,
                     hw: HardwareProfile) -> dict[str, int]:
    fsdp_n = mesh.dp_shard * mesh.sp
    compute_bytes = BYTES[shape.precision]
    trainable = graph.total_param_bytes - sum(g.param_bytes * g.count for g in graph.groups if choices[g.name].frozen)
    params = graph.total_param_bytes / fsdp_n
    grads = trainable / fsdp_n
    optimizer = ADAM_STATES * trainable / fsdp_n
    # Unsharded copies alive at once: the prefetch window, every group kept gathered after forward, the root.
    largest = max((unsharded_member_bytes(g, mesh) for g in graph.groups), default=0)
    transient = FSDP_PREFETCH_UNITS * largest * compute_bytes / 4 + root_param_bytes(graph) * compute_bytes / 4
    activations = 0.0
    for g in graph.groups:
        c = choices[g.name]
        if not c.reshard_after_forward:
            transient += (g.count - 1) * unsharded_member_bytes(g, mesh) * compute_bytes / 4
        tokens = shape.tokens(g.role) * sp_share(g.role, mesh)
        per_layer = g.act_bytes_per_token * tokens * compute_bytes / 4
        if c.activation_checkpointing == "full":  # keep each layer's input, rebuild one layer at a time
            activations += g.count * g.hidden * compute_bytes * tokens + per_layer
        elif c.activation_checkpointing == "selective":
            activations += 0.6 * g.count * per_layer
        else:
            activations += g.count * per_layer
    vocab_bytes = _logits_bytes(graph, shape) / mesh.sp
    return {"parameters": int(params), "gradients": int(grads), "optimizer": int(optimizer),
            "activations": int(activations + vocab_bytes), "transient": int(transient),
            "overhead": int(hw.overhead_gib * 1024**3)}


def _logits_bytes(graph: ModelGraph, shape: TrainShape) -> float:
    """Logits in fp32 plus their gradient: often the largest single activation of a small model."""
    return 2 * 4 * graph.vocab_size * shape.tokens("foundation")
