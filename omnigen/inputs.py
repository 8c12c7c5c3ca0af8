"""The input recipe: how the generated script makes a synthetic training sample that exercises every modality.

`input_recipe` reads the model config and returns a plain, JSON-serialisable dict. templates/data.py.j2 renders
it into `make_sample` / `collate` / `load_jsonl_sample`; the cost model reads `encoder_tokens_per_item` (what each
tower processes) and `llm_tokens_per_item` (what each item occupies in the LLM sequence). Modalities appear as
top-level keys ("image", "audio") only when the model has them.

Sample layout (the processor's own wrapping, e.g. Qwen's <|vision_start|><|image_pad|>*N<|vision_end|>):
    text  [start] placeholder*N [end]  (one block per modality present)  text
Each modality item is sized to about seq_len/8 LLM tokens, so the towers' share of the work stays realistic as
seq_len grows, and tiny test runs stay tiny.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import transformers

from .errors import SpecError

TEXT_SHARE_PER_ITEM = 8   # each modality item takes ~seq_len / 8 LLM tokens
MIN_TEXT_TOKENS = 2       # at least one text token before the modality blocks and one after
MM_TOKEN_TYPE = {"image": 1, "video": 2, "audio": 3}  # transformers' ProcessorMixin.create_mm_token_type_ids

# Vision towers that take flattened patches + a (t, h, w) grid and merge spatial_merge_size**2 patches per token.
PATCH_VISION_TOWERS = ("qwen2_vl_vision", "qwen2_5_omni_vision_encoder", "qwen3_omni_moe_vision_encoder")


def _conv_stride2(n: int) -> int:
    """Length after a kernel-3, stride-2, padding-1 convolution."""
    return (n - 1) // 2 + 1


def _qwen2_5_omni_audio_lengths(frames: int, audio_config: Any) -> tuple[int, int]:
    # One stride-2 conv before the encoder layers, then a stride-2 average pool before the projection
    # (Qwen2_5OmniAudioEncoder._get_feat_extract_output_lengths).
    encoder_tokens = _conv_stride2(frames)
    return encoder_tokens, (encoder_tokens - 2) // 2 + 1


def _qwen3_omni_audio_lengths(frames: int, audio_config: Any) -> tuple[int, int]:
    # Three stride-2 convs per chunk of 2*n_window frames; transformers hard-codes 13 tokens per full chunk
    # (_get_feat_extract_output_lengths), which is exact for the released n_window=50. No pooling afterwards.
    chunk = 2 * audio_config.n_window
    rest = frames % chunk
    tokens = (frames // chunk) * 13 + (_conv_stride2(_conv_stride2(_conv_stride2(rest))) if rest else 0)
    return tokens, tokens


AUDIO_TOWERS: dict[str, Callable[[int, Any], tuple[int, int]]] = {
    "qwen2_5_omni_audio_encoder": _qwen2_5_omni_audio_lengths,
    "qwen3_omni_moe_audio_encoder": _qwen3_omni_audio_lengths,
}


def _special_token_ids(node: Any) -> set[int]:
    """Every *_token_id / *_token_index value anywhere in the config (bos, eos, pad, placeholders, wrappers)."""
    found: set[int] = set()
    for key, value in node.items():
        if isinstance(value, dict):
            found |= _special_token_ids(value)
        elif str(key).endswith(("token_id", "token_index", "token_ids")) and value is not None:
            found |= {v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)}
    return found


def _text_range(config: transformers.PretrainedConfig) -> dict[str, int]:
    """Random text tokens come from [low, high): above the low specials (bos/eos/pad near 0) and below the high
    ones (placeholders and wrappers at the end of the vocabulary), so they never collide with a special id."""
    vocab = config.get_text_config().vocab_size
    specials = {i for i in _special_token_ids(config.to_dict()) if 0 <= i < vocab}
    low = max((i + 1 for i in specials if i < vocab // 2), default=0)
    high = min((i for i in specials if i >= vocab // 2), default=vocab)
    if low >= high:
        raise SpecError(f"no token range free of special ids in a vocabulary of {vocab}: specials {sorted(specials)}")
    text = config.get_text_config()
    pad = next((v for v in (text.pad_token_id, getattr(config, "pad_token_id", None), text.eos_token_id)
                if isinstance(v, int)), 0)
    return {"vocab_size": vocab, "token_low": low, "token_high": high, "pad_token_id": pad}


def _token_id(config: Any, *names: str) -> int | None:
    return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)


def _image_recipe(config: Any, target_tokens: int) -> dict[str, Any]:
    vision = config.vision_config
    if vision.model_type not in PATCH_VISION_TOWERS:
        raise SpecError(f"omnigen has no input recipe for vision tower {vision.model_type!r}; "
                        f"supported: {', '.join(PATCH_VISION_TOWERS)}")
    merge = vision.spatial_merge_size
    side = max(1, math.isqrt(target_tokens))  # merged tokens per side of a square, single-frame image
    grid = [1, side * merge, side * merge]
    patches = math.prod(grid)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    return {
        "token_id": _token_id(config, "image_token_id", "image_token_index"),
        "start_token_id": _token_id(config, "vision_start_token_id"),
        "end_token_id": _token_id(config, "vision_end_token_id"),
        "grid_thw": grid,
        "patch_dim": patch_dim,
        "pixel_values_shape": [patches, patch_dim],
        "encoder_tokens_per_item": patches,            # patches through the vision blocks
        "llm_tokens_per_item": patches // merge ** 2,  # after the patch merger
    }


def _audio_recipe(config: Any, target_tokens: int) -> dict[str, Any]:
    audio = config.audio_config
    lengths = AUDIO_TOWERS.get(audio.model_type)
    if lengths is None:
        raise SpecError(f"omnigen has no input recipe for audio tower {audio.model_type!r}; "
                        f"supported: {', '.join(AUDIO_TOWERS)}")
    frames = 1
    while lengths(frames, audio)[1] < target_tokens:  # fewest mel frames giving the target LLM tokens
        frames += 1
    encoder_tokens, llm_tokens = lengths(frames, audio)
    return {
        "token_id": _token_id(config, "audio_token_id", "audio_token_index"),
        "start_token_id": _token_id(config, "audio_start_token_id"),
        "end_token_id": _token_id(config, "audio_end_token_id"),
        "num_mel_bins": audio.num_mel_bins,
        "num_frames": frames,
        "input_features_shape": [audio.num_mel_bins, frames],
        "encoder_tokens_per_item": encoder_tokens,  # frames after the conv stem, through the encoder layers
        "llm_tokens_per_item": llm_tokens,
    }


def _modalities(config: Any, forward_args: set[str], seq_len: int) -> dict[str, dict[str, Any]]:
    target = max(1, seq_len // TEXT_SHARE_PER_ITEM)
    found = {}
    if getattr(config, "vision_config", None) is not None and "pixel_values" in forward_args:
        found["image"] = _image_recipe(config, target)
    if getattr(config, "audio_config", None) is not None and "input_features" in forward_args:
        if "feature_attention_mask" not in forward_args:
            raise SpecError("omnigen's audio recipe passes feature_attention_mask, which this model does not take")
        found["audio"] = _audio_recipe(config, target)
    for name, item in found.items():
        if item["token_id"] is None:
            raise SpecError(f"the model config has a {name} tower but no {name} placeholder token id")
        item["wrapper_tokens"] = sum(item[k] is not None for k in ("start_token_id", "end_token_id"))
        if "mm_token_type_ids" in forward_args:
            item["token_type_id"] = MM_TOKEN_TYPE[name]
    return found


def _model_kwargs(modalities: dict[str, Any], forward_args: set[str]) -> list[str]:
    """The forward kwargs collate emits for a batch in which every modality is present."""
    kwargs = {"input_ids", "attention_mask"}
    if "image" in modalities:
        kwargs |= {"pixel_values", "image_grid_thw"}
    if "audio" in modalities:
        kwargs |= {"input_features", "feature_attention_mask"}
    if modalities and "mm_token_type_ids" in forward_args:  # M-RoPE needs it to find the image tokens
        kwargs.add("mm_token_type_ids")
    return sorted(kwargs)


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return [_sorted(v) for v in value] if isinstance(value, (list, tuple)) else value


def input_recipe(config: transformers.PretrainedConfig, class_name: str, seq_len: int,
                 documents_per_sample: int = 1, every: dict[str, int] | None = None) -> dict[str, Any]:
    """How the generated script builds a sample for `class_name`: token ranges, per-modality shapes, kwargs.

    documents_per_sample > 1 packs several documents into each row (text-only models): position ids restart
    per document and attention stays inside it."""
    cls = getattr(transformers, class_name)
    forward_args = set(inspect.signature(cls.forward).parameters)
    modalities = _modalities(config, forward_args, seq_len)
    for name, item in modalities.items():
        item["every"] = (every or {}).get(name, 1)  # sample i carries this modality iff i % every == 0
    if documents_per_sample > 1 and modalities:
        raise SpecError(f"train.pack_documents={documents_per_sample}: packing is supported for text-only models; "
                        f"{class_name} takes {', '.join(modalities)} inputs (use pack_documents: 1)")
    if documents_per_sample > 1 and seq_len < 2 * documents_per_sample:
        raise SpecError(f"train.pack_documents={documents_per_sample} needs seq_len >= {2 * documents_per_sample}")
    mm_tokens = sum(m["llm_tokens_per_item"] + m["wrapper_tokens"] for m in modalities.values())
    min_seq_len = mm_tokens + MIN_TEXT_TOKENS
    if seq_len < min_seq_len:
        parts = ", ".join(f"{n} {m['llm_tokens_per_item'] + m['wrapper_tokens']}" for n, m in modalities.items())
        raise SpecError(f"train.seq_len={seq_len} is too short for {class_name}: a sample needs {min_seq_len} "
                        f"tokens ({parts}, text {MIN_TEXT_TOKENS}); use seq_len >= {min_seq_len}")
    ignored = {m[k] for m in modalities.values() for k in ("token_id", "start_token_id", "end_token_id")}
    return _sorted({
        "class_name": class_name,
        "seq_len": seq_len,
        "min_seq_len": min_seq_len,
        "documents_per_sample": documents_per_sample,
        # Models with 1-D rotary positions get them explicitly (multimodal M-RoPE models compute their own).
        "position_ids": not modalities,
        "text": _text_range(config),
        **modalities,
        "model_kwargs": sorted(_model_kwargs(modalities, forward_args)
                               + (["position_ids"] if not modalities else [])
                               + (["document_ids"] if documents_per_sample > 1 else [])),
        "ignored_label_token_ids": sorted(i for i in ignored if i is not None),
    })
