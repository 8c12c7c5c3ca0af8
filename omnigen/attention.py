"""What attention each LLM layer applies, read from the model's config and attention modules as transformers reads
them, and what omnigen's own attention (Ulysses SP, packed documents) cannot reproduce.

transformers builds one mask per entry of `config.layer_types` (masking_utils): "full_attention" is causal,
"sliding_attention" lets a query see the `config.sliding_window` tokens ending at itself (q - k < window),
"chunked_attention" lets it see the earlier tokens of its own `config.attention_chunk_size`-long chunk (chunks start
at position 0, or at each document's start when rows are packed). A config without layer_types but with a
sliding_window (Mistral, Mixtral, Phi-3) slides on every layer. Everything else that changes the softmax
(logit softcapping, attention sinks, bidirectional attention, unknown layer types) is refused where omnigen's
attention would replace the model's, never run.
"""

from __future__ import annotations

import inspect

from torch import nn

CAUSAL = "causal"
SLIDING = "sliding_window"
CHUNKED = "chunked"


def layer_attention(config, attention_modules: list[nn.Module],
                    own_masks: bool = False) -> tuple[tuple[tuple[str, int], ...], str]:
    """((pattern, span) per layer, refusal). pattern is CAUSAL (span 0), SLIDING (span = window) or CHUNKED
    (span = chunk); refusal is "" or why omnigen's attention cannot compute what these layers compute.
    own_masks: the model builds its masks from token_type_ids on the whole sequence, which the script keeps under
    Ulysses (plan: model_masks); then attention modules that are not causal (PaliGemma's
    use_bidirectional_attention) are served too: they follow the model's mask, and where it builds none the script
    attends as the module's is_causal says, as transformers' sdpa_attention does."""
    layer_types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    chunk = getattr(config, "attention_chunk_size", None)
    patterns, problems = [], []
    for i, module in enumerate(attention_modules):
        index = getattr(module, "layer_idx", i)
        kind = layer_types[index] if layer_types else ("sliding_attention" if window else "full_attention")
        if kind == "full_attention":
            patterns.append((CAUSAL, 0))
        elif kind == "sliding_attention" and window:
            patterns.append((SLIDING, int(window)))
        elif kind == "chunked_attention" and chunk:
            patterns.append((CHUNKED, int(chunk)))
        else:
            patterns.append((CAUSAL, 0))
            problems.append(f"layer {index}: layer type {kind!r} (sliding_window={window}, "
                            f"attention_chunk_size={chunk}) is not causal, sliding-window or chunked attention")
        own = getattr(module, "sliding_window", None)  # Gemma, Qwen2, Cohere2, GPT-OSS keep it per layer
        if own is not None and patterns[-1] != (SLIDING, int(own)):
            problems.append(f"layer {index}: the attention module slides over {own} tokens but "
                            f"config.layer_types says {kind!r}")
        if any(isinstance(getattr(module, name, None), nn.Parameter) for name in ("sinks", "s_aux")):
            problems.append(f"layer {index}: attention sinks (a learned per-head logit in the softmax's "
                            "denominator) cannot be expressed in scaled_dot_product_attention")
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap:
        problems.insert(0, f"attn_logit_softcapping={softcap} (tanh on the attention logits) cannot be expressed "
                           "in scaled_dot_product_attention")
    if getattr(config, "use_bidirectional_attention", None) and not own_masks:
        problems.insert(0, "use_bidirectional_attention: the model attends both ways; omnigen's attention is causal")
    return tuple(patterns), "; ".join(dict.fromkeys(problems))


def query_position_scaling(attention_modules: list[nn.Module]) -> dict:
    """Llama4's NoPE layers (attn_temperature_tuning, use_rope False) multiply queries by
    1 + attn_scale * log1p(floor((position + 1) / floor_scale)), counting positions from the start of the tensor the
    layer sees: under Ulysses, from the start of each rank's chunk. What the script needs to redo it with positions
    in the whole sequence: {"layers": [index, ...], "floor_scale": ..., "attn_scale": ...}, or {} when no layer does."""
    scaled = [(getattr(m, "layer_idx", i), m) for i, m in enumerate(attention_modules)
              if getattr(m, "attn_temperature_tuning", False) and not getattr(m, "use_rope", True)]
    if not scaled:
        return {}
    first = scaled[0][1]
    return {"layers": [index for index, _ in scaled], "floor_scale": float(first.floor_scale), "attn_scale": float(first.attn_scale)}


def builds_token_type_masks(cls, config) -> bool:
    """Whether the model's forward builds its attention masks from token_type_ids (token_type_attention finds a
    pattern); the input recipe then always passes them (omnigen.inputs._token_types)."""
    if cls is None or "token_type_ids" not in inspect.signature(cls.forward).parameters:
        return False
    try:
        return token_type_attention(cls, config) is not None
    except (ValueError, TypeError, AttributeError):  # a pattern omnigen cannot mark: refused where inputs are made
        return False


TOKEN_TYPE_PROBE = (0, 0, 1, 1, 0, 1, 1, 0)  # two runs of each value: tells "each run" from "every marked token"


