"""Stage 1: Spec -> ModelGraph. Walks the module tree of a meta-device build (no fx, no export: both fail
on these models) and describes every block: role, kind, parameters, FLOPs and activation bytes per token.

How the tree is read (what a module *is* comes from transformers, see the predicates in omnigen/flops.py):
- Repeated layers are the elements of an nn.ModuleList of same-class modules that each contain an attention: a module
  whose forward calls transformers' attention interface (decoder layers, vision blocks, audio encoder layers). Each
  list is a Group named by its module path. A list whose layers attend some other way (a hand-written attention, or
  linear-attention / state-space layers between interface ones) is refused by name, never priced as something else.
- Routed experts are modules on transformers' experts interface (use_experts_implementation), or stacked over a
  declared num_experts; each MoE block records whether the generated EP dispatch can serve them (flops.ep_refusal).
- The language model ("foundation") is the module holding the input embeddings next to its layer list;
  lm_head / output embeddings are "head"; vision and audio towers are recognised by their module names
  (visual, vision_tower, audio_tower, ...), their mergers / projections by theirs ("projector").
- A wrapper's own parameters (LLaVA-OneVision's image_newline: held directly by a module that contains towers or
  the language model) get role "root": they join the root FSDP unit.
- Everything else with parameters becomes one top-level block. A module that fits none of these is an
  architecture we do not know: SpecError names it instead of guessing.
Every parameter belongs to exactly one top-level block or layer (tied weights to the first owner, as
model.parameters() counts them), so totals are exact. Formulas and conventions: omnigen/flops.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from . import attention as A
from . import flops as F
from . import hf
from .lm_head import chunked_loss_refusal
from .errors import SpecError
from .model_graph import Block, Group, ModelGraph, router_aux_loss
from .spec import Spec

VISION = re.compile(r"vision|visual|image")
AUDIO = re.compile(r"audio|speech|whisper")
PROJECTOR = re.compile(r"^(merger|merger_list|multi_modal_projector|mm_projector|projector|connector|aligner|proj\d*)$")
HEAD = re.compile(r"^(lm_head|head|score|classifier)$|_head$")
MLP_NAMES = re.compile(r"mlp|ffn|feed_?forward|shared_expert", re.IGNORECASE)


ACT_BYTES = 4  # activation bytes are quoted at fp32; the cost model rescales them to the compute dtype


def analyze(spec: Spec) -> ModelGraph:
    if spec.model.parts is not None:
        from .compose import analyze_composite, load_parts
        return analyze_composite(spec, load_parts(spec))
    config = hf.load_config(spec)
    from .talker import analyze_talker, trains_talker
    if trains_talker(spec, config):
        return analyze_talker(spec, config)
    cls = hf.model_class(spec, config)
    # The generated script builds fp32 master weights whatever the checkpoint's dtype (bf16 for most
    # published configs), so analyse that build: param_bytes are what training holds.
    config.dtype = torch.float32
    model = hf.build_meta_model(cls, config)
    hf.check_produces_logits(model, spec)
    if spec.model.weights is not None:
        hf.check_weights(model, spec)
    try:
        return analyze_model(model, config, cls.__name__)
    except SpecError:
        raise
    except Exception as e:  # transformers refusing a question about this model: a refusal, never a traceback
        raise SpecError(f"{cls.__name__}: omnigen cannot analyze this model: {type(e).__name__}: {e}") from None


def analyze_model(model: nn.Module, config, class_name: str, part_roles: dict[str, str] | None = None) -> ModelGraph:
    """The ModelGraph of an instantiated model (meta device is fine: only shapes are read).

    param_bytes use the built parameters' element size; act_bytes_per_token are at fp32 (ACT_BYTES). part_roles
    ({module path: role}) names the towers and projectors of a model composed from parts (omnigen/compose.py), whose
    roles the spec states rather than module names.
    """
    return _Analyzer(model, config, class_name, part_roles or {}).run()


@dataclass(frozen=True)
class _Tower:
    role: str
    path: str


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _under(path: str, prefix: str) -> bool:
    return prefix == "" or path == prefix or path.startswith(prefix + ".")


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class _Analyzer:
    def __init__(self, model: nn.Module, config, class_name: str, part_roles: dict[str, str]):
        self.model, self.config, self.class_name, self.part_roles = model, config, class_name, part_roles
        self.text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.path_of = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
        self.seen: set[int] = set()   # parameters already owned by a block (tied weights count once)
        self.blocks: list[Block] = []
        self.attention_refused, self.query_position_scaling = "", {}

    # --- structure ---------------------------------------------------------------------------------------

    def _groups(self) -> dict[str, list[tuple[str, nn.Module]]]:
        groups: dict[str, list[tuple[str, nn.Module]]] = {}
        for path, mod in self.model.named_modules():
            if not isinstance(mod, nn.ModuleList) or len(mod) == 0 or any(_under(path, g) for g in groups):
                continue
            members = list(mod.named_children())
            if len({type(m) for _, m in members}) != 1:
                continue
            attends = [any(F.is_attention(x) for x in m.modules()) for _, m in members]
            if all(attends):
                groups[path] = [(f"{path}.{n}", m) for n, m in members]
            elif any(attends):
                name, layer = members[attends.index(False)]
                raise SpecError(f"{self.class_name}: the repeated layers at '{path}' ({type(layer).__name__}) are a "
                                f"hybrid stack: {attends.count(True)} of {len(members)} attend through transformers' "
                                f"attention interface, the others (e.g. '{path}.{name}') mix tokens another way "
                                "(linear attention, a state-space or recurrent mixer); omnigen cannot price or "
                                "parallelise those layers")
            else:
                self._refuse_foreign_attention(path, members[0])
        if not groups:
            raise SpecError(f"{self.class_name}: found no repeated transformer layers (an nn.ModuleList of "
                            "same-class modules containing attention); omnigen cannot plan this model")
        return groups

    def _refuse_foreign_attention(self, path: str, member: tuple[str, nn.Module]) -> None:
        """Repeated layers whose attention bypasses transformers' attention interface would be priced without their
        attention and could not run under Ulysses: refuse them by name rather than plan them wrong. (The class name
        only picks what to name in the refusal; it never makes a module count as attention.)"""
        name, layer = member
        for sub, m in layer.named_modules():
            if "Attention" in type(m).__name__ and any(True for _ in m.parameters(recurse=False)) \
                    and not any(F.is_attention(x) for x in m.modules()):
                where = f"{path}.{name}.{sub}" if sub else f"{path}.{name}"
                raise SpecError(f"{self.class_name}: the repeated layers at '{path}' ({type(layer).__name__}) attend "
                                f"with {type(m).__name__} ('{where}'), whose forward does not call transformers' "
                                "attention interface (ALL_ATTENTION_FUNCTIONS / eager_attention_forward); omnigen "
                                "can neither count its attention nor run it under Ulysses")

    def _classify_group(self, path: str) -> _Tower:
        try:
            embed = self.model.get_input_embeddings() if hasattr(self.model, "get_input_embeddings") else None
        except NotImplementedError:
            embed = None
        if embed is not None and _parent(self.path_of.get(id(embed), "?")) == _parent(path):
            return _Tower("foundation", _parent(path))
        decoder = next((p for p, role in self.part_roles.items() if role == "decoder" and _under(path, p)), None)
        if decoder is not None:  # a decoder with layers of its own (Qwen2.5-Omni's talker)
            return _Tower("decoder", decoder)
        tower = self._encoder_tower(path)
        if tower is None:
            cls = type(self.model.get_submodule(path)[0]).__name__
            raise SpecError(f"{self.class_name}: cannot classify the repeated layers at '{path}' ({cls}): not "
                            "the language model (the module holding the input embeddings) and not inside a "
                            "vision or audio tower (module named like visual / vision_tower / audio_tower)")
        return tower

    def _encoder_tower(self, path: str) -> _Tower | None:
        """The outermost ancestor named (or, failing that, typed) like a vision or audio tower."""
        parts = path.split(".")
        prefixes = [".".join(parts[:i]) for i in range(1, len(parts))]
        stated = [_Tower(self.part_roles[p], p) for p in prefixes if self.part_roles.get(p, "").startswith("encoder")]
        if stated:
            return stated[0]
        for matcher in (lambda p: p.rpartition(".")[2], lambda p: type(self.model.get_submodule(p)).__name__):
            for prefix in prefixes:
                name = matcher(prefix).lower()
                if VISION.search(name):
                    return _Tower("encoder:vision", prefix)
                if AUDIO.search(name):
                    return _Tower("encoder:audio", prefix)
        return None

    def _top_role(self, path: str, module: nn.Module, towers: list[_Tower], direct: bool = False) -> str:
        out = self._output_embeddings()
        last = path.rpartition(".")[2]
        if out is not None and module is out:
            return "head"
        stated = [role for prefix, role in self.part_roles.items() if _under(path, prefix)]
        if stated and stated[0] in ("projector", "decoder"):
            return stated[0]
        for t in towers:
            if t.role.startswith("encoder") and _under(path, t.path):
                rel = path[len(t.path):].lstrip(".").split(".")
                return "projector" if any(PROJECTOR.match(p) for p in rel) else t.role
        if PROJECTOR.match(last):
            return "projector"
        if any(t.role == "foundation" and _under(path, t.path) for t in towers):
            return "foundation"
        if direct:
            # A wrapper's own parameters (image_newline, learned queries, registers): the module holds towers or
            # the language model, so it is no tower or head of its own; they join the root unit.
            return "root"
        if HEAD.search(last):
            return "head"
        raise SpecError(f"{self.class_name}: cannot classify module '{path}' ({type(module).__name__}, "
                        f"{_numel(module):,} parameters): not inside a vision/audio tower or the language model, "
                        "and not named like a projector (merger, multi_modal_projector, proj) or a head (lm_head)")

    def _output_embeddings(self):
        try:
            return self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        except NotImplementedError:  # some wrappers leave it unimplemented: then no module is the output embedding
            return None

    # --- the walk ----------------------------------------------------------------------------------------

    def run(self) -> ModelGraph:
        groups = self._groups()
        towers = {g: self._classify_group(g) for g in groups}
        if not any(t.role == "foundation" for t in towers.values()):
            raise SpecError(f"{self.class_name}: found no language model (repeated layers next to the input "
                            "embeddings); omnigen trains models with an LLM foundation")
        containers = {""}  # the root and every ancestor of a layer list: walked into, not made blocks
        for g in groups:
            parts = g.split(".")
            containers |= {".".join(parts[:i]) for i in range(len(parts))}
        tops: list[tuple[str, nn.Module, bool]] = []   # (path, module, direct parameters only)
        self._collect(self.model, "", groups, containers, tops)
        tower_list = list(dict.fromkeys(towers.values()))
        roles = {p: self._top_role(p, m, tower_list, direct) for p, m, direct in tops if p not in groups}
        conv_positions = self._conv_positions(tops, roles, tower_list)
        group_objs = []
        for path, module, direct in tops:
            if path in groups:
                group_objs.append(self._group(path, groups[path], towers[path]))
            else:
                self._top_block(path, module, direct, roles[path], conv_positions)
        return self._graph(tuple(group_objs), tower_list, roles)

    def _collect(self, module: nn.Module, path: str, groups, containers, out) -> None:
        """Top-level units in registration order: group lists, containers' own params, whole leaf subtrees."""
        if path in groups:
            out.append((path, module, False))
            return
        if path in containers:
            if any(True for _ in module.parameters(recurse=False)):
                out.append((path, module, True))
            for name, child in module.named_children():
                self._collect(child, f"{path}.{name}" if path else name, groups, containers, out)
        elif any(True for _ in module.parameters()):
            out.append((path, module, False))

    def _owned(self, params) -> tuple[int, int, int]:
        """(elements, bytes, tensors) of the parameters not already claimed by an earlier block."""
        n = b = t = 0
        for p in params:
            if id(p) not in self.seen:
                self.seen.add(id(p))
                n, b, t = n + p.numel(), b + p.numel() * p.element_size(), t + 1
        return n, b, t

    # --- top-level blocks --------------------------------------------------------------------------------

    def _conv_positions(self, tops, roles, towers: list[_Tower]) -> dict[int, float]:
        """Output positions per token for every conv, stem by stem (the convs of one tower, in order)."""
        stems: dict[str, list[nn.Module]] = {}
        for path, module, direct in tops:
            if path in roles and not direct:
                tower = next((t.path for t in towers if t.role.startswith("encoder") and _under(path, t.path)), "")
                stems.setdefault(tower, []).extend(m for m in module.modules() if isinstance(m, F.CONVS))
        positions: dict[int, float] = {}
        for tower, convs in stems.items():
            holder = self.model.get_submodule(tower) if tower else self.model
            # Spectrogram stems need the mel-bin count to know how many frequency positions each conv computes.
            bins = getattr(holder, "num_mel_bins", None) or getattr(getattr(holder, "config", None),
                                                                    "num_mel_bins", None)
            for conv, pos in zip(convs, F.conv_positions_per_token(convs, bins)):
                positions[id(conv)] = pos
        return positions

    def _top_block(self, path, module, direct, role, conv_positions) -> None:
        params, nbytes, tensors = self._owned(module.parameters(recurse=not direct))
        if direct:
            flops = act = 0.0
        else:
            flops = F.matmul_flops(module) + sum(F.conv_flops_per_position(c) * conv_positions.get(id(c), 1.0)
                                                 for c in module.modules() if isinstance(c, F.CONVS))
            act = module.in_features if isinstance(module, nn.Linear) else F.activation_elements(module, None, 0)
        self.blocks.append(Block(name=path or "<root>", role=role, kind=self._top_kind(path, module, role),
                                 parent=None, group=None, params=params, param_bytes=nbytes,
                                 flops_per_token=flops, act_bytes_per_token=act * ACT_BYTES,
                                 hidden=self._width(module), tensors=tensors))

    @staticmethod
    def _top_kind(path: str, module: nn.Module, role: str) -> str:
        if role == "decoder" and (isinstance(module, nn.Embedding) or F.is_norm(module)):  # a talker's own
            return "embedding" if isinstance(module, nn.Embedding) else "norm"
        if role in ("head", "decoder"):  # a codebook decoder: its head's matmul is the work
            return "head"
        if isinstance(module, nn.Embedding) or "embed" in path.rpartition(".")[2]:
            return "embedding"
        return "norm" if F.is_norm(module) else "other"

    @staticmethod
    def _width(module: nn.Module) -> int:
        if isinstance(module, nn.Embedding):
            return module.embedding_dim
        if isinstance(module, nn.Linear):
            return module.in_features
        w = getattr(module, "weight", None)
        return w.numel() if isinstance(w, torch.Tensor) and w.ndim == 1 else 0

    # --- layers and groups -------------------------------------------------------------------------------

    def _group(self, path: str, members, tower: _Tower) -> Group:
        """Per-member figures. Members of one list can differ (DeepSeek-V3's first_k_dense_replace dense
        layers before MoE ones, Qwen-MoE mlp_only_layers): then figures are means, so count x figure stays
        exact, and each layer's own Block keeps its true figures."""
        layers = [self._layer(p, m, path, tower.role) for p, m in members]
        n = len(layers)
        first = layers[0]

        def mean(field: str) -> float:
            return sum(getattr(b, field) for b in layers) / n

        experts = sum(p.numel() for _, m in members for x in m.modules() if F.is_experts(x)
                      for p in x.parameters(recurse=False) if p.ndim == 3)
        return Group(name=path, pattern=f"{path}.*", role=tower.role, layer_class=type(members[0][1]).__name__,
                     members=tuple(p for p, _ in members), params=round(mean("params")),
                     param_bytes=round(mean("param_bytes")), flops_per_token=mean("flops_per_token"),
                     attn_flops_per_token_per_seq=mean("attn_flops_per_token_per_seq"),
                     act_bytes_per_token=mean("act_bytes_per_token"), heads=first.heads, kv_heads=first.kv_heads,
                     head_dim=first.head_dim, hidden=first.hidden, experts=max(b.experts for b in layers),
                     top_k=max(b.top_k for b in layers), expert_params=round(experts / n),
                     tensors=round(mean("tensors")), ep_refusal=self._group_ep_refusal(path, layers),
                     attention_spans=self._attention_spans(members, tower.role))

    def _group_ep_refusal(self, path: str, layers: list[Block]) -> str:
        moe = [b for b in self.blocks if b.kind == "moe" and b.group == path]
        bad = next((b for b in moe if b.ep_refusal), None)
        return f"{bad.experts_module}: {bad.ep_refusal}" if bad else ""

    def _attention_spans(self, members, role: str) -> tuple[tuple[str, int], ...]:
        """The LLM's attention per layer (omnigen.attention); what cannot be reproduced is kept for the planner."""
        if role != "foundation":
            return ()
        modules = [next(m for m in layer.modules() if F.is_attention(m)) for _, layer in members]
        config = getattr(modules[0], "config", None) or self.text_config
        own_masks = A.builds_token_type_masks(getattr(transformers, self.class_name, None), self.config)
        spans, refused = A.layer_attention(config, modules, own_masks=own_masks)
        stack = self.model.get_submodule(_parent(_parent(members[0][0])))
        built = A.mask_built_in_layer(stack, [(self.path_of[id(m)], m) for m in modules])
        if not (refused or built) and not hf.supports_sdpa(self.class_name):
            # transformers itself says SDPA cannot compute this model's attention, for a reason not found above
            built = (f"transformers marks {self.class_name} as not computable with scaled_dot_product_attention "
                     "(_supports_sdpa = False), which omnigen's attention uses")
        refused = "; ".join(r for r in (refused, built) if r)
        self.attention_refused = refused and f"{self.class_name} '{_parent(members[0][0])}': {refused}"
        self.query_position_scaling = A.query_position_scaling(modules)
        return spans

    def _layer(self, path: str, layer: nn.Module, group: str, role: str) -> Block:
        attn_mod = next((m for m in layer.modules() if F.is_attention(m)), None)
        attn = F.attention_shape(attn_mod) if attn_mod is not None else None
        if attn is None:
            raise SpecError(f"{self.class_name}: cannot read heads / head_dim of the attention in '{path}' "
                            f"({type(attn_mod).__name__})")
        moe = next((m for m in layer.modules() if any(F.is_experts(x) for x in m.children())), None)
        moe_fields = self._moe_fields(moe, path) if moe is not None else {}
        top_k = moe_fields.get("top_k", 0)
        shape = dict(heads=attn.heads, kv_heads=attn.kv_heads, head_dim=attn.qk_dim, hidden=attn.hidden)
        params, nbytes, tensors = self._owned(layer.parameters())
        block = Block(name=path, role=role, kind="layer", parent=None, group=group, params=params,
                      param_bytes=nbytes, tensors=tensors, flops_per_token=F.matmul_flops(layer, top_k),
                      attn_flops_per_token_per_seq=attn.score_flops,
                      act_bytes_per_token=F.activation_elements(layer, attn, top_k) * ACT_BYTES,
                      **shape, **moe_fields)
        self.blocks.append(block)
        for name, child in layer.named_children():
            self._layer_part(f"{path}.{name}", child, block, attn, moe_fields, shape)
        return block

    def _moe_fields(self, moe: nn.Module, path: str) -> dict[str, int]:
        name, experts = next((n, x) for n, x in moe.named_children() if F.is_experts(x))
        count = getattr(experts, "num_experts", 0) or next(p for p in experts.parameters() if p.ndim == 3).shape[0]
        top_k = F.top_k_of(moe, getattr(self.text_config, "num_experts_per_tok", None))
        if not top_k:
            raise SpecError(f"{self.class_name}: cannot tell how many experts each token uses in '{path}' "
                            "(no router top_k and no num_experts_per_tok in the config)")
        shared = [n for n, c in moe.named_children() if "shared" in n and not isinstance(c, nn.Linear)]
        n_shared = (getattr(self.text_config, "n_shared_experts", None) or len(shared)) if shared else 0
        where = f"{self.path_of[id(moe)]}.{name}"
        return {"experts": count, "top_k": top_k, "shared_experts": n_shared, "experts_module": where,
                "ep_refusal": F.ep_refusal(experts)}

    def _layer_part(self, path, child, layer: Block, attn: F.AttentionShape, moe_fields, shape) -> None:
        if not any(True for _ in child.parameters()):
            return
        top_k = moe_fields.get("top_k", 0)
        kind = self._part_kind(path, child)
        params = sum(p.numel() for p in child.parameters())
        nbytes = sum(p.numel() * p.element_size() for p in child.parameters())
        act = child.in_features if isinstance(child, nn.Linear) else F.activation_elements(child, attn, top_k)
        extra = {"attention": {**shape, "attn_flops_per_token_per_seq": attn.score_flops},
                 "moe": {**moe_fields, "hidden": shape["hidden"]}}.get(kind, {"hidden": shape["hidden"]})
        self.blocks.append(Block(name=path, role=layer.role, kind=kind, parent=layer.name, group=layer.group,
                                 params=params, param_bytes=nbytes, flops_per_token=F.matmul_flops(child, top_k),
                                 act_bytes_per_token=act * ACT_BYTES, **extra))

    @staticmethod
    def _part_kind(path: str, child: nn.Module) -> str:
        if F.is_attention(child):
            return "attention"
        if any(F.is_experts(m) for m in child.modules()):
            return "moe"
        if F.is_norm(child):
            return "norm"
        if isinstance(child, nn.Linear) or MLP_NAMES.search(path.rpartition(".")[2]) or MLP_NAMES.search(
                type(child).__name__):
            return "mlp"
        return "other"

    # --- result ------------------------------------------------------------------------------------------

    def _graph(self, groups: tuple[Group, ...], towers: list[_Tower], roles: dict[str, str]) -> ModelGraph:
        total = sum(p.numel() for p in self.model.parameters())
        total_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        owned = sum(b.params for b in self.blocks if b.parent is None)
        if owned != total:  # a parameter outside every block would silently vanish from the plan
            missing = [n for n, p in self.model.named_parameters() if id(p) not in self.seen][:5]
            raise SpecError(f"{self.class_name}: {total - owned:,} parameters belong to no block: {missing}")
        tower_paths = {t.role: t.path for t in towers}
        for path, role in roles.items():
            if role != "root":
                tower_paths.setdefault(role, path)
        out = self._output_embeddings()
        vocab = getattr(out, "out_features", 0) or getattr(self.text_config, "vocab_size", 0) or 0
        head = next((p for p, m in self.model.named_modules() if m is out), "") if out is not None else ""
        chunk_refused = ("a model composed from parts computes each decoder's loss itself" if self.part_roles
                         else chunked_loss_refusal(self.model) if head else "the model has no LM head")
        return ModelGraph(model_class=self.class_name, model_type=getattr(self.config, "model_type", ""),
                          blocks=tuple(self.blocks), groups=groups, total_params=total,
                          total_param_bytes=total_bytes, vocab_size=int(vocab), towers=tower_paths,
                          router_aux_loss=router_aux_loss(self.config.to_dict()) is not None,
                          attention_refused=self.attention_refused,
                          query_position_scaling=self.query_position_scaling, lm_head=head,
                          chunked_loss_refused=chunk_refused)


