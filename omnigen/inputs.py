"""The input recipe: how the generated script makes a synthetic training sample that exercises every modality.

`input_recipe` reads the model config and returns a plain, JSON-serialisable dict. templates/data.py.j2 renders
it into `make_sample` / `collate` / `load_jsonl_sample`; the cost model reads `encoder_tokens_per_item` (what each
tower processes) and `llm_tokens_per_item` (what each item occupies in the LLM sequence). Modalities appear as
top-level keys ("image", "audio") only when the model has them.

Sample layout (the processor's own wrapping, e.g. Qwen's <|vision_start|><|image_pad|>*N<|vision_end|>):
    text  [start] placeholder*N [end]  (one block per modality present)  text
Each modality item is sized to about seq_len/8 LLM tokens where the tower takes variable sizes (patch grids,
Pixtral, audio), so the towers' share of the work stays realistic as seq_len grows, and tiny test runs stay tiny;
fixed-size towers (CLIP/SigLIP crops) take one image of their image_size.

Towers are recognised by family, from the model's forward / get_*_features signatures and config fields, never
by model name: flattened patches + image_grid_thw ("patches"), whole crops pixel_values [N, C, H, W] ("crops",
with image_sizes / pixel_attention_mask / anyres tiles where the signature asks for them), and Whisper-style
mel features (chunked, or in a fixed window padded and masked). How many LLM tokens an item becomes is config
arithmetic; tests/test_towers.py checks it against each real tiny tower.
"""

from __future__ import annotations

import copy
import inspect
import math
import re
import sys
import warnings
from typing import Any

import torch
import transformers

from .attention import token_type_attention
from .errors import SpecError

TEXT_SHARE_PER_ITEM = 8   # each modality item takes ~seq_len / 8 LLM tokens
VIDEO_TEMPORAL_PATCHES = 2  # a synthetic video: two temporal patches (2 x temporal_patch_size frames)
MIN_TEXT_TOKENS = 2       # at least one text token before the modality blocks and one after
MM_TOKEN_TYPE = {"image": 1, "video": 2, "audio": 3}  # transformers' ProcessorMixin.create_mm_token_type_ids

AUDIO_MASK_NAMES = ("feature_attention_mask", "input_features_mask")  # what forwards call the real-frames mask
IMAGE_START_NAMES = ("vision_start_token_id", "image_start_token_id", "boi_token_index", "boi_token_id")
IMAGE_END_NAMES = ("vision_end_token_id", "image_end_token_id", "eoi_token_index", "eoi_token_id")


def _conv_stride2(n: int) -> int:
    """Length after a kernel-3, stride-2, padding-1 convolution."""
    return (n - 1) // 2 + 1


def _pooled(n: int) -> int:
    """Length after a kernel-2, stride-2 average pool."""
    return (n - 2) // 2 + 1


def _meta_tower(class_name: str, sub_config: Any) -> torch.nn.Module | None:
    """The tower that `sub_config` configures, built on the meta device (no memory, milliseconds): the class in the
    model's own modeling module whose config_class is the sub-config's. None when the module holds no such class."""
    module = sys.modules[getattr(transformers, class_name).__module__]
    tower_cls = next((obj for obj in vars(module).values()
                      if isinstance(obj, type) and issubclass(obj, transformers.PreTrainedModel)
                      and obj.config_class is type(sub_config)), None)
    with torch.device("meta"):
        try:
            if tower_cls is not None:
                return tower_cls._from_config(sub_config)
            return transformers.AutoModel.from_config(sub_config)  # a tower from another module (CLIP in LLaVA)
        except Exception:  # noqa: BLE001 - a tower that does not build alone is probed no further
            return None


def _audio_lengths(frames: int, audio_config: Any, tower: torch.nn.Module | None) -> tuple[int, int]:
    """(encoder tokens, LLM tokens) for `frames` mel frames, from the tower's stem as its config and modules say."""
    if getattr(audio_config, "downsample_hidden_size", None) is not None and getattr(audio_config, "n_window", None):
        # Conv2d stem: three stride-2 convs per chunk of 2*n_window frames; transformers hard-codes 13 tokens per
        # full chunk (_get_feat_extract_output_lengths), exact for the released n_window=50. No pooling afterwards.
        chunk = 2 * audio_config.n_window
        rest = frames % chunk
        tokens = (frames // chunk) * 13 + (_conv_stride2(_conv_stride2(_conv_stride2(rest))) if rest else 0)
        return tokens, tokens
    # Whisper-style conv1d stem (stride 1, then stride 2), then a stride-2 average pool when the tower has one.
    encoder_tokens = _conv_stride2(frames)
    pools = tower is not None and isinstance(getattr(tower, "avg_pooler", None), torch.nn.AvgPool1d)
    return encoder_tokens, _pooled(encoder_tokens) if pools else encoder_tokens


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
    candidates = (getattr(text, "pad_token_id", None), getattr(config, "pad_token_id", None),
                  getattr(text, "eos_token_id", None), getattr(config, "eos_token_id", None))
    pad = next((v for v in candidates if isinstance(v, int) and 0 <= v < vocab), 0)
    return {"vocab_size": vocab, "token_low": low, "token_high": high, "pad_token_id": pad}


def _token_id(config: Any, *names: str) -> int | None:
    return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)


