"""Per-module cost formulas for the analyzer: forward FLOPs and saved-activation elements per token.

Conventions (the same ones torch.utils.flop_counter.FlopCounterMode uses, so the two can be compared):
- A matmul of [m, k] x [k, n] costs 2·m·k·n FLOPs; bias adds, norms, activations and softmax cost nothing.
- FLOPs are per token of the sequence the module runs on: a Linear costs 2·in·out per row it sees.
  Encoder layers count per encoder token (vision patch, audio frame after the conv stem); a projector
  (vision merger, audio proj) counts per token it *emits* into the language model.
- Routed experts cost top_k active experts per token; the router and shared experts are ordinary matmuls.
- Attention's sequence-dependent part (QK^T and AV) is a separate coefficient: 2·heads·(qk_dim + v_dim)
  FLOPs per query token per context token, i.e. 4·heads·head_dim for ordinary attention. It is counted over
  the full, non-causal score matrix, which is how FlopCounterMode counts SDPA (causal kernels do about half).

FlopCounterMode has no formula for two ops these models run on CPU: `aten._grouped_mm` (the grouped_mm
experts kernel) and `aten._scaled_dot_product_flash_attention_for_cpu` (+ backward).
`register_missing_flop_formulas()` adds honest formulas for them so measured and predicted counts compare.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import nn

ACTIVATION_NAMES = ("Activation", "GELU", "SiLU", "ReLU", "Tanh", "Sigmoid", "Swish", "Mish")


# --- module predicates ------------------------------------------------------------------------------------

# What a module is comes from transformers, not from its class name:
# - attention: a module whose forward calls transformers' attention interface. Every attention in transformers 5.x
#   picks its kernel with `ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)`
#   (or indexes ALL_ATTENTION_FUNCTIONS after defaulting to eager_attention_forward), so the forward's bytecode names
#   one of those globals. Reading `co_names` of the (unwrapped) forward is a static test, once per class: it needs no
#   forward run (vision/audio towers do not run on meta) and it is what the generated script relies on, since Ulysses
#   plugs in through that same interface. A layer that merely holds an attention (Pixtral's PixtralAttentionLayer)
#   does not name it; the inner PixtralAttention does.
# - routed experts: a module class decorated with `transformers.integrations.moe.use_experts_implementation`. The
#   decorator replaces `forward` with one shared wrapper that looks up `config._experts_implementation` in its experts
#   interface (ALL_EXPERTS_FUNCTIONS); every decorated class's forward therefore runs the same code object, which we
#   get by decorating a probe class. The decorator's layout flags (has_bias, is_transposed, ...) live on the instance.
#   Fused experts outside that interface (Llama4TextExperts, JetMoe's parallel experts) are recognised by what they
#   declare instead: an integer `num_experts` and 3-D parameters stacked over exactly that many experts. A Conv1d
#   weight, a pooling head's probe or a [1, 1, H] class token declares no expert count and is never taken for experts.
ATTENTION_INTERFACE_NAMES = frozenset({"ALL_ATTENTION_FUNCTIONS", "eager_attention_forward"})
_CALLS_ATTENTION: dict[type, bool] = {}


def calls_attention_interface(cls: type) -> bool:
    """The class's forward names transformers' attention interface (cached per class)."""
    hit = _CALLS_ATTENTION.get(cls)
    if hit is None:
        forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
        code = getattr(forward, "__code__", None)
        hit = _CALLS_ATTENTION[cls] = bool(code and ATTENTION_INTERFACE_NAMES & set(code.co_names))
    return hit


def is_attention(module: nn.Module) -> bool:
    return calls_attention_interface(type(module)) and any(True for _ in module.parameters())


def is_norm(module: nn.Module) -> bool:
    return "Norm" in type(module).__name__


def is_activation(module: nn.Module) -> bool:
    name = type(module).__name__
    return any(a in name for a in ACTIVATION_NAMES) and not any(True for _ in module.parameters())


@functools.cache
def _experts_forward_code():
    """The code object of the forward `use_experts_implementation` installs (shared by every decorated class)."""
    from transformers.integrations.moe import use_experts_implementation

    class _Probe(nn.Module):
        def __init__(self, config):
            super().__init__()

        def forward(self, hidden_states, top_k_index, top_k_weights):
            return hidden_states

    return use_experts_implementation(_Probe).forward.__code__


def experts_interface(module: nn.Module):
    """The ExpertsInterface the module dispatches through (transformers' ALL_EXPERTS_FUNCTIONS unless the class was
    decorated with another one), or None when its class is not on the experts interface."""
    forward = getattr(type(module), "forward", None)
    if getattr(forward, "__code__", None) is not _experts_forward_code():
        return None
    cells = dict(zip(forward.__code__.co_freevars, forward.__closure__ or ()))
    return cells["experts_interface"].cell_contents if "experts_interface" in cells else None


def _stacked_experts(module: nn.Module) -> bool:
    count = getattr(module, "num_experts", None)
    three = [p for p in module.parameters(recurse=False) if p.ndim == 3]
    return (isinstance(count, int) and not isinstance(count, bool) and count > 1 and bool(three)
            and all(p.shape[0] == count for p in three))


def is_experts(module: nn.Module) -> bool:
    """Fused routed experts: on transformers' experts interface, or declaring num_experts over its 3-D parameters."""
    return experts_interface(module) is not None or _stacked_experts(module)