# --- the `omnigen analyze` table ------------------------------------------------------------------------------

def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def format_graph(graph: ModelGraph) -> str:
    """A compact table: one row per group (per-member figures), one per other block, totals per role."""
    w = max([len(g.pattern) + 1 for g in graph.groups] + [len(b.name) + len(b.kind) + 3 for b in graph.blocks
                                                          if b.parent is None and b.group is None] + [20])
    head = (f"{'block':<{w}} {'role':<14} {'n':>4} {'params':>7} {'FLOP/tok':>8} {'attn/ctx':>8} "
            f"{'act B/tok':>9} {'h/kv/hd':>10} {'E/k':>6}")
    rule = "-" * len(head)
    lines = [f"{graph.model_class} ({graph.model_type}): {_si(graph.total_params)} parameters, "
             f"{graph.total_param_bytes / 2**30:.3g} GiB as built, vocab {graph.vocab_size}", head, rule]
    mixed = False
    for g in graph.groups:
        sizes = {b.params for b in graph.blocks if b.group == g.name and b.kind == "layer"}
        mark = "~" if len(sizes) > 1 else ""
        mixed |= bool(mark)
        shape = f"{g.heads}/{g.kv_heads}/{g.head_dim}"
        moe = f"{g.experts}/{g.top_k}" if g.experts else "-"
        lines.append(f"{g.pattern + mark:<{w}} {g.role:<14} {g.count:>4} {_si(g.params):>7} "
                     f"{_si(g.flops_per_token):>8} {_si(g.attn_flops_per_token_per_seq):>8} "
                     f"{_si(g.act_bytes_per_token):>9} {shape:>10} {moe:>6}")
    for b in graph.blocks:
        if b.parent is None and b.group is None:
            lines.append(f"{b.name + ' [' + b.kind + ']':<{w}} {b.role:<14} {1:>4} {_si(b.params):>7} "
                         f"{_si(b.flops_per_token):>8} {'-':>8} {_si(b.act_bytes_per_token):>9} {'-':>10} {'-':>6}")
    lines.append(rule)
    for role in dict.fromkeys(b.role for b in graph.blocks):
        tops = [b for b in graph.blocks if b.role == role and b.parent is None]
        lines.append(f"{'total ' + role:<{w}} {'':<14} {len(tops):>4} {_si(sum(b.params for b in tops)):>7} "
                     f"{_si(sum(b.flops_per_token for b in tops)):>8} "
                     f"{_si(sum(b.attn_flops_per_token_per_seq for b in tops)):>8}")
    lines.append("FLOP/tok: forward FLOPs per token of the block's own sequence (MoE: active experts only); "
                 "attn/ctx: per token per context token (full, non-causal scores).")
    if mixed:
        lines.append("~ members differ (e.g. dense and MoE layers): group figures are per-member means.")
    return "\n".join(lines)