def _feature_call(cls: type, modality: str, item_kwargs: list[str]) -> dict[str, Any]:
    """How IdleTowers runs this tower alone: the model's get_<modality>_features with the item's tensors (by the
    names its signature uses), or, where the model has none (Qwen2-Audio), the tower module on the first tensor.
    When the forward applies the projector outside that call (Llama4, Qwen2-Audio), the dummy applies it too:
    its parameters must get gradients on idle ranks exactly as on the others."""
    method = getattr(cls, f"get_{modality}_features", None)
    if method is None:
        call = {"tower_call": "module", "feature_args": item_kwargs[:1]}
    else:
        params = inspect.signature(method).parameters
        named = [p for p in params if p in item_kwargs]
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        # a getter of (*args, **kwargs) (Voxtral) names nothing: it takes the item's tensors by their names
        call = {"tower_call": f"get_{modality}_features", "feature_args": named or (item_kwargs if takes_any else [])}
    return {**call, "projector": _projector_outside(cls, modality)}


def _projector_outside(cls: type, modality: str) -> str | None:
    """The projector the model's forward applies to this tower's output after get_<modality>_features returns
    (asked of the modeling source): None when every get_<modality>_features projects itself."""
    source = inspect.getsource(sys.modules[cls.__module__])
    getters = re.findall(rf"def get_{modality}_features\(.*?(?=\n    (?:@|def )|\nclass )", source, flags=re.S)
    if any(re.search(r"self\.\w*(projector|merger|proj)\w*\(", g) for g in getters):
        return None
    tower_calls = re.findall(rf"self\.(\w*{'audio' if modality == 'audio' else 'vision|visual'}\w*)\(", source)
    projectors = re.findall(r"self\.(\w*projector\w*)\(", source)
    return projectors[0] if projectors and (getters or tower_calls) else None


def _patch_grid_image(config: Any, vision: Any, target_tokens: int) -> dict[str, Any]:
    """Qwen2-VL-style towers (Qwen2/2.5/3-VL, the Omni thinkers, GLM-4V): flattened patches of
    in_channels x temporal_patch_size x patch_size**2 values and a (t, h, w) grid; spatial_merge_size**2 patches
    merge into one LLM token."""
    merge = vision.spatial_merge_size
    side = max(1, math.isqrt(target_tokens))  # merged tokens per side of a square, single-frame image
    grid = [1, side * merge, side * merge]
    patches = math.prod(grid)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    return {
        "layout": "patches",
        "grid_thw": grid,
        "patch_dim": patch_dim,
        "pixel_values_shape": [patches, patch_dim],
        "item_kwargs": ["pixel_values", "image_grid_thw"],
        "concat_dim": 0,
        "encoder_tokens_per_item": patches,            # patches through the vision blocks
        "llm_tokens_per_item": patches // merge ** 2,  # after the patch merger
    }


def _frames_apart(cls: type) -> bool:
    """Whether the model places each temporal patch of a video as its own block of placeholders (its rope index
    splits video_grid_thw into one-frame grids, as Qwen3-VL and GLM-4V do: their processors put a timestamp and the
    start/end wrappers around every frame) rather than one block per video (Qwen2-VL, Qwen2.5-VL). Asked of the
    modeling source, the way the forward will read the grid."""
    source = inspect.getsource(sys.modules[cls.__module__])
    return re.search(r"video_grid_thw\[:, 0\] = 1", source) is not None


