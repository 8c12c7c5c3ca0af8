"""Stage 2: choose the device mesh and per-group placement. The Plan is the contract with the emitter.

The search enumerates named mesh factorisations (dp_replicate x dp_shard x sp x ep), per-group choices
(reshard_after_forward, activation checkpointing), prunes what the spec forbids or what does not fit
memory, ranks the rest by predicted step time, and keeps every loser with the reason it lost.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from . import __version__
from .cost import (Estimate, GroupChoice, GroupCost, Mesh, TrainShape, ep_all_to_all_bytes, estimate, group_cost,
                   group_memory_bytes, root_cost, group_time_s, memory_breakdown, moe_layers, padded_seq_len, peak_memory, sp_all_to_all_bytes, under)
from .errors import PlanError
from .hardware import GIB, HardwareProfile, provenance
from .model_graph import ModelGraph
from .spec import Spec

MESH_DIMS = ("dp_replicate", "dp_shard", "sp", "ep")
RUNNER_UPS = 10  # alternatives kept in the plan (and printed by --explain), of each kind: slower and not fitting


@dataclass(frozen=True)
class GroupPlan:
    name: str                       # module path of the repeated layers: "model.language_model.layers"
    role: str
    layer_class: str
    count: int
    shard_dims: tuple[str, ...]     # mesh dims FSDP shards over (HSDP adds dp_replicate in front)
    reshard_after_forward: bool
    activation_checkpointing: str   # none | selective | full
    frozen: bool = False
    replicate: bool = False         # whole parameters on every rank (a small encoder): no gathers, grads all-reduced
    sequence_parallel: str = "none"  # ulysses (split over the sp dim) | replicated (whole sequence on every SP rank)
    sp_all_to_all_bytes_per_step: int = 0  # bytes one rank sends in this group's Ulysses all-to-alls per step
    ep: int = 1                      # expert-parallel degree of this group's routed experts
    ep_all_to_all_bytes_per_step: int = 0  # bytes one rank sends in token dispatch per step, balanced router
    ep_all_to_all_bytes_max_per_step: int = 0  # the same for the most skewed router possible
    why_placement: str = ""          # the plan's reasons, in words (comments in the script): what the nearest
    why_checkpointing: str = ""      # other placement / activation checkpointing would cost


@dataclass(frozen=True)
class Plan:
    name: str
    omnigen_version: str
    model_class: str
    total_params: int
    cluster: dict[str, Any]          # nodes, procs_per_node, world_size, device, hardware, hardware_measured_on
    train: dict[str, Any]            # the spec's train section + grad_accum
    mesh: dict[str, int]             # named dims in mesh order; their product is the world size
    groups: tuple[GroupPlan, ...]
    root: dict[str, Any]             # the whole-model FSDP unit holding embeddings, heads, norms
    inputs: dict[str, Any]           # the synthetic-data recipe (omnigen.inputs)
    sequence_parallel: dict[str, Any] | None  # Ulysses / packed-document attention, None when neither
    expert_parallel: dict[str, Any] | None  # EP layout of the routed experts, None when ep = 1
    decoder_stack: str               # the module running the LLM layers on the merged sequence
    towers: tuple[dict[str, str], ...]  # encoder towers in the order the model's forward runs them
    frozen: tuple[str, ...]          # module paths the spec freezes: no gradients, no optimizer state
    weights: str | None              # safetensors folder, relative to the output folder
    predicted: dict[str, Any]
    max_seq_len_by_sp: dict[str, int] = field(default_factory=dict)  # longest seq_len that fits, per SP degree
    candidates_searched: int = 0     # (mesh, per-group choices) pairs the cost model priced
    alternatives: tuple[dict[str, Any], ...] = field(default=())
    # A model composed from parts (omnigen/compose.py): its encoders, projectors, foundation and decoders, as the
    # script's OmniModel builds them. None for one HF model class.
    parts: dict[str, Any] | None = None

    @property
    def world_size(self) -> int:
        return self.cluster["world_size"]

    @property
    def has_explicit_collectives(self) -> bool:
        """Ulysses or EP all-to-alls written out in the script (and counted by --count-comm-bytes)."""
        return self.mesh.get("sp", 1) > 1 or self.mesh.get("ep", 1) > 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["parts"] is None:  # one HF model class: plan.json reads (and hashes) as before parts existed
            del d["parts"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        return cls(**{**d, "groups": tuple(GroupPlan(**{**g, "shard_dims": tuple(g["shard_dims"])})
                                           for g in d["groups"]),
                      "alternatives": tuple(d.get("alternatives", ())), "frozen": tuple(d.get("frozen", ()))})


@dataclass(frozen=True)
class Candidate:
    mesh: Mesh
    choices: dict[str, GroupChoice]
    estimate: Estimate
    loss_chunk_tokens: int = 0
    sync_once_per_step: bool = False

    def label(self) -> str:
        dims = " x ".join(f"{k}={v}" for k, v in self.mesh.to_dict().items() if v > 1) or "single process"
        loss = f"; loss in chunks of {self.loss_chunk_tokens:,} tokens" if self.loss_chunk_tokens else ""
        loss += "; gradients reduced once per step" if self.sync_once_per_step else ""
        described = {name: describe_choice(c) for name, c in self.choices.items()}
        if len(set(described.values())) <= 1:
            return f"{dims}; {next(iter(described.values()), '-')}{loss}"
        return f"{dims}; " + "; ".join(f"{name}: {d}" for name, d in described.items()) + loss


def describe_choice(c: GroupChoice) -> str:
    placement = "replicated" if c.replicate else f"fsdp reshard_after_forward={c.reshard_after_forward}"
    return f"{placement}, ac={c.activation_checkpointing}"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def foundation_attention(graph: ModelGraph) -> tuple[int, int]:
    """(heads, kv_heads) of the LLM's attention: what Ulysses splits."""
    g = next((g for g in graph.groups if g.role == "foundation" and g.heads), None)
    return (g.heads, g.kv_heads or g.heads) if g else (0, 0)


