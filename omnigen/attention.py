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