def _patch_grid_video(config: Any, vision: Any, target_tokens: int, cls: type) -> dict[str, Any]:
    """A short video for a patch-grid tower: VIDEO_TEMPORAL_PATCHES temporal patches (temporal_patch_size frames
    each) of one square grid, about target_tokens LLM tokens in all; pixel_values_videos / video_grid_thw as the
    processor makes them."""
    frames = VIDEO_TEMPORAL_PATCHES
    item = _patch_grid_image(config, vision, max(1, target_tokens // frames))
    grid = [frames, *item["grid_thw"][1:]]
    patches = math.prod(grid)
    merge = vision.spatial_merge_size
    return {**item, "grid_thw": grid, "pixel_values_shape": [patches, item["patch_dim"]],
            "item_kwargs": ["pixel_values_videos", "video_grid_thw"],
            "blocks": frames if _frames_apart(cls) else 1,  # placeholder blocks per video, each wrapped
            "encoder_tokens_per_item": patches, "llm_tokens_per_item": patches // merge ** 2}


def _video_recipe(config: Any, target_tokens: int, cls: type, class_name: str) -> dict[str, Any]:
    item = _patch_grid_video(config, config.vision_config, target_tokens, cls)
    return {
        "token_id": _token_id(config, "video_token_id", "video_token_index"),
        "start_token_id": _token_id(config, *IMAGE_START_NAMES),
        "end_token_id": _token_id(config, *IMAGE_END_NAMES),
        **item,
        **_feature_call(cls, "video", item["item_kwargs"]),
    }


def _crops_image(config: Any, vision: Any, target_tokens: int, cls: type, class_name: str) -> dict[str, Any]:
    """CLIP-style towers (LLaVA, LLaVA-Next/OneVision, Gemma3's SigLIP, InternVL, Idefics3/SmolVLM, Mistral3's
    Pixtral, Llama4): pixel_values of whole crops [channels, height, width]. The LLM tokens per image follow from
    the tower's patch grid and what the model does after it, all read from config fields and signatures:
    a class token kept or dropped (vision_feature_select_strategy), pixel shuffle / downsampling
    (pixel_shuffle_ratio, downsample_ratio, scale_factor), a patch merger (spatial_merge_size), a pooled fixed count
    (mm_tokens_per_image), a query set per patch count (projector_patch_to_query_dict), and anyres tiling with
    image_newline (image_grid_pinpoints)."""
    patch = _side(vision.patch_size)
    channels = getattr(vision, "num_channels", None) or getattr(vision, "in_channels", 3)
    image_args = set(inspect.signature(getattr(cls, "get_image_features")).parameters)
    forward_args = set(inspect.signature(cls.forward).parameters)
    merge = getattr(config, "spatial_merge_size", None) or 1
    if "image_sizes" in image_args and not getattr(config, "image_grid_pinpoints", None):
        # Variable-size images (Pixtral): a square image sized to the target, at most the tower's image_size.
        per_side = max(1, min(math.isqrt(target_tokens), _side(vision.image_size) // (patch * merge)))
        size = per_side * patch * merge
    else:
        size = _side(vision.image_size)
    # A projector with a learned query set per patch count (Aria) takes only images of those counts: the smallest.
    queries = {int(k): v for k, v in (getattr(config, "projector_patch_to_query_dict", None) or {}).items()}
    if queries:
        size = math.isqrt(min(queries)) * patch
    side = size // patch
    positions = side * side
    if "vision_feature_select_strategy" in image_args:
        tower = _meta_tower(class_name, vision)
        has_class_token = tower is not None and any(
            n.split(".")[-1] in ("class_embedding", "cls_token") for n, _ in tower.named_parameters())
        positions += int(has_class_token)
        if getattr(config, "vision_feature_select_strategy", "default") == "default":
            positions -= 1  # transformers drops the first position (the class token, where there is one)
    encoder_tokens = positions
    tokens = positions // merge ** 2
    for ratio in (getattr(vision, "pixel_shuffle_ratio", None), getattr(config, "downsample_ratio", None)):
        if ratio:
            tokens = round(tokens * ratio ** 2)
    # Idefics3's connector shuffles pixels by config.scale_factor; GraniteDocling's (per tile) by the vision config's
    scale = getattr(config, "scale_factor", None) or getattr(vision, "scale_factor", None)
    if scale and "pixel_attention_mask" in forward_args:
        tokens //= scale ** 2
    if getattr(config, "mm_tokens_per_image", None):
        tokens = config.mm_tokens_per_image  # pooled to a fixed count (Gemma3)
    if queries:
        tokens = queries[min(queries)]
    shape = [1, channels, size, size]
    item = {"layout": "crops", "image_size": [size, size], "concat_dim": 0,
            "item_kwargs": ["pixel_values"], "image_sizes": None, "pixel_attention_mask": False}
    if getattr(config, "image_grid_pinpoints", None):
        # anyres: the base view plus one tile (an image of exactly the base size picks the 1 x 1 grid); the tile's
        # feature rows each end in image_newline.
        if [size, size] not in [list(p) for p in config.image_grid_pinpoints]:
            raise SpecError(f"{class_name}: image_grid_pinpoints holds no {size}x{size} resolution, which "
                            "omnigen's synthetic anyres image uses")
        grid_side = math.isqrt(tokens)
        shape = [1, 2, channels, size, size]
        encoder_tokens *= 2
        tokens = tokens + grid_side * (grid_side + 1)
    if "image_sizes" in image_args or ("image_sizes" in forward_args and getattr(config, "image_grid_pinpoints", None)):
        item["image_sizes"] = [size, size]
        item["item_kwargs"].append("image_sizes")
    if "pixel_attention_mask" in image_args:
        # pixel_values [batch, images, channels, h, w]: a batch's images go side by side in one row (dim 1).
        shape = [1, 1, channels, size, size]
        item.update(pixel_attention_mask=_pixel_mask_kind(cls, config, class_name, shape), concat_dim=1)
        item["item_kwargs"].append("pixel_attention_mask")
    item.update(pixel_values_shape=shape, encoder_tokens_per_item=encoder_tokens, llm_tokens_per_item=tokens)
    return item


# The narrow CPU run attends over all of an image's patches at once (eager attention: patches^2 scores per head);
# above this many patches it is skipped and the derived count stands.
NARROW_RUN_MAX_PATCHES = 8192

PIXEL_MASK_SHAPES = {"per_pixel": lambda shape: shape[:2] + shape[3:],  # [batch, images, h, w]: padded pixels
                     "per_tile": lambda shape: shape[:2]}                # [batch, tiles]: padding tiles


def _pixel_mask_kind(cls: type, config: Any, class_name: str, pixel_shape: list[int]) -> str:
    """Which pixel_attention_mask the model's get_image_features takes beside pixel_values [batch, images, channels,
    h, w]: one flag per pixel (Idefics3, SmolVLM: padded pixels of each image) or one per tile (GraniteDocling: its
    padding tiles), asked of the model. Both index pixel_values with the mask (`pixel_values[mask]`, a nonzero
    whose shape depends on the mask's values), so the meta run is told to assume every element true, which the
    synthetic all-true mask is; the shape the model indexes or views wrongly raises an IndexError / RuntimeError
    about shapes, the right one runs on (or stops at a later call that needs values, e.g. .tolist())."""
    import torch.fx.experimental._config as meta_config
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls._from_config(copy.deepcopy(config))
    except Exception:  # noqa: BLE001 - a model that does not build on meta: the compile's own build says why
        return "per_pixel"
    rejected = {}
    for kind, mask_shape in PIXEL_MASK_SHAPES.items():
        kwargs = {"pixel_values": torch.empty(pixel_shape, device="meta"),
                  "pixel_attention_mask": torch.ones(mask_shape(pixel_shape), dtype=torch.bool, device="meta")}
        try:
            with meta_config.patch(meta_nonzero_assume_all_nonzero=True), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model.get_image_features(**kwargs)
            return kind
        except Exception as e:  # noqa: BLE001 - the model's own code, any error
            if isinstance(e, NotImplementedError) or "meta" in str(e):  # past the mask: needs values from here on
                return kind
            rejected[kind] = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
    raise SpecError(f"{class_name}: its get_image_features takes neither pixel_attention_mask omnigen makes for "
                    f"pixel_values {pixel_shape}: " + "; ".join(f"{k} {v}" for k, v in rejected.items()))


def _meta_features(cls: type, config: Any, modality: str, kwargs: dict[str, Any]) -> int | None:
    """How many LLM tokens the model's own get_<modality>_features makes of these inputs, run on the meta device
    (shapes only: no memory, about a second for a 4B model). None where it cannot say: no such method, or shapes
    that depend on values (tiling by image size, masks), which meta tensors have none of."""
    method = getattr(cls, f"get_{modality}_features", None)
    if method is None:
        return None
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls._from_config(copy.deepcopy(config))  # _from_config writes into the config it is given
            features = getattr(model, f"get_{modality}_features")(**kwargs)
    except Exception as e:  # noqa: BLE001 - the model's own code, any error
        if isinstance(e, NotImplementedError) or "meta" in str(e):  # shapes that need values: the derived count stands
            return None
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in kwargs.items())
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise SpecError(f"{cls.__name__}: its get_{modality}_features rejects the {modality} omnigen makes from the "
                        f"config ({shapes}): {type(e).__name__}: {first}") from None
    return _rows(features)


def _rows(features: Any) -> int | None:
    """The LLM tokens a get_<modality>_features result holds: rows of its pooled tensor(s)."""
    features = getattr(features, "pooler_output", features)
    if not isinstance(features, (list, tuple)):
        features = [features]
    return sum(math.prod(f.shape[:-1]) for f in features) if all(torch.is_tensor(f) for f in features) else None


def _narrow_features(cls: type, config: Any, modality: str, kwargs: dict[str, Any]) -> int | None:
    """What the meta run cannot say, asked of a real run: the model rebuilt on the CPU from a narrow copy of the
    config (omnigen.zoo: widths, depths and vocabulary shrunk, image and patch sizes kept, so an image becomes as
    many tokens as in the full model), its get_<modality>_features run once on the item's inputs. For towers whose forward reads values the meta device has none of (Step3p7's tower builds
    its rotary grid with .tolist(), then halves the grid twice with strided convolutions, which no config field
    says). kwargs: real CPU tensors. None where the narrow copy does not build or run: the derived count stands."""
    from . import zoo
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            narrow = zoo.tiny_config(cls, start=copy.deepcopy(config), geometry=False)
            model = cls._from_config(narrow).eval()
            with torch.no_grad():
                return _rows(getattr(model, f"get_{modality}_features")(**kwargs))
    except Exception:  # noqa: BLE001 - the model's own code on a shrunk config, any error
        return None


def _measured_audio_tokens(cls: type, config: Any, mel_bins: int, window: int, frames: int,
                           mask: str | None) -> int | None:
    """The audio tower's LLM tokens for a clip of `frames` real frames in a `window`-frame input, asked of the model
    (Voxtral's projector stacks frames, which no config field says)."""
    kwargs = {"input_features": torch.empty(1, mel_bins, window, device="meta")}
    if mask:
        kwargs[mask] = torch.ones(1, window, dtype=torch.long, device="meta")
    return _meta_features(cls, config, "audio", kwargs) if window == frames else None


def _image_kwargs(item: dict[str, Any], device: str) -> dict[str, torch.Tensor]:
    """The synthetic image's get_image_features inputs as data.py.j2 makes them (random pixels, true masks)."""
    shape = item["pixel_values_shape"]
    kwargs = {"pixel_values": torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)}
    if item["image_sizes"]:
        kwargs["image_sizes"] = torch.tensor([item["image_sizes"]], device=device)
    if item["pixel_attention_mask"]:
        mask_shape = PIXEL_MASK_SHAPES[item["pixel_attention_mask"]](shape)
        kwargs["pixel_attention_mask"] = torch.ones(mask_shape, dtype=torch.bool, device=device)
    return kwargs


def _measured_image_tokens(cls: type, config: Any, item: dict[str, Any]) -> int | None:
    """The LLM tokens of the synthetic image, asked of the model: it settles what the config fields leave open (Aya
    Vision's and Cohere2-Vision's pixel shuffle by downsample_factor, Step3p7's convolutional downsampler)."""
    measured = _meta_features(cls, config, "image", _image_kwargs(item, "meta"))
    if measured is None and item["encoder_tokens_per_item"] <= NARROW_RUN_MAX_PATCHES:
        measured = _narrow_features(cls, config, "image", _image_kwargs(item, "cpu"))
    return measured


def _side(value: Any) -> int:
    return value[0] if isinstance(value, (list, tuple)) else value


def _image_recipe(config: Any, target_tokens: int, cls: type, class_name: str) -> dict[str, Any]:
    vision = config.vision_config
    forward_args = set(inspect.signature(cls.forward).parameters)
    if "image_grid_thw" in forward_args and getattr(vision, "spatial_merge_size", None):
        item = _patch_grid_image(config, vision, target_tokens)
    elif getattr(cls, "get_image_features", None) is not None and getattr(vision, "patch_size", None):
        item = _crops_image(config, vision, target_tokens, cls, class_name)
        item["llm_tokens_per_item"] = _measured_image_tokens(cls, config, item) or item["llm_tokens_per_item"]
    else:
        raise SpecError(f"omnigen has no input recipe for vision tower {vision.model_type!r} of {class_name}: "
                        "it takes neither flattened patches with image_grid_thw nor whole crops through "
                        "get_image_features")
    return {
        "token_id": _token_id(config, "image_token_id", "image_token_index"),
        "start_token_id": _token_id(config, *IMAGE_START_NAMES),
        "end_token_id": _token_id(config, *IMAGE_END_NAMES),
        **item,
        **_feature_call(cls, "image", item["item_kwargs"]),
    }


def _audio_recipe(config: Any, target_tokens: int, cls: type, class_name: str) -> dict[str, Any]:
    audio = config.audio_config
    tower = _meta_tower(class_name, audio)
    chunked = getattr(audio, "n_window", None) is not None
    forward_args = set(inspect.signature(cls.forward).parameters)
    mask = next((name for name in AUDIO_MASK_NAMES if name in forward_args), None)
    # Whisper-style towers without chunking take a fixed window of 2 x max_source_positions frames (Qwen2-Audio
    # checks it): the clip is padded to it and the mask marks the real frames. A clip is at most that window long,
    # and exactly that long for a model that takes no mask (Voxtral).
    fixed = not chunked and getattr(audio, "max_source_positions", None)
    window = 2 * audio.max_source_positions if fixed else None
    frames = window if fixed and mask is None else 1
    while _audio_lengths(frames, audio, tower)[1] < target_tokens and frames != window:  # fewest frames for the target
        frames += 1
    encoder_tokens, llm_tokens = _audio_lengths(frames, audio, tower)
    window = window or frames
    item_kwargs = ["input_features"] + ([mask] if mask else [])
    measured = _measured_audio_tokens(cls, config, audio.num_mel_bins, window, frames, mask)
    if measured is None and mask not in (None, "feature_attention_mask"):
        # GLM-ASR, Qwen3-ASR, MOSS: their towers pool and chunk by the mask's values, which a meta run cannot see;
        # the Whisper-stem count below is checked only for the feature_attention_mask towers (Qwen2-Audio, Omni)
        raise SpecError(f"{class_name}: omnigen cannot tell how many LLM tokens its audio tower makes of a clip: "
                        f"the count depends on the values of {mask}, which compile-time shape inference cannot see")
    return {
        "token_id": _token_id(config, "audio_token_id", "audio_token_index"),
        "start_token_id": _token_id(config, "audio_start_token_id", "audio_bos_token_id"),
        "end_token_id": _token_id(config, "audio_end_token_id", "audio_eos_token_id"),
        "num_mel_bins": audio.num_mel_bins,
        "num_frames": frames,
        "window_frames": window,
        "input_features_shape": [audio.num_mel_bins, window],
        "item_kwargs": item_kwargs,
        "concat_dim": 0,
        "encoder_tokens_per_item": _conv_stride2(window) if window != frames else encoder_tokens,
        "llm_tokens_per_item": measured or llm_tokens,
        "feature_mask": mask,
        **_feature_call(cls, "audio", item_kwargs),
    }


def _read_tower(recipe: Any, tower: str, config: Any, target: int, cls: type, class_name: str) -> dict[str, Any]:
    """A tower's recipe, or a refusal naming the config field a family's recipe reads and this tower lacks."""
    try:
        return recipe(config, target, cls, class_name)
    except AttributeError as e:
        sub = type(getattr(config, f"{tower}_config")).__name__
        missing = getattr(e, "name", None) or str(e)
        raise SpecError(f"{class_name}: no input recipe for its {tower} tower: {sub} has no '{missing}', which the "
                        f"recipe for towers taking {'these inputs' if tower == 'audio' else 'pixel_values'} "
                        "reads") from None


def _video_refusal(found: dict[str, Any], forward_args: set[str], cls: type) -> str:
    """Why omnigen cannot make this model's videos ("" when it can): videos go through the patch-grid vision tower
    (the one images use) as pixel_values_videos + video_grid_thw, filling video_token_id placeholders."""
    if not ("image" in found and found["image"]["layout"] == "patches" and getattr(cls, "get_video_features", None)
            is not None and {"pixel_values_videos", "video_grid_thw"} <= forward_args):
        return ("takes no video omnigen can make (videos are made for vision towers of flattened patches that take "
                "pixel_values_videos and video_grid_thw)")
    if "use_audio_in_video" in forward_args:
        return "interleaves video with its audio track by timestamps (use_audio_in_video), which omnigen does not make"
    source = inspect.getsource(sys.modules[cls.__module__])
    if re.search(r"special_video_mask = input_ids == self\.config\.image_token_id", source):
        return "places video frames in image placeholders (frame by frame, with timestamps), which omnigen does not make"
    return ""


def _modalities(config: Any, cls: type, class_name: str, seq_len: int,
                video: bool = False) -> dict[str, dict[str, Any]]:
    forward_args = set(inspect.signature(cls.forward).parameters)
    target = max(1, seq_len // TEXT_SHARE_PER_ITEM)
    found = {}
    if getattr(config, "vision_config", None) is not None and "pixel_values" in forward_args:
        found["image"] = _read_tower(_image_recipe, "vision", config, target, cls, class_name)
    if video:
        refused = _video_refusal(found, forward_args, cls)
        if refused:
            raise SpecError(f"train.synthetic.video_every: {class_name} {refused}; use video_every: 0")
        found["video"] = _read_tower(_video_recipe, "vision", config, target, cls, class_name)
    if getattr(config, "audio_config", None) is not None and "input_features" in forward_args:
        found["audio"] = _read_tower(_audio_recipe, "audio", config, target, cls, class_name)
    for name, item in found.items():
        if item["token_id"] is None:
            raise SpecError(f"the model config has a tower for {name} but no {name} placeholder token id")
        item["wrapper_tokens"] = sum(item[k] is not None for k in ("start_token_id", "end_token_id")) * item.get("blocks", 1)
        if "mm_token_type_ids" in forward_args:
            item["token_type_id"] = MM_TOKEN_TYPE[name]
    return found


def _model_kwargs(modalities: dict[str, Any], forward_args: set[str]) -> list[str]:
    """The forward kwargs collate emits for a batch in which every modality is present."""
    kwargs = {"input_ids", "attention_mask"}
    for item in modalities.values():
        kwargs |= set(item["item_kwargs"])
    if modalities and "mm_token_type_ids" in forward_args:  # M-RoPE needs it to find the image tokens
        kwargs.add("mm_token_type_ids")
    return sorted(kwargs)


def _token_types(cls: type, config: Any, class_name: str, forward_args: set[str],
                 modalities: dict[str, Any]) -> dict[str, Any] | None:
    """What the samples' token_type_ids mark, where the forward takes them and they change its attention (asked of
    the model: omnigen.attention.token_type_attention). Without them transformers runs those tokens causally: another
    attention than the model's, so they are always passed."""
    if "token_type_ids" not in forward_args:
        return None
    try:
        found = token_type_attention(cls, config)
    except ValueError as e:
        raise SpecError(f"{class_name}: {e}") from None
    if found and "image" not in modalities:
        raise SpecError(f"{class_name}: token_type_ids select a bidirectional {found['attention']} around images, "
                        "but omnigen found no image input recipe for it")
    return found


def _check_packable(cls: type, class_name: str, forward_args: set[str], token_types: dict | None) -> None:
    """Packed rows hand a multimodal model positions that restart in each document and let omnigen's attention keep
    documents apart: models whose forward takes 1-D position_ids. A model that derives multi-axis rotary positions
    from the whole row (get_rope_index: M-RoPE) or builds its own masks from token_type_ids would mix documents."""
    module = sys.modules[cls.__module__]
    why = ("computes multi-axis rotary positions (M-RoPE, get_rope_index) over the whole row, across documents"
           if any(isinstance(c, type) and "get_rope_index" in vars(c) for c in vars(module).values())
           else "builds its own attention masks from token_type_ids" if token_types
           else "takes no position_ids, so positions cannot restart in each document"
           if "position_ids" not in forward_args else "")
    if why:
        raise SpecError(f"train.packing: {class_name} {why}; packed rows with images or audio need 1-D positions "
                        "the script can restart (use packing: false)")


def _sorted(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _sorted(value[k]) for k in sorted(value)}
    return [_sorted(v) for v in value] if isinstance(value, (list, tuple)) else value


def input_recipe(config: transformers.PretrainedConfig, class_name: str, seq_len: int,
                 documents_per_sample: int = 1, every: dict[str, int] | None = None,
                 packing: bool = False) -> dict[str, Any]:
    """How the generated script builds a sample for `class_name`: token ranges, per-modality shapes, kwargs.

    documents_per_sample > 1 packs several documents into each row (text-only models): position ids restart
    per document and attention stays inside it. packing (train.packing) packs whole samples of real data into
    rows the same way."""
    cls = getattr(transformers, class_name)
    forward_args = set(inspect.signature(cls.forward).parameters)
    video_every = (every or {}).get("video", 0)  # videos only where asked for (train.synthetic.video_every)
    modalities = _modalities(config, cls, class_name, seq_len, video=video_every > 0)
    for name, item in modalities.items():
        item["every"] = (every or {}).get(name, 1)  # sample i carries this modality iff i % every == 0
    if documents_per_sample > 1 and modalities:
        raise SpecError(f"train.pack_documents={documents_per_sample}: packing is supported for text-only models; "
                        f"{class_name} takes {', '.join(modalities)} inputs (use pack_documents: 1)")
    if documents_per_sample > 1 and seq_len < 2 * documents_per_sample:
        raise SpecError(f"train.pack_documents={documents_per_sample} needs seq_len >= {2 * documents_per_sample}")
    token_types = _token_types(cls, config, class_name, forward_args, modalities)
    if packing and modalities:
        _check_packable(cls, class_name, forward_args, token_types)
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
        # Models with 1-D rotary positions get them explicitly (multimodal M-RoPE models compute their own); packed
        # rows always do: they restart in each document.
        "position_ids": not modalities or packing,
        "text": _text_range(config),
        **modalities,
        **({"token_types": token_types} if token_types else {}),
        "model_kwargs": sorted(_model_kwargs(modalities, forward_args)
                               + (["token_type_ids"] if token_types else [])
                               + (["position_ids"] if not modalities or packing else [])
                               + (["document_ids"] if documents_per_sample > 1 or packing else [])),
        "ignored_label_token_ids": sorted(i for i in ignored if i is not None),
    })


# --- models composed from parts (omnigen/compose.py) ----------------------------------------------------------

def _check_tokens_per_item(encoder: Any, tokens: int, item: str, source: str) -> None:
    if encoder.part.tokens_per_item not in (None, tokens):
        raise SpecError(f"{source}: key 'model.parts.encoders' ({encoder.part.modality}): tokens_per_item="
                        f"{encoder.part.tokens_per_item}, but {encoder.model_class.rpartition('.')[2]} puts out "
                        f"{tokens} positions per {item} (the projector places each as one token)")


def _whole_crop_part(encoder: Any, model: torch.nn.Module, source: str) -> dict[str, Any]:
    """SigLIP / CLIP vision encoders: pixel_values of whole crops [images, channels, image_size, image_size]; every
    output position of the encoder becomes one LLM token (the projector keeps the sequence length)."""
    from .compose import encoder_tokens
    size = _side(encoder.config.image_size)
    shape = [1, getattr(encoder.config, "num_channels", 3), size, size]
    tokens = encoder_tokens(model, encoder, shape)
    _check_tokens_per_item(encoder, tokens, f"{size}x{size} image", source)
    return {"layout": "crops", "image_size": [size, size], "pixel_values_shape": shape, "concat_dim": 0,
            "item_kwargs": ["pixel_values"], "image_sizes": None, "pixel_attention_mask": False,
            "encoder_tokens_per_item": tokens, "llm_tokens_per_item": tokens}


def _whisper_window_part(encoder: Any, model: torch.nn.Module, source: str) -> dict[str, Any]:
    """Whisper encoders: input_features of a fixed window, 2 x max_source_positions log-mel frames per clip
    [clips, num_mel_bins, frames] (WhisperEncoder refuses any other length), every frame real; its conv stem halves
    the frames and every output position becomes one LLM token."""
    from .compose import encoder_tokens
    config = encoder.config
    window = 2 * config.max_source_positions
    shape = [1, config.num_mel_bins, window]
    tokens = encoder_tokens(model, encoder, shape)
    _check_tokens_per_item(encoder, tokens, f"clip of {window} frames", source)
    return {"num_mel_bins": config.num_mel_bins, "num_frames": window, "window_frames": window,
            "input_features_shape": shape, "item_kwargs": ["input_features"], "feature_mask": None, "concat_dim": 0,
            "encoder_tokens_per_item": tokens, "llm_tokens_per_item": tokens}


# Input families of encoder parts, keyed by the encoder config's model_type.
PART_FAMILIES = {"siglip_vision_model": _whole_crop_part, "clip_vision_model": _whole_crop_part,
                 "whisper": _whisper_window_part}


def _codebook_output(decoder: Any, every: int) -> dict[str, Any]:
    """A generated item of a codebook decoder (an image, a clip): tokens_per_item placeholder positions that end the
    sample, whose inputs are codebook embeddings of random codes (batch key <modality>, [positions, codebooks]) and
    whose next-token targets are those codes (batch key <modality>_labels), predicted by the decoder's head."""
    return {"token_id": decoder.placeholder_token_id, "positions": decoder.tokens_per_item,
            "codebooks": decoder.codebooks, "codebook_size": decoder.codebook_size, "every": every}


def composite_recipe(parts: Any, model: torch.nn.Module, seq_len: int, documents_per_sample: int = 1,
                     every: dict[str, int] | None = None, source: str = "<spec>", packing: bool = False) -> dict[str, Any]:
    """input_recipe for a model composed from parts: the same dict (data.py.j2 renders it unchanged), each modality
    from its encoder's family, placeholders bare (no start/end wrappers: the parts come with no processor). Packed
    rows (packing) pass the foundation 1-D positions that restart per document, and the documents."""
    from .compose import COMPOSITE_CLASS
    if documents_per_sample > 1:
        raise SpecError(f"train.pack_documents={documents_per_sample}: packing is supported for text-only models; "
                        "a model composed from parts takes image inputs (use pack_documents: 1)")
    modalities = {}
    for encoder in parts.encoders:
        item = PART_FAMILIES[encoder.config.model_type](encoder, model, source)
        modalities[encoder.part.modality] = {**item, "token_id": encoder.part.placeholder_token_id,
                                             "start_token_id": None, "end_token_id": None, "wrapper_tokens": 0,
                                             "every": (every or {}).get(encoder.part.modality, 1)}
    outputs = {d.modality: _codebook_output(d, (every or {}).get(d.modality, 1)) for d in parts.codebook_decoders}
    min_seq_len = (sum(m["llm_tokens_per_item"] for m in modalities.values())
                   + sum(o["positions"] for o in outputs.values()) + MIN_TEXT_TOKENS)
    if seq_len < min_seq_len:
        raise SpecError(f"train.seq_len={seq_len} is too short for the composed model: a sample needs {min_seq_len} "
                        f"tokens; use seq_len >= {min_seq_len}")
    text = _text_range(parts.foundation_config)
    placeholders = sorted(m["token_id"] for m in [*modalities.values(), *outputs.values()])
    # Text tokens stay below every placeholder (they sit at the top of the vocabulary in the example specs).
    low_ones = [p for p in placeholders if p < text["vocab_size"] // 2]
    if low_ones:
        raise SpecError(f"placeholder_token_id {low_ones[0]} is in the lower half of the foundation's vocabulary; "
                        "omnigen's synthetic text draws from below the placeholders: use ids near the top")
    text["token_high"] = min([text["token_high"], *placeholders])
    kwargs = {"input_ids", "attention_mask"} | {k for m in modalities.values() for k in m["item_kwargs"]} | set(outputs)
    kwargs |= {"position_ids", "document_ids"} if packing else set()
    return _sorted({
        "class_name": COMPOSITE_CLASS, "seq_len": seq_len, "min_seq_len": min_seq_len,
        "documents_per_sample": 1, "position_ids": packing, "text": text, **modalities,
        "model_kwargs": sorted(kwargs), "ignored_label_token_ids": placeholders, "outputs": outputs,
    })