def valid_sp(sp: int, heads: int, kv_heads: int) -> bool:
    """Ulysses gives each rank heads/sp query heads; kv heads are split, or repeated when fewer than sp."""
    return sp == 1 or (heads > 0 and heads % sp == 0 and (kv_heads % sp == 0 or sp % kv_heads == 0))


def mesh_candidates(spec: Spec, graph: ModelGraph | None = None) -> list[Mesh]:
    """Every factorisation of the world size that honours the spec's fixed dims."""
    world, p = spec.cluster.world_size, spec.parallel
    fixed = {d: getattr(p, d) for d in MESH_DIMS if getattr(p, d) != "auto"}
    heads, kv_heads = foundation_attention(graph) if graph else (0, 0)
    sps = [d for d in divisors(world) if valid_sp(d, heads, kv_heads)]
    no_ulysses = ulysses_refusal(spec, graph) if graph else ""
    if no_ulysses and fixed.get("sp", 1) > 1:
        raise PlanError(f"{spec.source}: parallel.sp={fixed['sp']}: {no_ulysses}; use sp=1")
    if no_ulysses:
        sps = [1]
    if fixed.get("sp", 1) not in sps:
        works = ", ".join(map(str, sps))
        raise PlanError(f"{spec.source}: parallel.sp={fixed['sp']}: Ulysses needs sp to divide the {heads} attention "
                        f"heads and either divide or be a multiple of the {kv_heads} kv heads, and to divide the world "
                        f"size {world}; sp values that work: {works}")
    meshes = [Mesh(dp_replicate=r, dp_shard=world // (r * sp), sp=sp)
              for sp in sps for r in divisors(world // sp)]
    meshes = [m for m in meshes if all(getattr(m, d) == v for d, v in fixed.items() if d != "ep")]
    if meshes:
        meshes = with_expert_parallel(spec, graph, meshes, fixed.get("ep"))
    if not meshes:
        product = " x ".join(f"{d}={v}" for d, v in fixed.items())
        raise PlanError(f"{spec.source}: parallel: {product} does not multiply to the world size "
                        f"{world} (cluster.nodes={spec.cluster.nodes} x cluster.procs_per_node="
                        f"{spec.cluster.procs_per_node}); dp_replicate x dp_shard x sp must equal {world}")
    return meshes


def ulysses_refusal(spec: Spec, graph: ModelGraph) -> str:
    """Why Ulysses would train a different model than the config describes ("" when it would not)."""
    return f"Ulysses attention cannot reproduce {graph.attention_refused}" if graph.attention_refused else ""


def num_experts(graph: ModelGraph | None) -> int:
    return max((g.experts for g in graph.groups), default=0) if graph else 0


def valid_ep(ep: int, experts: int, mesh: Mesh) -> bool:
    """EP splits the experts over ep ranks carved out of FSDP's dp_shard x sp ranks (the rest is ep_fsdp)."""
    return ep == 1 or (experts > 0 and experts % ep == 0 and (mesh.dp_shard * mesh.sp) % ep == 0)


def ep_refusal(graph: ModelGraph | None) -> str:
    """"<experts module>: <reason>" when the generated script's EP dispatch cannot serve the model's experts."""
    if graph is None:
        return ""
    moe = [b for b in graph.blocks if b.kind == "moe"]
    if len({b.experts for b in moe}) > 1:  # the script splits every MoE layer into the same EXPERTS_PER_RANK
        a = moe[0]
        b = next(b for b in moe if b.experts != a.experts)
        return (f"{b.experts_module}: {b.experts} experts where {a.experts_module} has {a.experts}; the generated EP "
                "dispatch splits every MoE layer into the same number of experts per rank")
    return next((g.ep_refusal for g in graph.groups if g.experts and g.ep_refusal), "")


def with_expert_parallel(spec: Spec, graph: ModelGraph | None, meshes: list[Mesh], fixed_ep: int | None) -> list[Mesh]:
    """Each mesh once per ep degree that fits it (only the spec's, when it fixes one). Experts the generated EP
    dispatch cannot serve get ep = 1 only (FSDP shards them like dense weights); asking for more is refused."""
    refusal = ep_refusal(graph)
    if refusal and fixed_ep not in (None, 1):
        raise PlanError(f"{spec.source}: parallel.ep={fixed_ep}: expert parallelism cannot serve {refusal}; "
                        "set parallel.ep to 1 (or auto): FSDP then shards the experts like dense weights")
    experts = 0 if refusal else num_experts(graph)
    out = [replace(m, ep=ep) for m in meshes for ep in divisors(m.dp_shard * m.sp)
           if valid_ep(ep, experts, m) and fixed_ep in (None, ep)]
    if not out:
        works = sorted({ep for m in meshes for ep in divisors(m.dp_shard * m.sp) if valid_ep(ep, experts, m)})
        why = (f"the model has no routed experts" if not experts else
               f"ep must divide the {experts} experts and the data-parallel ranks FSDP shards over "
               f"(dp_shard x sp = {', '.join(sorted({str(m.dp_shard * m.sp) for m in meshes}))})")
        raise PlanError(f"{spec.source}: parallel.ep={fixed_ep}: {why}; ep values that work: "
                        f"{', '.join(map(str, works))}")
    return out


def group_options(spec: Spec, graph: ModelGraph, g, mesh: Mesh) -> list[GroupChoice]:
    """Every choice for one group: FSDP (resharding after forward or not) or replicated, times each activation
    checkpointing mode. Frozen comes from the spec; experts are never replicated (EP and FSDP place them)."""
    part = spec.model.part_parallel(g.name)  # a part's own parallel block (models composed from parts)
    ac = part.activation_checkpointing if part and part.activation_checkpointing != "auto" \
        else spec.parallel.activation_checkpointing
    acs = ["none", "selective", "full"] if ac == "auto" else [ac]
    frozen = under(g.name, spec.model.freeze)
    fsdp = [GroupChoice(raf, a, frozen) for raf in (True, False) for a in acs] if mesh.world_size > 1 else \
        [GroupChoice(True, a, frozen) for a in acs]
    replicated = [GroupChoice(True, a, frozen, replicate=True) for a in acs] \
        if mesh.world_size > 1 and not g.experts else []
    placement = part.placement if part and mesh.world_size > 1 else "auto"  # one process has nothing to place
    if placement == "replicate" and g.experts:
        raise PlanError(f"{spec.source}: the parallel.placement of the part holding '{g.name}' is replicate, but its "
                        "layers hold routed experts, which EP and FSDP place; use placement: fsdp or auto")
    return {"auto": fsdp + replicated, "fsdp": fsdp, "replicate": replicated}[placement]


def pareto(options: list[tuple[GroupChoice, float, float]]) -> list[GroupChoice]:
    """Options no other option beats on both time and memory (ties keep the first)."""
    kept: list[tuple[GroupChoice, float, float]] = []
    for choice, t, m in sorted(options, key=lambda o: (o[1], o[2])):
        if not kept or m < min(k[2] for k in kept):
            kept.append((choice, t, m))
    return [k[0] for k in kept]


def choice_candidates(spec: Spec, graph: ModelGraph, mesh: Mesh, shape: TrainShape, hw: HardwareProfile) -> list[dict[str, GroupChoice]]:
    """Per-group choices: each group's options are pruned to its own time/memory Pareto front (a group's cost
    barely depends on the others'), then combined."""
    fronts = []
    for g in graph.groups:
        scored = []
        for c in group_options(spec, graph, g, mesh):
            gc = group_cost(graph, g, c, mesh, shape, hw, spec.cluster.procs_per_node)
            t = group_time_s(gc, hw)
            scored.append((c, t, group_memory_bytes(gc)))
        fronts.append(pareto(scored))
    return [dict(zip((g.name for g in graph.groups), combo)) for combo in itertools.product(*fronts)]


# The chunk sizes `train.loss_chunk_tokens: auto` weighs against the whole-sequence loss. The cost model prices a
# chunk's logits memory and its host calls; a chunk of 1,024 tokens is a matmul of 1,024 x hidden x vocab, long
# enough to keep an accelerator busy, and its fp32 logits are 12 KiB per vocabulary entry (1.7 GiB at 152K).
LOSS_CHUNK_SIZES = (1024, 4096, 16384)


def loss_chunk_options(spec: Spec, graph: ModelGraph, mesh: Mesh, shape: TrainShape) -> list[int]:
    """The loss chunk sizes to price for one mesh, fastest (and hungriest) first: the spec's own, or (auto) the
    whole sequence (0: no recompute), then each of LOSS_CHUNK_SIZES shorter than a rank's tokens, longest first
    (fewer calls), when the model lets its LM head compute the loss."""
    asked = spec.train.loss_chunk_tokens
    if asked != "auto":
        if asked and graph.chunked_loss_refused:
            raise PlanError(f"{spec.source}: train.loss_chunk_tokens={asked}: the loss cannot be computed in chunks: "
                            f"{graph.chunked_loss_refused}; use 0 (the whole sequence at once) or auto")
        return [asked]
    if graph.chunked_loss_refused:
        return [0]
    return [0] + sorted((c for c in LOSS_CHUNK_SIZES if c < shape.tokens("foundation") / mesh.sp), reverse=True)


def sync_options(mesh: Mesh, shape: TrainShape) -> tuple[bool, ...]:
    """When gradients may be reduced: after every micro-batch (sharded gradients between micro-batches), and, with
    several micro-batches on several ranks, once per step (fewer reductions; the earlier micro-batches' gradients
    accumulate unsharded)."""
    return (False, True) if shape.grad_accum > 1 and mesh.world_size > 1 else (False,)


def leanest_loss_chunk(spec: Spec, graph: ModelGraph) -> int:
    """The loss chunking that needs the least memory for any sequence length the spec allows (0: whole sequence)."""
    asked = spec.train.loss_chunk_tokens
    if asked != "auto":
        return asked
    return 0 if graph.chunked_loss_refused else LOSS_CHUNK_SIZES[0]


def train_shape(spec: Spec, mesh: Mesh, inputs: dict[str, Any]) -> TrainShape:
    t = spec.train
    if t.packing:  # one packed row per micro-batch; the most rows a rank runs, as if every sample were seq_len long
        rows = grad_accum(spec, mesh.dp, mesh.sp)
        samples_per_row = t.global_batch_size / (rows * mesh.dp)  # the towers run on every image / clip of a row
        towers = {k: v * (samples_per_row if not k.endswith(":context") else 1)
                  for k, v in tokens_per_sample(inputs).items()}
        return TrainShape(seq_len=packed_row_tokens(spec, mesh.sp), micro_batch_size=1, grad_accum=rows,
                          precision=t.precision, tokens_per_sample=towers, dense_mask="documents")
    dense_mask = "documents" if t.pack_documents > 1 else "model" if "token_types" in (inputs or {}) else ""
    return TrainShape(seq_len=t.seq_len, micro_batch_size=t.micro_batch_size,
                      grad_accum=grad_accum(spec, mesh.dp), precision=t.precision,
                      tokens_per_sample=tokens_per_sample(inputs), dense_mask=dense_mask)


def packed_row_tokens(spec: Spec, sp: int) -> int:
    """Tokens in a packed row (train.packing): micro_batch_tokens, or micro_batch_size x seq_len, rounded up to a
    multiple of sp so that Ulysses splits it evenly."""
    t = spec.train
    return padded_seq_len(t.micro_batch_tokens or t.micro_batch_size * t.seq_len, sp)


def max_packed_rows(spec: Spec, sp: int) -> int:
    """The most rows a step's samples pack into. First-fit opens a row only when the sample (<= seq_len tokens)
    fits in no open row, so every row but the last holds more than capacity - seq_len tokens, so at least
    capacity // seq_len samples: at most ceil(global_batch_size / (capacity // seq_len)) rows."""
    per_row = packed_row_tokens(spec, sp) // spec.train.seq_len
    return -(-spec.train.global_batch_size // per_row)


def tokens_per_sample(inputs: dict[str, Any]) -> dict[str, float]:
    """How many tokens each encoder tower sees per sample, from the input recipe."""
    out: dict[str, float] = {}
    for modality, role in (("image", "encoder:vision"), ("video", "encoder:vision"), ("audio", "encoder:audio")):
        m = inputs.get(modality)
        if m:
            every = m.get("every", 1)
            # one item per sample that has the modality; images and videos share the vision tower
            out[role] = out.get(role, 0.0) + m["encoder_tokens_per_item"] / every
            out[f"{role}:context"] = max(out.get(f"{role}:context", 0), m["encoder_tokens_per_item"])
    if "talker" in inputs:  # a decoder with its own sequence (Qwen2.5-Omni's talker): prompt, text bos, codec steps
        out["decoder"] = out["decoder:context"] = inputs["talker"]["sequence_length"]
    return out


def grad_accum(spec: Spec, dp: int, sp: int = 1) -> int:
    """Micro-batches per rank and step; with packing, the most a rank runs (every rank runs as many)."""
    t = spec.train
    if t.packing:
        return -(-max_packed_rows(spec, sp) // dp)
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise PlanError(f"{spec.source}: train.global_batch_size={t.global_batch_size} is not a multiple of "
                        f"micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp}")
    return t.global_batch_size // per_step


def usable_memory_bytes(spec: Spec, hw: HardwareProfile) -> float:
    return hw.memory_bytes * (1 - spec.parallel.memory_headroom)


def memory_limit(spec: Spec, hw: HardwareProfile) -> str:
    return (f"{hw.name} has {hw.memory_gib:g} GiB, {usable_memory_bytes(spec, hw) / GIB:.3g} GiB of it for the plan "
            f"(parallel.memory_headroom {spec.parallel.memory_headroom:g} stays free)")


def search(spec: Spec, graph: ModelGraph, hw: HardwareProfile, inputs: dict[str, Any]) -> tuple[list[tuple[Candidate | None, str]], int]:
    """The winner and the runner-ups worth showing, each with the reason it lost (empty for the winner); and how
    many candidates were priced."""
    feasible, rejected = [], []
    for mesh in mesh_candidates(spec, graph):
        try:
            shape = train_shape(spec, mesh, inputs)
        except PlanError as e:
            rejected.append((None, f"{mesh.to_dict()}: {e}"))
            continue
        ppn, frozen = spec.cluster.procs_per_node, spec.model.freeze
        # The root's cost depends on the mesh, the loss chunking and when gradients are reduced only, a group's on
        # its own choice and when gradients are reduced: each is priced once per mesh, not once per candidate.
        shapes = {(chunk, once): replace(shape, loss_chunk_tokens=chunk, sync_once_per_step=once)
                  for chunk in loss_chunk_options(spec, graph, mesh, shape) for once in sync_options(mesh, shape)}
        roots = {key: root_cost(graph, mesh, s, hw, ppn, frozen) for key, s in shapes.items()}
        groups: dict[tuple[str, GroupChoice, bool], GroupCost] = {}
        for choices in choice_candidates(spec, graph, mesh, shape, hw):
            fits = []
            for (chunk, once), option in shapes.items():
                for g in graph.groups:
                    if (g.name, choices[g.name], once) not in groups:
                        groups[g.name, choices[g.name], once] = group_cost(graph, g, choices[g.name], mesh, option,
                                                                           hw, ppn)
                costs = [roots[chunk, once], *(groups[g.name, choices[g.name], once] for g in graph.groups)]
                c = Candidate(mesh, choices, estimate(graph, mesh, choices, option, hw, ppn, frozen, costs=costs),
                              chunk, once)
                if c.estimate.peak_memory_bytes <= usable_memory_bytes(spec, hw):
                    fits.append(c)
                else:
                    rejected.append((c, f"does not fit: needs {c.estimate.peak_memory_bytes / GIB:.2f} GiB per "
                                        f"device, {memory_limit(spec, hw)}"))
            if fits:  # this candidate's best: its fastest loss chunking and gradient sync that fit
                feasible.append(min(fits, key=lambda c: c.estimate.step_time_s))
    feasible.sort(key=lambda c: (c.estimate.step_time_s, c.estimate.peak_memory_bytes))
    if not feasible:
        best = min((c for c, _ in rejected if c), key=lambda c: c.estimate.peak_memory_bytes, default=None)
        need = f" The smallest candidate ({best.label()}) needs {best.estimate.peak_memory_bytes / GIB:.2f} GiB " \
               f"per device; more devices, a shorter seq_len or a smaller micro_batch_size would fit." if best else ""
        raise PlanError(f"{spec.source}: no parallel plan fits.{need}\n" + "\n".join(r for _, r in rejected[:8]))
    return explained(feasible, rejected), len(feasible) + len(rejected)


def explained(feasible: list[Candidate], rejected: list[tuple[Candidate | None, str]]) -> list[tuple[Candidate | None, str]]:
    """The winner, then the runner-ups worth reading: the best candidate of every other mesh and the winner mesh's
    next best, each with why it lost; the rejected ones, one per mesh (the leanest), with why."""
    winner = feasible[0]
    shown, meshes = [winner], {winner.mesh}
    for c in feasible[1:]:
        if len(shown) > RUNNER_UPS:
            break
        if c.mesh not in meshes or len(shown) == 1:
            shown.append(c)
            meshes.add(c.mesh)
    ranked: list[tuple[Candidate | None, str]] = [(winner, "")]
    for c in sorted(shown[1:], key=lambda c: c.estimate.step_time_s):
        slower = c.estimate.step_time_s / winner.estimate.step_time_s - 1
        ranked.append((c, f"slower: {c.estimate.step_time_s:.4g} s/step vs {winner.estimate.step_time_s:.4g} "
                          f"(+{slower:.1%})" if slower > 0 else "ties the winner on step time; uses more memory"))
    leanest: dict[Mesh | None, tuple[Candidate | None, str]] = {}
    for c, reason in rejected:
        key = c.mesh if c else None
        if c is None or key not in leanest or c.estimate.peak_memory_bytes < leanest[key][0].estimate.peak_memory_bytes:
            leanest[key if c else len(leanest)] = (c, reason)
    return ranked + sorted(leanest.values(), key=lambda r: r[0].estimate.peak_memory_bytes if r[0] else 0)[:RUNNER_UPS]


def fsdp_dims(mesh: Mesh) -> tuple[str, ...]:
    """FSDP shards over the data-parallel and SP ranks together (flattened); HSDP replicates over dp_replicate."""
    shard = "dp_shard_sp" if mesh.sp > 1 else "dp_shard"
    return (shard,) if mesh.dp_replicate == 1 else ("dp_replicate", shard)


def foundation_group(graph: ModelGraph):
    return next((g for g in graph.groups if g.role == "foundation"), None)


def sequence_parallel_section(spec: Spec, graph: ModelGraph, mesh: Mesh, groups: tuple[GroupPlan, ...],
                              inputs: dict[str, Any] | None = None) -> dict | None:
    """What the script needs for Ulysses (sp > 1) or document-aware attention (packed rows); None otherwise."""
    packed = spec.train.pack_documents > 1 or spec.train.packing
    found = foundation_group(graph)
    if (mesh.sp == 1 and not packed) or found is None:
        return None
    if graph.attention_refused:  # packed rows need omnigen's attention even without SP
        asked = "train.packing: true" if spec.train.packing else f"train.pack_documents={spec.train.pack_documents}"
        raise PlanError(f"{spec.source}: {asked}: omnigen's document attention cannot reproduce "
                        f"{graph.attention_refused}; use pack_documents: 1 and packing: false")
    attention = next((b.name for b in graph.blocks if b.parent == found.members[0] and b.kind == "attention"), None)
    if attention is None:  # the script hands each layer's attention module its SP group by name
        raise PlanError(f"{spec.source}: {graph.model_class}: the layers of '{found.name}' hold no attention module "
                        "as a direct child (it sits deeper, e.g. in a list of attentions), which omnigen's Ulysses "
                        "and packed-document attention need; use parallel.sp: 1 and train.pack_documents: 1")
    return {"degree": mesh.sp, "layers": found.name,
            "attention": attention.rsplit(".", 1)[1], "packed": packed,
            "local_attention": local_attention(found),
            "query_position_scaling": graph.query_position_scaling if mesh.sp > 1 else {},
            # token_type_ids make the model's masks bidirectional in places (image blocks, a prefix): under Ulysses
            # the masks the model builds on the whole sequence are kept and applied as they are
            "model_masks": mesh.sp > 1 and "token_types" in (inputs or {}),
            "seq_len_padded": padded_seq_len(spec.train.seq_len, mesh.sp),
            "all_to_all_bytes_per_step": sum(g.sp_all_to_all_bytes_per_step for g in groups)}


def local_attention(found) -> dict:
    """The LLM layers' sliding-window / chunked attention the script must apply: the pattern of each layer (by index
    in the stack) and each pattern's span. Empty when every layer is plain causal."""
    if all(kind == "causal" for kind, _ in found.attention_spans):
        return {}
    return {"layers": [kind for kind, _ in found.attention_spans],
            "spans": {kind: span for kind, span in found.attention_spans if kind != "causal"}}


def leanest_expert_mesh(spec: Spec, graph: ModelGraph, mesh: Mesh) -> Mesh:
    """The mesh with the largest ep degree it allows (the spec's, when it fixes one): the fewest experts per rank."""
    fixed = spec.parallel.ep if spec.parallel.ep != "auto" else None
    try:
        return max(with_expert_parallel(spec, graph, [mesh], fixed), key=lambda m: m.ep)
    except PlanError:
        return mesh


def max_seq_len_by_sp(spec: Spec, graph: ModelGraph, hw: HardwareProfile, inputs: dict[str, Any]) -> dict[str, int]:
    """The longest seq_len whose best activation-checkpointing choice fits memory, for each valid sp degree, with the
    leanest EP degree and loss the spec allows (the loss in chunks, unless the spec fixes train.loss_chunk_tokens or
    the model refuses them). An sp degree whose data-parallel size cannot split the spec's global batch is left out."""
    world = spec.cluster.world_size
    heads, kv_heads = foundation_attention(graph)
    out = {}
    no_ulysses = bool(ulysses_refusal(spec, graph))
    for sp in (d for d in divisors(world) if valid_sp(d, heads, kv_heads) and not (no_ulysses and d > 1)):
        mesh = leanest_expert_mesh(spec, graph, Mesh(dp_shard=world // sp, sp=sp))
        try:
            base = replace(train_shape(spec, mesh, inputs), grad_accum=1,  # one micro-batch
                           loss_chunk_tokens=leanest_loss_chunk(spec, graph))
        except PlanError:
            continue

        def fits(seq_len: int) -> bool:
            shape = replace(base, seq_len=seq_len)
            leanest = {g.name: min(group_options(spec, graph, g, mesh), key=lambda c: sum(
                       peak_memory([group_cost(graph, g, c, mesh, shape, hw, world)], shape, hw).values()))
                       for g in graph.groups}
            return (sum(memory_breakdown(graph, mesh, leanest, shape, hw, spec.model.freeze).values())
                    <= usable_memory_bytes(spec, hw))

        lo, hi = 0, 1 << 24
        while lo < hi:  # largest multiple of sp that fits
            mid = (lo + hi + 1) // 2 // sp * sp
            if mid <= lo:
                break
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        out[str(sp)] = lo
    return out


def make_plan(spec: Spec, graph: ModelGraph, hw: HardwareProfile, inputs: dict[str, Any],
              weights: str | None = None) -> Plan:
    ranked, searched = search(spec, graph, hw, inputs)
    best = ranked[0][0]
    assert best is not None
    mesh = best.mesh
    shape = replace(train_shape(spec, mesh, inputs), loss_chunk_tokens=best.loss_chunk_tokens,
                    sync_once_per_step=best.sync_once_per_step)
    reasons = group_reasons(spec, graph, hw, best, shape)
    groups = tuple(replace(group_plan(graph, g, best.choices[g.name], mesh, shape), **reasons[g.name])
                   for g in graph.groups)
    return Plan(
        name=spec.name, omnigen_version=__version__, model_class=graph.model_class,
        total_params=graph.total_params,
        cluster={"nodes": spec.cluster.nodes, "procs_per_node": spec.cluster.procs_per_node,
                 "world_size": spec.cluster.world_size, "device": spec.cluster.device, "hardware": hw.name,
                 "hardware_measured_on": hw.measured_on},
        train={**spec.to_dict()["train"], "grad_accum": grad_accum(spec, mesh.dp, mesh.sp),
               "loss_chunk_tokens": best.loss_chunk_tokens, "sync_gradients_once_per_step": best.sync_once_per_step,
               **({"packed_row_tokens": packed_row_tokens(spec, mesh.sp)} if spec.train.packing else {})},
        mesh={d: getattr(mesh, d) for d in MESH_DIMS},
        groups=groups,
        root={"shard_dims": list(fsdp_dims(mesh)), "reshard_after_forward": False},
        inputs=inputs, sequence_parallel=sequence_parallel_section(spec, graph, mesh, groups, inputs), weights=weights,
        expert_parallel=expert_parallel_section(graph, mesh, groups, spec.train.precision),
        decoder_stack=graph.towers.get("foundation", ""), towers=tower_order(graph, inputs),
        frozen=frozen_modules(spec, graph),
        predicted=best.estimate.summary(),
        max_seq_len_by_sp=max_seq_len_by_sp(spec, graph, hw, inputs), candidates_searched=searched,
        alternatives=tuple({"candidate": c.label() if c else None, "reason": reason,
                            "predicted": c.estimate.summary() if c else None}
                           for c, reason in ranked[1:]),
    )


def alternatives_of(choice: GroupChoice, parallel: bool) -> dict[str, tuple[str, GroupChoice]]:
    """The nearest other choices for one group, named: the other placement, and other activation checkpointing."""
    others = {}
    if parallel and choice.replicate:
        others["why_placement"] = ("FSDP", replace(choice, replicate=False, reshard_after_forward=True))
    elif parallel:
        flipped = not choice.reshard_after_forward
        others["why_placement"] = ("resharding after forward" if flipped else "keeping it unsharded after forward",
                                   replace(choice, reshard_after_forward=flipped))
    ac = "selective" if choice.activation_checkpointing == "none" else "none"
    others["why_checkpointing"] = (f"{ac} activation checkpointing".replace("none ", "no "),
                                   replace(choice, activation_checkpointing=ac))
    return others


def size_words(n_bytes: float) -> str:
    return f"{n_bytes / GIB:+.3g} GiB" if abs(n_bytes) >= GIB else f"{n_bytes / 2**20:+.3g} MiB"


def group_reasons(spec: Spec, graph: ModelGraph, hw: HardwareProfile, best: Candidate,
                  shape: TrainShape) -> dict[str, dict[str, str]]:
    """Why each group got its placement and its activation checkpointing, in words: what the nearest alternative
    would cost in predicted step time and peak memory (comments in the generated script)."""
    limit = usable_memory_bytes(spec, hw)
    chosen_e = best.estimate
    headroom = f"peak {chosen_e.peak_memory_bytes / GIB:.3g} of {limit / GIB:.3g} GiB usable"
    reasons = {}
    for g in graph.groups:
        reasons[g.name] = {}
        for field_name, (label, alt) in alternatives_of(best.choices[g.name], best.mesh.world_size > 1).items():
            e = estimate(graph, best.mesh, {**best.choices, g.name: alt}, shape, hw, spec.cluster.procs_per_node,
                         spec.model.freeze)
            if e.peak_memory_bytes > limit:
                reasons[g.name][field_name] = f"{label} would not fit ({e.peak_memory_bytes / GIB:.3g} GiB; {headroom})"
            else:
                reasons[g.name][field_name] = (
                    f"{label} would take {(e.step_time_s - chosen_e.step_time_s) * 1e3:+.3g} ms/step for "
                    f"{size_words(e.peak_memory_bytes - chosen_e.peak_memory_bytes)} ({headroom})")
    return reasons


def chosen(plan: Plan) -> tuple[Mesh, dict[str, GroupChoice]]:
    """The mesh and per-group choices a plan was made of: what `reprice` prices again."""
    return Mesh(**plan.mesh), {g.name: GroupChoice(reshard_after_forward=g.reshard_after_forward,
                                                   activation_checkpointing=g.activation_checkpointing,
                                                   frozen=g.frozen, replicate=g.replicate) for g in plan.groups}


def reprice(plan: Plan, spec: Spec, graph: ModelGraph, hw: HardwareProfile) -> Estimate:
    """The plan's prediction under another hardware profile, its choices kept (calibration fits terms this way)."""
    mesh, choices = chosen(plan)
    shape = replace(train_shape(spec, mesh, plan.inputs), loss_chunk_tokens=plan.train.get("loss_chunk_tokens", 0),
                    sync_once_per_step=plan.train.get("sync_gradients_once_per_step", False))
    return estimate(graph, mesh, choices, shape, hw, spec.cluster.procs_per_node, spec.model.freeze)


def frozen_modules(spec: Spec, graph: ModelGraph) -> tuple[str, ...]:
    """The spec's model.freeze prefixes, each checked against the model's modules."""
    names = {b.name for b in graph.blocks} | {g.name for g in graph.groups} | set(graph.towers.values())
    for prefix in spec.model.freeze:
        if not any(under(n, (prefix,)) or prefix.startswith(n + ".") for n in names):
            tops = sorted({n.split(".")[0] + "." + n.split(".")[1] for n in names if n.count(".") >= 1})
            raise PlanError(f"{spec.source}: key 'model.freeze': {prefix!r} names no module of {graph.model_class}; "
                            f"modules near the top: {', '.join(tops[:12])}")
    return tuple(spec.model.freeze)


# transformers' omni thinkers encode audio before images, and every model images before videos (through the same
# vision tower): an order every rank must repeat (see IdleTowers).
TOWER_ORDER = (("audio", "encoder:audio"), ("image", "encoder:vision"), ("video", "encoder:vision"))


def tower_order(graph: ModelGraph, inputs: dict[str, Any]) -> tuple[dict[str, str], ...]:
    return tuple({"modality": m, "module": graph.towers[role]} for m, role in TOWER_ORDER
                 if m in inputs and role in graph.towers)


def group_plan(graph: ModelGraph, g, choice: GroupChoice, mesh: Mesh, shape: TrainShape) -> GroupPlan:
    ulysses = mesh.sp > 1 and g.role == "foundation"
    recompute = choice.activation_checkpointing != "none"
    ep = mesh.ep if g.experts else 1
    per_step = shape.grad_accum * moe_layers(graph, g)
    return GroupPlan(name=g.name, role=g.role, layer_class=g.layer_class, count=g.count,
                     shard_dims=() if choice.replicate else fsdp_dims(mesh),
                     reshard_after_forward=choice.reshard_after_forward,
                     activation_checkpointing=choice.activation_checkpointing, frozen=choice.frozen,
                     replicate=choice.replicate,
                     sequence_parallel="ulysses" if ulysses else ("replicated" if mesh.sp > 1 else "none"),
                     sp_all_to_all_bytes_per_step=g.count * shape.grad_accum
                     * sp_all_to_all_bytes(g, shape, mesh.sp, recompute),
                     ep=ep, ep_all_to_all_bytes_per_step=per_step * ep_all_to_all_bytes(g, shape, mesh, recompute),
                     ep_all_to_all_bytes_max_per_step=per_step * ep_all_to_all_bytes(g, shape, mesh, recompute, False))


def expert_parallel_section(graph: ModelGraph, mesh: Mesh, groups: tuple[GroupPlan, ...],
                            precision: str) -> dict | None:
    """The experts modules EP slices, and the expert mesh: (dp_replicate, ep_fsdp, ep) over the FSDP ranks.
    outside_fsdp: each rank's experts are its own (no ep_fsdp shard, no replica), so they stay plain parameters; in
    bf16 they keep FSDP for its mixed precision (the dispatch's autograd Functions run outside autocast)."""
    if mesh.ep == 1:
        return None
    moe = [b for b in graph.blocks if b.kind == "moe"]
    ep_fsdp = mesh.dp_shard * mesh.sp // mesh.ep
    return {"degree": mesh.ep, "ep_fsdp": ep_fsdp,
            "outside_fsdp": ep_fsdp == 1 and mesh.dp_replicate == 1 and precision != "bf16",
            "modules": [b.experts_module or f"{b.name}.experts" for b in moe],
            "num_experts": moe[0].experts, "top_k": moe[0].top_k,
            "all_to_all_bytes_per_step": sum(g.ep_all_to_all_bytes_per_step for g in groups),
            "all_to_all_bytes_max_per_step": sum(g.ep_all_to_all_bytes_max_per_step for g in groups)}


def price_layout(spec: Spec, graph: ModelGraph, hw: HardwareProfile, inputs: dict[str, Any], mesh: dict[str, int],
                 groups: list[dict[str, Any]], train: dict[str, Any]) -> str:
    """An earlier plan's layout (plan.json's mesh, groups, loss chunking and gradient sync, read off its train)
    priced under today's inputs, in words:
    why the planner would not keep it, or what it would cost."""
    m = Mesh(**mesh)
    if m.world_size != spec.cluster.world_size:
        return f"does not span the world ({m.world_size} ranks; the cluster now has {spec.cluster.world_size})"
    if {g["name"] for g in groups} != {g.name for g in graph.groups}:
        return "names block groups this model does not have"
    choices = {g["name"]: GroupChoice(reshard_after_forward=g["reshard_after_forward"], frozen=g["frozen"],
                                      activation_checkpointing=g["activation_checkpointing"],
                                      replicate=g["replicate"]) for g in groups}
    try:
        shape = replace(train_shape(spec, m, inputs), loss_chunk_tokens=train.get("loss_chunk_tokens", 0),
                        sync_once_per_step=train.get("sync_gradients_once_per_step", False))
    except PlanError as e:
        return f"is invalid now: {e}"
    e = estimate(graph, m, choices, shape, hw, spec.cluster.procs_per_node, spec.model.freeze)
    if e.peak_memory_bytes > usable_memory_bytes(spec, hw):
        return f"does not fit now: needs {e.peak_memory_bytes / GIB:.3g} GiB per device, {memory_limit(spec, hw)}"
    return f"would now take {e.step_time_s:.4g} s/step and {e.peak_memory_bytes / GIB:.3g} GiB"


def hardware_provenance(plan: Plan) -> str:
    """hardware.provenance of the profile the plan was priced with ("" measured_on: a plan.json from before it)."""
    c = plan.cluster
    return provenance(c["hardware"], c.get("hardware_measured_on", ""), c["device"])


def parts_explain(plan: Plan) -> list[str]:
    """A model composed from parts: why each part got its placement, part by part. A part's layer groups were
    placed by the spec (the part's parallel block) or chosen by the planner, with what the nearest other choice
    would cost; its other modules (embeddings, norms, projectors, heads) are in the root unit."""
    parts = plan.parts
    named = [(e["module"], f"{e['modality']} encoder {e['class'].rpartition('.')[2]}", e) for e in parts["encoders"]]
    named.append((parts["foundation"]["module"], parts["foundation"]["class"], parts["foundation"]))
    root = f"FSDP over {'+'.join(plan.root['shard_dims'])}" if plan.world_size > 1 else "one process"
    lines = ["per part (model.parts):"]
    for module, title, part in named:
        groups = [g for g in plan.groups if under(g.name, (module,))]
        pinned = part["parallel"]
        lines.append(f"  {module} ({title}{'' if part['trainable'] else ', frozen: no gradients, no optimizer state'})")
        for g in groups:
            place = "replicated" if g.replicate else \
                f"FSDP over {'+'.join(g.shard_dims)}, {'resharded' if g.reshard_after_forward else 'unsharded'} after forward"
            place_by = pinned["placement"] if plan.world_size > 1 else None
            ac_by = pinned["activation_checkpointing"]
            experts = f", experts over ep={g.ep} (parallel.ep)" if g.ep > 1 else ""
            lines.append(f"    {g.name}: {place}{experts}, set by {place_by or 'the planner'}"
                         + (f"; nearest other: {g.why_placement}" if g.why_placement else ""))
            lines.append(f"    {g.name}: ac={g.activation_checkpointing}, set by {ac_by or 'the planner'}"
                         + (f"; nearest other: {g.why_checkpointing}" if g.why_checkpointing else ""))
    heads = [e.get("module").replace("encoders.", "projectors.") for e in parts["encoders"]]
    heads += [d["module"] for d in parts["decoders"]]
    lines.append(f"  {', '.join(heads)}: in the root unit ({root}) with the embeddings and norms: single modules, "
                 "no layer list to place on their own")
    return lines


def format_explain(plan: Plan, alternatives: bool = True, here: str = "") -> str:
    """The plan in words; `here` (machine.describe) is the same layout priced on this machine, under the
    prediction's profile."""
    p = plan.predicted
    lines = [f"chosen: mesh {plan.mesh}  step {p['step_time_s']:.4g} s  "
             f"{p['tokens_per_s_per_device']:.4g} tokens/s/device  peak {p['peak_memory_bytes'] / GIB:.2f} GiB  "
             f"MFU {p['mfu']:.1%}",
             f"  {hardware_provenance(plan)}", *([here] if here else [])]
    for g in plan.groups:
        sp = {"ulysses": f", Ulysses SP ({g.sp_all_to_all_bytes_per_step:,} all-to-all bytes/step/rank)",
              "replicated": ", replicated across SP ranks", "none": ""}[g.sequence_parallel]
        if g.ep > 1:
            sp += f", experts over ep={g.ep} ({g.ep_all_to_all_bytes_per_step:,} dispatch bytes/step/rank if balanced)"
        placement = (("replicated on every rank" + ("" if g.frozen else " (gradients all-reduced)")) if g.replicate else
                     f"FSDP over {'+'.join(g.shard_dims)}, reshard_after_forward={g.reshard_after_forward}")
        lines.append(f"  {g.name} ({g.count} x {g.layer_class}, {g.role}): {placement}, "
                     f"ac={g.activation_checkpointing}{sp}"
                     + (", frozen" if g.frozen else ""))
    chunk = plan.train.get("loss_chunk_tokens", 0)
    lines.append(f"  loss: cross entropy in chunks of {chunk:,} tokens per rank, the LM head recomputed in backward"
                 if chunk else "  loss: cross entropy over each rank's whole sequence at once")
    if plan.parts is not None:
        lines += parts_explain(plan)
    local = (plan.sequence_parallel or {}).get("local_attention")
    if local:
        counts = {kind: local["layers"].count(kind) for kind in dict.fromkeys(local["layers"])}
        lines.append("  LLM attention by layer: " + ", ".join(
            f"{n} x {kind}" + (f" {local['spans'][kind]:,}" if kind in local["spans"] else "")
            for kind, n in counts.items()))
    if plan.max_seq_len_by_sp:
        lines.append("longest seq_len that fits memory: "
                     + ", ".join(f"sp={k}: {v:,}" for k, v in plan.max_seq_len_by_sp.items()))
    if alternatives:
        lines.append(f"alternatives ({plan.candidates_searched:,} candidates priced; the best of each other mesh, "
                     f"and why the leanest ones that do not fit were refused):")
        lines += [f"  {a['candidate'] or '-'}: {a['reason']}" for a in plan.alternatives] or ["  (none)"]
    return "\n".join(lines)