def token_type_attention(cls, config) -> dict | None:
    """How `token_type_ids` change the model's attention, asked of the model's own mask builder
    (`create_masks_for_generate`, which its forward's masks come from) on a short probe row, never looked up by
    model name. {"attention": "image_blocks", ...}: each run of tokens of type `marked` (one image's tokens) attends
    to itself both ways (Gemma3); {"attention": "prefix", ...}: every token of type `marked` (the prefix: image and
    prompt) sees every other both ways (PaliGemma). None when token_type_ids change nothing. Raises ValueError when
    they select a pattern that is neither."""
    import copy

    import torch

    builder = getattr(cls, "create_masks_for_generate", None)
    if builder is None or "token_type_ids" not in inspect.signature(builder).parameters:
        raise ValueError("its forward takes token_type_ids, but it has no create_masks_for_generate(token_type_ids=) "
                         "to ask which attention they select")
    config = copy.deepcopy(config)
    config.get_text_config()._attn_implementation = "sdpa"  # a boolean mask: True where attention is allowed
    types = torch.tensor([TOKEN_TYPE_PROBE])
    n = types.shape[1]
    masks = builder(config=config, inputs_embeds=torch.zeros(1, n, 1), attention_mask=None, past_key_values=None,
                    position_ids=torch.arange(n)[None], token_type_ids=types, is_first_iteration=True)
    mask = masks.get("full_attention") if isinstance(masks, dict) else masks
    ahead = torch.zeros(n, n, dtype=torch.bool) if mask is None else mask[0, 0].bool().triu(1)
    if not ahead.any():
        return None
    for marked in (0, 1):
        is_marked = types[0] == marked
        runs = torch.cumsum(is_marked & ~torch.cat([torch.tensor([False]), is_marked[:-1]]), 0)
        both = is_marked[:, None] & is_marked[None, :]
        for attention, allowed in (("image_blocks", both & (runs[:, None] == runs[None, :])), ("prefix", both)):
            if torch.equal(ahead, allowed.triu(1)):
                return {"attention": attention, "marked": marked, "unmarked": 1 - marked}
    raise ValueError(f"token_type_ids {list(TOKEN_TYPE_PROBE)} let queries see later keys at "
                     f"{[tuple(p) for p in ahead.nonzero().tolist()]}: neither bidirectional runs of one type nor a "
                     "bidirectional prefix, which are all omnigen's samples can mark")


class _AttentionReached(Exception):
    """Stops the probe's forward at the first attention call: nothing after it is needed (and MoE routing on the
    meta device could not run anyway)."""


PROBE_TOKENS = 16


def mask_built_in_layer(stack: nn.Module, attention_modules: list[tuple[str, nn.Module]]) -> str:
    """Whether the layers' attention hands transformers' attention interface a mask it built itself, asked of the
    model rather than of its name: "" when it does not (or the probe cannot tell), else why omnigen's attention
    cannot serve it. attention_modules: (module path, module) of each layer's attention.

    Under Ulysses or packed documents the script registers its own attention function and no mask function, so the
    decoder stack builds no mask (masking_utils returns None for an unregistered implementation) and the function
    receives attention_mask=None, building the causal/document mask itself on the whole sequence. A layer that
    makes its own bias from the values (Doge's dynamic mask attention: dt_proj, a top-k keep window) passes it
    anyway, built from this rank's chunk only, and the script would train another attention. The probe runs the
    stack's forward on the meta device (no memory, no arithmetic: milliseconds at real size) on a short row, with a
    recording attention function that stops at the first call and looks at the mask it was given.

    A stack the probe cannot run (one needing inputs besides input_ids, data-dependent ops that meta tensors
    cannot answer, real weights of a composed model) is not refused here: the generated attention function refuses
    at run time any mask the stack did not pass (sequence_parallel.py.j2, check_attention_mask)."""
    import torch
    import transformers

    config = getattr(stack, "config", None)
    if config is None or not attention_modules or any(p.device.type != "meta" for p in stack.parameters()):
        return ""  # not a transformers model, or real weights that would compute for real: the run-time check
    seen: dict = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        seen.update(module=module, mask=attention_mask)
        raise _AttentionReached

    transformers.AttentionInterface.register("omnigen_mask_probe", record)
    before = config._attn_implementation
    config._attn_implementation = "omnigen_mask_probe"
    try:
        with torch.device("meta"):
            stack(input_ids=torch.zeros(1, PROBE_TOKENS, dtype=torch.long), attention_mask=None, use_cache=False)
    except _AttentionReached:
        pass
    except Exception:  # the stack needs more than input_ids to run, or meta tensors cannot answer it: see above
        return ""
    finally:
        config._attn_implementation = before
    module, mask = seen.get("module"), seen.get("mask")
    path = next((p for p, m in attention_modules if m is module), None)
    if mask is None or path is None:
        return ""
    shape = "x".join(map(str, mask.shape)) if hasattr(mask, "shape") else type(mask).__name__
    return (f"{type(module).__name__} ('{path}') builds its own attention mask inside the layer (given no mask, it "
            f"hands the attention function a {shape} one, e.g. a bias computed from the values, which under Ulysses "
            "a rank would build from its chunk alone); omnigen's attention would replace it with a causal mask")
