"""The analyzer's result: a frozen, serialisable description of a model's blocks, and its networkx view.

A Block is one module worth reasoning about (a decoder layer, its attention, its MLP, an embedding, a
norm, a head). Blocks that repeat (model.language_model.layers.0..N) form a Group: the planner solves
per group, and a group's members are the FSDP units of the generated script.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


# "root": a wrapper's own parameters (LLaVA-OneVision's image_newline, learned queries, registers) held by a module
# that is neither inside a tower nor inside the language model; they join the root FSDP unit with the embeddings.
# "decoder": the codebook decoders of a model composed from parts (omnigen/compose.py), heads on the foundation.
ROLES = ("encoder:vision", "encoder:audio", "projector", "foundation", "head", "decoder", "root")
KINDS = ("layer", "embedding", "attention", "mlp", "moe", "norm", "head", "other")


@dataclass(frozen=True)
class Block:
    name: str                      # module path: "model.language_model.layers.0.self_attn"
    role: str                      # one of ROLES
    kind: str                      # one of KINDS
    parent: str | None             # enclosing block's name (a layer for its attention/mlp), None at top level
    group: str | None              # the repeated group this block (or its parent layer) belongs to
    params: int                    # parameters owned by this module and its children
    param_bytes: int
    flops_per_token: float         # forward FLOPs per token, sequence-independent part (MoE: active experts only)
    attn_flops_per_token_per_seq: float = 0.0  # forward FLOPs per token per token of context (scores + weighted sum)
    act_bytes_per_token: float = 0.0  # activation bytes per token kept for backward (no checkpointing)
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    hidden: int = 0
    experts: int = 0
    top_k: int = 0
    shared_experts: int = 0
    tensors: int = 0               # parameter tensors it owns: the optimizer's host work is per tensor
    experts_module: str = ""       # kind "moe": module path of its routed experts (what EP slices)
    ep_refusal: str = ""           # kind "moe": why the generated EP dispatch cannot serve those experts ("" if it can)


@dataclass(frozen=True)
class Group:
    """Repeated blocks: `pattern` is "model.language_model.layers.*", `members` the concrete module paths."""
    name: str                      # "model.language_model.layers"
    pattern: str
    role: str
    layer_class: str               # e.g. "Qwen2VLDecoderLayer"
    members: tuple[str, ...]
    # Per member (all members are alike):
    params: int
    param_bytes: int
    flops_per_token: float
    attn_flops_per_token_per_seq: float
    act_bytes_per_token: float
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    hidden: int = 0
    experts: int = 0
    top_k: int = 0
    expert_params: int = 0         # routed-expert parameters per member (the part EP slices)
    tensors: int = 0               # parameter tensors per member
    ep_refusal: str = ""           # "<experts module>: <reason>" when EP cannot serve this group's experts
    # The LLM's attention per member, as transformers masks it (omnigen.attention): ("causal", 0),
    # ("sliding_window", window) or ("chunked", chunk). Empty for encoders (they attend within their items).
    attention_spans: tuple[tuple[str, int], ...] = ()

    @property
    def count(self) -> int:
        return len(self.members)


@dataclass(frozen=True)
class ModelGraph:
    model_class: str
    model_type: str
    blocks: tuple[Block, ...]
    groups: tuple[Group, ...]
    total_params: int
    total_param_bytes: int
    vocab_size: int = 0            # the LM head's output size (logits memory)
    # Roles present and the sub-module that carries each (e.g. {"encoder:vision": "model.visual"}).
    towers: dict[str, str] = field(default_factory=dict)
    router_aux_loss: bool = False  # the config adds the routers' load-balancing loss: its all-reduces cost time
    # Why omnigen's own attention (Ulysses, packed documents) cannot compute the LLM's: softcapping, sinks, ...
    attention_refused: str = ""
    # Llama4's NoPE layers scale queries by their position within the tensor they see (omnigen.attention): Ulysses
    # must redo it with whole-sequence positions. {"layers": [...], "floor_scale": ..., "attn_scale": ...} or {}.
    query_position_scaling: dict[str, Any] = field(default_factory=dict)
    lm_head: str = ""              # module path of the LM head (the output embeddings)
    # Why the script cannot compute the loss in chunks inside the LM head ("" when it can; omnigen.lm_head).
    chunked_loss_refused: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelGraph":
        return cls(**{**d, "blocks": tuple(Block(**b) for b in d["blocks"]),
                      "groups": tuple(Group(**{**g, "members": tuple(g["members"]),
                                                "attention_spans": tuple(map(tuple, g.get("attention_spans", ())))})
                                       for g in d["groups"])})

    def graph(self) -> "networkx.DiGraph":
        """Blocks as nodes; `contains` edges from a layer to its parts, `next` edges along the forward order."""
        import networkx as nx  # only the graph view needs it; keeps `omnigen compile` start-up short
        g = nx.DiGraph()
        for b in self.blocks:
            g.add_node(b.name, **asdict(b))
            if b.parent:
                g.add_edge(b.parent, b.name, relation="contains")
        tops = [b.name for b in self.blocks if b.parent is None]
        for a, b in zip(tops, tops[1:]):
            g.add_edge(a, b, relation="next")
        return g

    def group(self, name: str) -> Group:
        return next(g for g in self.groups if g.name == name)


def router_aux_loss(config: dict[str, Any]) -> dict[str, Any] | None:
    """The router load-balancing loss the model config asks for, as transformers reads it (output_router_logits and
    a nonzero router_aux_loss_coef, on the text sub-config of a multimodal model), or None. Part of the objective
    the model defines, like its architecture: not a planner decision."""
    text = config.get("text_config") or config
    coef = text.get("router_aux_loss_coef") or 0.0
    return {"coef": coef} if text.get("output_router_logits") and coef else None