def ep_refusal(module: nn.Module) -> str:
    """Why the generated script's EP dispatch (templates/ep.py.j2) cannot serve these experts; "" when it can.

    The script registers its dispatch in ALL_EXPERTS_FUNCTIONS and switches the module's
    config._experts_implementation to it, then runs down(act(gate) * up) per local expert on fused, concatenated,
    untransposed [E, 2I, H] / [E, H, I] weights without biases or a post-expert norm."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    cls = type(module).__name__
    interface = experts_interface(module)
    if interface is None:
        return (f"{cls} is not on transformers' experts interface (its class is not decorated with "
                "use_experts_implementation), which is where the generated script plugs in its expert dispatch")
    if interface is not ALL_EXPERTS_FUNCTIONS:
        return f"{cls} dispatches through its own experts interface, not transformers' ALL_EXPERTS_FUNCTIONS"
    layout = {"has_bias": (True, "expert biases"), "is_transposed": (True, "transposed expert weights"),
              "has_gate": (False, "ungated experts"), "is_concatenated": (False, "interleaved gate/up weights"),
              "has_post_expert_norm": (True, "a post-expert norm")}
    found = [what for flag, (bad, what) in layout.items() if getattr(module, flag, not bad) == bad]
    missing = [n for n in ("gate_up_proj", "down_proj") if not isinstance(getattr(module, n, None), nn.Parameter)]
    if missing:
        found.append(f"no fused {' / '.join(missing)} parameter")
    if not isinstance(getattr(module, "num_experts", None), int):
        found.append("no num_experts attribute")
    if found:
        return f"{cls} has {', '.join(found)}; the generated EP dispatch runs gated, bias-free [E, 2I, H] experts only"
    return ""


def is_router(module: nn.Module) -> bool:
    """A router keeps a bare [experts, hidden] weight and applies it with F.linear (not an nn.Linear)."""
    w = getattr(module, "weight", None)
    return (isinstance(w, nn.Parameter) and w.ndim == 2
            and not isinstance(module, (nn.Linear, nn.Embedding)) and not is_norm(module))


CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --- attention shape ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionShape:
    heads: int
    kv_heads: int
    qk_dim: int      # per-head dimension of queries/keys (MLA: nope + rope part)
    v_dim: int       # per-head dimension of values
    hidden: int      # the residual width the attention writes back to

    @property
    def score_flops(self) -> float:
        """Forward FLOPs per query token per context token: QK^T (2·h·qk) + AV (2·h·v)."""
        return 2.0 * self.heads * (self.qk_dim + self.v_dim)


def _first_attr(module: nn.Module, *names: str) -> int | None:
    config = getattr(module, "config", None)
    for source in (module, config):
        for name in names:
            value = getattr(source, name, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def attention_shape(attn: nn.Module) -> AttentionShape | None:
    """Heads and head dims from the module's own attributes (its config as a fallback); None if unknown."""
    qk = _first_attr(attn, "qk_head_dim", "head_dim")
    heads = _first_attr(attn, "num_heads", "num_attention_heads")
    linears = [m for m in attn.modules() if isinstance(m, nn.Linear)]
    if qk is None or heads is None or not linears:
        return None
    groups = _first_attr(attn, "num_key_value_groups") or 1
    kv = _first_attr(attn, "num_key_value_heads") or max(1, heads // groups)
    v = _first_attr(attn, "v_head_dim") or qk
    # The last Linear registered is the output projection back onto the residual stream.
    return AttentionShape(heads=heads, kv_heads=kv, qk_dim=qk, v_dim=v, hidden=linears[-1].out_features)


# --- FLOPs -----------------------------------------------------------------------------------------------

def top_k_of(moe: nn.Module, fallback: int | None) -> int | None:
    """Active experts per token: the router's `top_k` (transformers 5.x routers carry it), else the config's."""
    for m in moe.modules():
        k = _first_attr(m, "top_k", "num_experts_per_tok")
        if k:
            return k
    return fallback


def experts_flops(experts: nn.Module, top_k: int) -> float:
    """top_k experts per token, each a chain of [out, in] matmuls (gate_up_proj then down_proj)."""
    per_expert = sum(p.shape[1] * p.shape[2] for p in experts.parameters(recurse=False) if p.ndim == 3)
    return 2.0 * top_k * per_expert


def matmul_flops(module: nn.Module, top_k: int = 0) -> float:
    """Forward FLOPs per row of every Linear / router / fused-expert matmul under `module` (convs excluded)."""
    if isinstance(module, nn.Linear):
        return 2.0 * module.in_features * module.out_features
    if is_experts(module):
        return experts_flops(module, top_k)
    own = 2.0 * module.weight.numel() if is_router(module) else 0.0
    return own + sum(matmul_flops(c, top_k) for c in module.children())


def conv_flops_per_position(conv: nn.Module) -> float:
    """One output position: C_out · (C_in / groups) · kernel volume multiply-accumulates."""
    return 2.0 * conv.weight.numel()


def conv_positions_per_token(convs: list[nn.Module], freq_bins: int | None) -> list[float]:
    """Output positions each conv of a stem produces per token leaving the stem.

    The last axis is time (or the patch axis): every later conv's time stride multiplies the positions an
    earlier conv computes per output token. A Conv2d over a spectrogram [freq, time] also computes one
    position per remaining frequency bin, tracked from the config's mel-bin count. A patch embedding
    (kernel == stride) is one position per token.
    """
    positions = []
    freq = freq_bins
    for i, conv in enumerate(convs):
        later = 1
        for nxt in convs[i + 1:]:
            later *= nxt.stride[-1]
        if isinstance(conv, nn.Conv2d) and freq:
            k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
            freq = (freq + 2 * p - d * (k - 1) - 1) // s + 1
            positions.append(float(freq * later))
        else:
            positions.append(float(later))
    return positions


# --- activations kept for backward -------------------------------------------------------------------------

def activation_elements(module: nn.Module, attn: AttentionShape | None, top_k: int) -> float:
    """Elements per token that autograd keeps for backward under `module` (no checkpointing). An estimate,
    checked against saved_tensors_hooks on the tiny configs; the cost model calibrates it further:

    - every Linear keeps its input; Linears of one module reading the module's input (q/k/v, gate/up: the
      ones with the first Linear's in_features, before the last) share it; the last Linear (o_proj,
      down_proj, fc2) reads the module's own result and keeps that;
    - a Python RMSNorm keeps its input, the normalised tensor and 1/rms: 2·H + 1 (per-head q/k norms:
      2·heads·head_dim + heads); torch's fused LayerNorm / RMSNorm keep the input, mean and rstd: H + 2;
    - an activation function keeps its input (I); a gated MLP (3+ Linears) also keeps both operands of
      act(gate)·up: 3·I in all, where I is the last Linear's in_features;
    - SDPA keeps q, k, v and the logsumexp: h·qk + kv·qk + kv·v + h (its output is the o_proj input,
      already counted; fused kernels return it in the layout o_proj reads, so no copy is kept). Math
      fallbacks that keep the full score matrix (e.g. qk_dim != v_dim on CPU) are not modelled;
    - routed experts keep, per active expert, the gathered input (H), gate_up output (2I), act(gate) (I),
      the down input (I) and the down output for the routing-weight product (H): top_k·(2H + 4I) gated,
      top_k·(2H + 2I) otherwise; a router keeps its input (H) and its probabilities (E).
    Tensors shared by sibling modules (the MoE input read by router and shared expert) count once per
    reader; index tensors, RoPE cos/sin (per position, shared by all layers), residual adds, dropout (p=0),
    convs and embeddings (per-token share negligible, or indices only) are not counted.
    """
    if isinstance(module, nn.Linear):
        return 0.0  # counted by the parent, which knows which Linears share an input
    if is_norm(module):
        return _norm_elements(module, 1)
    if is_experts(module):
        return _experts_elements(module, top_k)
    if is_router(module):
        e, h = module.weight.shape
        return float(e + h)
    total = _linear_inputs(module) + _activation_inputs(module)
    if is_attention(module) and attn is not None:
        total += attn.heads * attn.qk_dim + attn.kv_heads * (attn.qk_dim + attn.v_dim) + attn.heads
        total += _per_head_norms(module, attn)
    return total + sum(activation_elements(c, attn, top_k) for c in module.children()
                       if not (is_attention(module) and _is_head_norm(c, attn)))


def _param_numel(module: nn.Module, name: str) -> int:
    p = getattr(module, name, None)
    return p.numel() if isinstance(p, torch.Tensor) else 0


def _norm_elements(norm: nn.Module, copies: int) -> float:
    """Saved elements of a norm applied to `copies` vectors of its width per token (heads for q/k norms)."""
    width = _param_numel(norm, "weight") or (getattr(norm, "normalized_shape", None) or (0,))[-1]
    if isinstance(norm, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        return float(copies * (width + 2))
    return float(copies * (2 * width + 1))


def _is_head_norm(module: nn.Module, attn: AttentionShape | None) -> bool:
    """Qwen3-style q_norm / k_norm: a norm of one head's width, applied to every head."""
    return attn is not None and is_norm(module) and _param_numel(module, "weight") == attn.qk_dim


def _per_head_norms(attn_module: nn.Module, attn: AttentionShape) -> float:
    total = 0.0
    for name, child in attn_module.named_children():
        if _is_head_norm(child, attn):
            total += _norm_elements(child, attn.kv_heads if name.startswith("k") else attn.heads)
    return total


def _linear_inputs(module: nn.Module) -> float:
    linears = [c for c in module.children() if isinstance(c, nn.Linear)]
    if not linears:
        return 0.0
    if len(linears) == 1:
        return float(linears[0].in_features)
    *readers, last = linears
    shared = readers[0].in_features
    own = sum(l.in_features for l in readers if l.in_features != shared)
    return float(shared + own + last.in_features)


def _activation_inputs(module: nn.Module) -> float:
    if not any(is_activation(c) for c in module.children()):
        return 0.0
    linears = [c for c in module.children() if isinstance(c, nn.Linear)]
    if not linears:
        return 0.0
    inner = linears[-1].in_features
    return float(3 * inner if len(linears) >= 3 else inner)


def _experts_elements(experts: nn.Module, top_k: int) -> float:
    shapes = [p.shape for p in experts.parameters(recurse=False) if p.ndim == 3]
    first, down = shapes[0], shapes[-1]   # the last projection maps I back to H
    if first[2] == down[1]:               # [E, 2I, H] then [E, H, I]
        hidden, inner, first_out = down[1], down[2], first[1]
    else:                                 # transposed: [E, H, 2I] then [E, I, H] (Llama4, Aria, gpt-oss)
        hidden, inner, first_out = down[2], down[1], first[2]
    gated = first_out == 2 * inner
    return float(top_k * (2 * hidden + (4 if gated else 2) * inner))


# --- FlopCounterMode formulas for ops it does not know ------------------------------------------------------

def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch._grouped_mm: every row of the ragged operand meets one group's matrix.

    2-D x 2-D (ragged contraction, the weight gradient): 2·M·K_total·N. Otherwise each output element is
    one K-long dot product: 2·numel(out)·K. (Counts all rows; with EP sentinel rows beyond offs[-1] the
    kernel skips them, so this over-counts by the dropped rows only.)
    """
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    numel = 1
    for d in out_shape:
        numel *= d
    return 2 * numel * a_shape[-1]


def _sdpa_forward_flops(q_shape, k_shape, v_shape) -> int:
    """QK^T and AV over all query heads (GQA broadcasts kv heads): 2·b·h·s_q·s_k·(d_qk + d_v)."""
    b, h, s_q, d_qk = q_shape
    s_k, d_v = k_shape[-2], v_shape[-1]
    return 2 * b * h * s_q * s_k * (d_qk + d_v)


def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return _sdpa_forward_flops(query, key, value)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: twice the forward matmuls (as torch counts flash)."""
    return 2 * _sdpa_forward_flops(query, key, value)


def register_missing_flop_formulas() -> None:
    """Teach FlopCounterMode the grouped-mm and CPU flash-attention ops (idempotent)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    aten = torch.ops.aten
    formulas = {
        aten._grouped_mm: _grouped_mm_flops,
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
    }
    for op, formula in formulas.items():
        if op not in flop_registry and op.default not in flop_registry:
            register_flop_formula(op)(formula)
