"""Tiny configs by code: shrink any transformers config (text, vision, audio, MoE) to a CPU-test size.

`tiny_config(cls)` starts from the config class's own defaults (the released model's shape) and walks every
sub-config (text_config, vision_config, audio_config, ...), shrinking the size fields it knows by name while
keeping the constraints between them valid:
  - widths: every hidden size becomes WIDTH, heads HEADS (head_dim WIDTH / HEADS), kv heads fewer when the
    original used grouped-query attention; a tower's output width (out_hidden_size, ...) is the text width;
  - depth: LAYERS per stack; per-layer lists (layer_types, no_rope_layers) are cut to it and layer-index lists
    (deepstack_visual_indexes, moe_layers, fullatt_block_indexes) mapped onto it;
  - MoE: EXPERTS experts, top-k at most 2;
  - vocabulary: VOCAB tokens; every *_token_id / *_token_index that no longer fits moves to the top of it,
    distinct ids staying distinct;
  - images: patch size PATCH and image size PATCH x PATCHES_PER_SIDE; image-token counts that the model checks
    (mm_tokens_per_image, image_seq_length) follow; anyres grid pinpoints scale with the image size;
  - M-RoPE: mrope_section rescaled to sum to head_dim / 2.
`write_tiny(cls, folder)` writes config.json there and returns a spec dict for it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
import inspect
import json
import re
from pathlib import Path
from typing import Any

import transformers

WIDTH, HEADS, KV_HEADS, LAYERS = 64, 4, 2, 2
INTERMEDIATE, EXPERT_INTERMEDIATE = 128, 32
EXPERTS, TOP_K = 4, 2
VOCAB = 1024
PATCH, PATCHES_PER_SIDE = 4, 4
MLP_KIND_KEYS = ("mlp_layer_types",)  # per-layer MLP kinds (dense / sparse): every kind keeps a tiny layer
SLIDING_WINDOW = 64  # for configs that name no window but whose model builds sliding-window masks anyway

WIDTH_KEYS = ("hidden_size", "d_model", "embed_dim", "vision_output_dim", "projector_input_dim",
              "projector_output_dim", "projection_dim", "out_hidden_size", "output_dim", "audio_hidden_size")
INTERMEDIATE_KEYS = ("intermediate_size", "encoder_ffn_dim", "decoder_ffn_dim", "intermediate_size_mlp", "ffn_dim")
EXPERT_INTERMEDIATE_KEYS = ("moe_intermediate_size", "shared_expert_intermediate_size")
LAYER_KEYS = ("num_hidden_layers", "depth", "encoder_layers", "decoder_layers", "num_layers")
HEAD_KEYS = ("num_attention_heads", "num_heads", "encoder_attention_heads", "decoder_attention_heads")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk")
MROPE_SECTION = (16, 24, 24)  # Qwen2-VL's (t, h, w) split, used where a config names none
IMAGE_TOKEN_COUNT_KEYS = ("mm_tokens_per_image", "image_seq_length")


def _is_config(value: Any) -> bool:
    return isinstance(value, dict) and "model_type" in value


def _side(value: Any) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value


def _like(old: Any, new: int) -> Any:
    return [new] * len(old) if isinstance(old, (list, tuple)) else new


def _every_kind(kinds: list[Any], new: int) -> list[Any]:
    """The first `new` layers' kinds, the last ones replaced so every kind of the full stack keeps a layer as far as
    `new` allows (Step3p7, DeepSeek-V3.2: three dense layers, then MoE: the first two alone would leave the tiny
    model without experts)."""
    missing = [k for k in dict.fromkeys(kinds) if k not in kinds[:new]]
    keep = max(new - len(missing), 1)
    return (kinds[:keep] + missing)[:new]


def _shrink_layers(node: dict[str, Any], old: int, new: int) -> None:
    """Per-layer lists cut to `new`; layer-index lists mapped onto range(new)."""
    for key, value in list(node.items()):
        if not (isinstance(value, list) and value) or key in ("image_grid_pinpoints",):
            continue
        if key in MLP_KIND_KEYS and len(value) == old:
            node[key] = _every_kind(value, new)
        elif len(value) == old and key in ("layer_types", "no_rope_layers", "mlp_only_layers_mask") or (
                len(value) == old and not all(isinstance(v, int) and 0 <= v < old for v in value)):
            node[key] = value[:new]
        elif all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < old for v in value) and (
                "layer" in key or "index" in key or "indices" in key or "idx" in key):
            if len(value) == old and sorted(value) != list(range(old)):
                node[key] = value[:new]  # a per-layer flag list (0/1)
            else:
                node[key] = sorted({v * new // old for v in value})


def _shrink_mla_heads(node: dict[str, Any], old: dict[str, Any]) -> None:
    """Multi-head latent attention rotates only the rope part of each query/key head (qk_rope_head_dim wide), and
    its rotary embedding is head_dim x partial_rotary_factor wide: the two must stay equal. head_dim keeps the
    relation the defaults have: the rope part itself (DeepSeek-V3), the whole query/key head, nope + rope
    (Mistral4, which rotates the rope part through partial_rotary_factor = rope / head_dim), or neither
    (DeepSeek-V4, whose config derives qk_rope_head_dim = head_dim x partial_rotary_factor); the factor is then
    rope / head_dim wherever the config carries one (a factor kept from the defaults would rotate the wrong width:
    apply_rotary_pos_emb_interleave's cos/sin and q_rot disagree)."""
    rope, nope = node["qk_rope_head_dim"], node.get("qk_nope_head_dim") or 0
    node["qk_head_dim"] = nope + rope
    if isinstance(node.get("head_dim"), int) and old["head_dim"] == old["qk_rope_head_dim"]:
        node["head_dim"] = rope
    elif isinstance(node.get("head_dim"), int) and old["head_dim"] == (old["qk_nope_head_dim"] or 0) + old["qk_rope_head_dim"]:
        node["head_dim"] = nope + rope
    # otherwise (DeepSeek-V4: a 512-wide head, 64 of it rotated) head_dim keeps the generic WIDTH / HEADS
    for holder in (node, node.get("rope_parameters"), node.get("rope_scaling")):
        if isinstance(holder, dict) and isinstance(holder.get("partial_rotary_factor"), (int, float)):
            holder["partial_rotary_factor"] = rope / (node.get("head_dim") or nope + rope)


def _shrink_node(node: dict[str, Any], mrope: bool) -> None:
    old_heads = next((node[k] for k in HEAD_KEYS if isinstance(node.get(k), int)), None)
    old_kv = node.get("num_key_value_heads")
    old_layers = next((node[k] for k in LAYER_KEYS if isinstance(node.get(k), int)), None)
    old_mla = {k: node.get(k) for k in ("head_dim", "qk_rope_head_dim", "qk_nope_head_dim")}
    for key in WIDTH_KEYS:
        if isinstance(node.get(key), int):
            node[key] = WIDTH
    for key in INTERMEDIATE_KEYS:
        if isinstance(node.get(key), int) and node[key] > 0:
            node[key] = INTERMEDIATE
    for key in EXPERT_INTERMEDIATE_KEYS:
        if isinstance(node.get(key), int) and node[key] > 0:
            node[key] = EXPERT_INTERMEDIATE
    for key in HEAD_KEYS:
        if isinstance(node.get(key), int):
            node[key] = HEADS
    if isinstance(old_kv, int):
        node["num_key_value_heads"] = KV_HEADS if old_heads and old_kv < old_heads else HEADS
    if isinstance(node.get("head_dim"), int):
        node["head_dim"] = WIDTH // HEADS
    if old_layers:
        for key in LAYER_KEYS:
            if isinstance(node.get(key), int):
                node[key] = LAYERS
        _shrink_layers(node, old_layers, LAYERS)
    for key in EXPERT_KEYS:
        if isinstance(node.get(key), int) and node[key] > 1:
            node[key] = EXPERTS
    for key in TOP_K_KEYS:
        if isinstance(node.get(key), int):
            node[key] = min(node[key], TOP_K)
    for key, value in (("n_shared_experts", 1), ("first_k_dense_replace", 1), ("n_group", 1), ("topk_group", 1)):
        if isinstance(node.get(key), int) and node[key] > value:
            node[key] = value
    if isinstance(node.get("vocab_size"), int):
        node["vocab_size"] = VOCAB
    for key, value in (("q_lora_rank", 32), ("kv_lora_rank", 16), ("qk_rope_head_dim", 8), ("qk_nope_head_dim", 8),
                       ("v_head_dim", 16), ("downsample_hidden_size", 16), ("output_dim", WIDTH)):
        if isinstance(node.get(key), int) and node[key] > value:
            node[key] = value
    if isinstance(node.get("qk_rope_head_dim"), int):  # MLA: derived dims the defaults carry at the full size
        _shrink_mla_heads(node, old_mla)
    if node.get("pixel_shuffle_ratio"):  # Llama4: the adapter's input is the shuffled width, hidden / ratio**2
        node["intermediate_size"] = int(WIDTH / node["pixel_shuffle_ratio"] ** 2)
    if isinstance(node.get("max_source_positions"), int) and not node.get("n_window"):
        node["max_source_positions"] = 32  # a Whisper-style tower's fixed window: 2 x 32 mel frames
    if isinstance(node.get("decoder_sparse_step"), int):
        node["decoder_sparse_step"] = 1
    for key in ("rope_parameters", "rope_scaling"):
        rope = node.get(key)
        if isinstance(rope, dict) and (rope.get("mrope_section") or (mrope and "vocab_size" in node)):
            # M-RoPE splits the rotary half-dimension over (t, h, w): the sections must sum to it.
            factor = rope.get("partial_rotary_factor") or node.get("partial_rotary_factor") or 1.0
            half = int(node.get("head_dim") or WIDTH // HEADS) * factor // 2
            old = rope.get("mrope_section") or MROPE_SECTION
            scaled = [max(1, int(s * half // sum(old))) for s in old]
            scaled[0] += int(half) - sum(scaled)
            rope["mrope_section"] = scaled


def _shrink_image(node: dict[str, Any]) -> tuple[int, int] | None:
    """Patch and image size of a vision node; returns (old patches per image, new patches per image)."""
    if "patch_size" not in node:
        return None
    old_patch, old_image = _side(node["patch_size"]), _side(node.get("image_size") or 0)
    node["patch_size"] = _like(node["patch_size"], PATCH)
    if "image_size" in node:
        node["image_size"] = _like(node["image_size"], PATCH * PATCHES_PER_SIDE)
    old = (old_image // old_patch) ** 2 if old_image else 0
    return old, PATCHES_PER_SIDE ** 2


def _token_ids(node: Any, found: set[int]) -> set[int]:
    for key, value in node.items():
        if isinstance(value, dict):
            _token_ids(value, found)
        elif str(key).endswith(("token_id", "token_index", "token_ids")) and value is not None:
            found |= {v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)}
    return found


def _remap_token_ids(node: Any, mapping: dict[int, int]) -> None:
    for key, value in node.items():
        if isinstance(value, dict):
            _remap_token_ids(value, mapping)
        elif str(key).endswith(("token_id", "token_index", "token_ids")) and value is not None:
            node[key] = [mapping.get(v, v) for v in value] if isinstance(value, list) else mapping.get(value, value)


def _window_for_sliding_masks(node: dict[str, Any]) -> None:
    """A config with per-layer attention types but no sliding_window, for a model that builds sliding-window masks
    (Step3p7's text model builds one on every forward, used by its layers of type "sliding_attention" only; transformers
    raises without a window): a window the size of the tiny sequences. No layer's attention changes (none slides)."""
    types = node.get("layer_types")
    if isinstance(types, list) and set(types) == {"full_attention"} and "sliding_window" in node \
            and node["sliding_window"] is None:
        node["sliding_window"] = SLIDING_WINDOW


def tiny_dict(config_dict: dict[str, Any], mrope: bool = False, read_token_ids: tuple[str, ...] = (),
              geometry: bool = True, sliding_masks: bool = False) -> dict[str, Any]:
    """The shrunk copy of a config dict (as PretrainedConfig.to_dict() gives it). mrope: the model reads
    rope_parameters.mrope_section (with its own default when the config has none). geometry=False keeps the image
    and patch sizes (and so the tokens an image becomes): only widths, depths, experts and the vocabulary shrink.
    sliding_masks: the model builds sliding-window masks (_window_for_sliding_masks)."""
    raw = json.loads(json.dumps(config_dict))
    patches = None
    stack = [raw]
    while stack:
        node = stack.pop()
        _shrink_node(node, mrope)
        if sliding_masks:
            _window_for_sliding_masks(node)
        patches = (_shrink_image(node) if geometry else None) or patches
        stack.extend(v for v in node.values() if _is_config(v))
    if patches:
        old, new = patches
        for key in IMAGE_TOKEN_COUNT_KEYS:  # a count below the patch count is pooled: keep a 2 x 2 pool
            if isinstance(raw.get(key), int):
                raw[key] = new if old and raw[key] >= old and key != "mm_tokens_per_image" else max(1, new // 4)
        if isinstance(raw.get("image_grid_pinpoints"), list):
            raw["image_grid_pinpoints"] = [[PATCH * PATCHES_PER_SIDE * a, PATCH * PATCHES_PER_SIDE * b]
                                           for a, b in ((1, 1), (1, 2), (2, 1), (2, 2))]
    ids = sorted(i for i in _token_ids(raw, set()) if i >= VOCAB)
    _remap_token_ids(raw, {old: VOCAB - len(ids) + rank for rank, old in enumerate(ids)})
    free = VOCAB - len(ids) - 1
    starts = [n for n in (*read_token_ids, *raw) if n.endswith("_start_token_id")]
    wanted = (*read_token_ids, *(n.replace("_start_", "_end_") for n in starts))  # a block's end with its start
    for name in dict.fromkeys(wanted):  # ids the modeling code reads that the default config lacks
        if raw.get(name) is None:  # absent, or None by default (Voxtral's audio_token_id; checkpoints set it)
            raw[name], free = free, free - 1
    return raw


def config_class(cls: type) -> type:
    """The config class of a model class (or the class itself when it is one)."""
    return cls if issubclass(cls, transformers.PretrainedConfig) else cls.config_class


def tiny_config(cls: type, start: transformers.PretrainedConfig | None = None,
                geometry: bool = True) -> transformers.PretrainedConfig:
    """A tiny instance of `cls`'s config (a config class or a model class), shrunk from `start` (default: the config
    class's defaults); geometry=False keeps its image and patch sizes (tiny_dict)."""
    conf_cls = config_class(cls)
    # the sub-configs' modeling modules too: GLM-4.6V's text model is GLM-4V's, which reads mrope_section
    defaults = conf_cls() if start is None else start
    subs = [type(getattr(defaults, k)) for k in getattr(conf_cls, "sub_configs", {})
            if isinstance(getattr(defaults, k, None), transformers.PretrainedConfig)]
    source = "".join(_modeling_source(c) for c in [conf_cls, *subs])
    read_ids = tuple(sorted(set(re.findall(r"self\.config\.(\w+_token_id)\b", source))))
    return conf_cls.from_dict(tiny_dict(defaults.to_dict(), mrope="mrope_section" in source, read_token_ids=read_ids,
                                        geometry=geometry,
                                        sliding_masks="create_sliding_window_causal_mask(" in source))


def _modeling_source(conf_cls: type) -> str:
    """The source of the model's modeling module (beside the config's), asked what the model reads."""
    name = conf_cls.__module__.replace(".configuration_", ".modeling_")
    try:
        return inspect.getsource(importlib.import_module(name))
    except (ImportError, OSError, TypeError):
        return ""


def write_tiny(cls: type, folder: str | Path, **spec: Any) -> dict[str, Any]:
    """Write the tiny config.json for model class `cls` into `folder`; a spec dict for it (keys of `spec` added)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(cls)
    if not issubclass(cls, transformers.PretrainedConfig):
        config.architectures = [cls.__name__]
    (folder / "config.json").write_text(config.to_json_string(use_diff=False))
    model = {"config": str(folder)}
    if not issubclass(cls, transformers.PretrainedConfig):
        model["class"] = cls.__name__
    return {"name": f"{folder.name}", "model": model, **spec}



# --- the families the supported-models suite covers ------------------------------------------------------------

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class ModelClass:
    kind: str        # image-text | audio-text | any-to-any | moe-lm
    model_type: str  # the config's model_type the class is built from
    name: str        # the transformers model class
    moe: bool        # its language model routes tokens to experts (EP applies)


def _default_config(model_type: str) -> transformers.PretrainedConfig | None:
    try:
        return transformers.CONFIG_MAPPING[model_type]()
    except Exception:  # a config class without usable defaults
        return None


def _routes_to_experts(config: transformers.PretrainedConfig | None) -> bool:
    try:
        text = config.get_text_config()
    except Exception:  # several text configs, or none: not one language model
        return False
    return any(isinstance(getattr(text, k, None), int) and getattr(text, k) > 1 for k in EXPERT_COUNT_KEYS)


AUDIO_INPUTS = ("input_features", "input_values", "audio_values", "input_audio_embeds")


def _multimodal_kind(name: str) -> str:
    """audio-text when the model's forward takes audio (features or waveform), else any-to-any."""
    forward = getattr(getattr(transformers, name, None), "forward", None)
    takes = set(inspect.signature(forward).parameters) if forward else set()
    return "audio-text" if takes & set(AUDIO_INPUTS) else "any-to-any"


def model_classes() -> list[ModelClass]:
    """transformers' own families, from its auto mappings: every image-text-to-text class, every other multimodal LM
    (audio-text-to-text, any-to-any), and every causal LM whose default config routes tokens to experts. A class
    listed under a composite and a text model type (llama4 / llama4_text) is built from the text one."""
    from transformers.models.auto import modeling_auto as auto

    image = dict(auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)
    found: dict[str, ModelClass] = {}
    for model_type, name in image.items():
        found.setdefault(name, ModelClass("image-text", model_type, name,
                                          _routes_to_experts(_default_config(model_type))))
    for model_type, name in auto.MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES.items():
        if model_type not in image:
            config = _default_config(model_type)
            found.setdefault(name, ModelClass(_multimodal_kind(name), model_type, name, _routes_to_experts(config)))
    causal = sorted(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items(), key=lambda kv: not kv[0].endswith("_text"))
    for model_type, name in causal:
        if name not in found and _routes_to_experts(_default_config(model_type)):
            found[name] = ModelClass("moe-lm", model_type, name, True)
    return sorted(found.values(), key=lambda c: (c.kind, c.name))
