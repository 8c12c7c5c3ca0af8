"""A model composed from parts (spec `model.parts`): encoders -> projectors -> foundation -> decoders.

OmniModel below is the Python twin of the class templates/sections/composite_model.py.j2 writes into the script (the
script must not import omnigen): the same modules under the same paths, so the analyzer and planner read the model
the script trains. tests/test_compose.py checks that the two build the same parameters.

Module paths (what the planner's groups, model.freeze and FSDP name):
    encoders.<modality>    the HF encoder model (SiglipVisionModel, CLIPVisionModel, ...)
    projectors.<modality>  Linear, or Linear-GELU-Linear (mlp2x_gelu), encoder hidden -> foundation hidden
    foundation             the HF causal LM; its lm_head is the text decoder
    decoders.<modality>    a codebook decoder (image_tokens, audio_codec): head Linear(hidden, codebooks x
                           codebook_size) predicting the codebook tokens, embed Embedding(codebooks x codebook_size,
                           hidden) feeding them back as input
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from .errors import SpecError
from .spec import FOUNDATION_PATH, DecoderPart, EncoderPart, Spec, decoder_path, encoder_path

COMPOSITE_CLASS = "OmniModel"
PROJECTORS = ("linear", "mlp2x_gelu")
# Encoder config types omnigen has an input recipe for (omnigen/inputs.py: PART_FAMILIES), by modality: whole crops
# in pixel_values; a Whisper encoder's fixed window of log-mel frames in input_features.
IMAGE_ENCODERS = ("siglip_vision_model", "clip_vision_model")
AUDIO_ENCODERS = ("whisper",)
ENCODERS = {"image": IMAGE_ENCODERS, "audio": AUDIO_ENCODERS}
# The encoder class of a config whose MODEL_MAPPING class is a whole encoder-decoder (WhisperModel): a path under
# transformers, since transformers does not export it at the top level.
ENCODER_CLASSES = {"whisper": "models.whisper.modeling_whisper.WhisperEncoder"}
# Config fields of causal LMs whose forward does more than lm_head(hidden states) (Gemma 2, Cohere, Granite).
LOGIT_SCALING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass(frozen=True)
class LoadedEncoder:
    part: EncoderPart
    config: transformers.PretrainedConfig
    model_class: str      # the transformers class the script builds, a path under transformers (SiglipVisionModel,
                          # models.whisper.modeling_whisper.WhisperEncoder)
    hidden_size: int


@dataclass(frozen=True)
class LoadedParts:
    encoders: tuple[LoadedEncoder, ...]
    foundation_config: transformers.PretrainedConfig
    foundation_class: str
    decoders: tuple[DecoderPart, ...] = ()

    def config_dict(self) -> dict[str, Any]:
        """generated/<name>/config.json: every part's config, by module path."""
        from .hf import config_to_dict
        return {"encoders": {e.part.modality: config_to_dict(e.config) for e in self.encoders},
                "foundation": config_to_dict(self.foundation_config)}

    def describe(self, spec: Spec, weights_prefixes: dict[str, str]) -> dict[str, Any]:
        """What the script's composite section renders (Plan.parts); weights_prefixes: part_weights'."""
        hidden = self.foundation_config.get_text_config().hidden_size
        return {
            "encoders": [{"modality": e.part.modality, "module": encoder_path(e.part.modality),
                          "class": e.model_class, "config_class": type(e.config).__name__,
                          "projector": e.part.projector, "in_features": e.hidden_size, "out_features": hidden,
                          "placeholder_token_id": e.part.placeholder_token_id, "trainable": e.part.trainable,
                          "weights_prefix": weights_prefixes.get(encoder_path(e.part.modality)),
                          "parallel": _pins(spec, e.part.parallel)}
                         for e in self.encoders],
            "foundation": {"module": FOUNDATION_PATH, "class": self.foundation_class,
                           "config_class": type(self.foundation_config).__name__,
                           "trainable": spec.model.parts.foundation.trainable,
                           "weights_prefix": weights_prefixes.get(FOUNDATION_PATH),
                           "parallel": _pins(spec, spec.model.parts.foundation.parallel)},
            "decoders": [{**d.model_dump(mode="json"), "hidden_size": hidden,
                          "module": "foundation.lm_head" if d.kind == "lm_head" else decoder_path(d.modality)}
                         for d in spec.model.parts.decoders],
        }

    @property
    def codebook_decoders(self) -> tuple[DecoderPart, ...]:
        return tuple(d for d in self.decoders if d.kind == "codebook_head")


def _pins(spec: Spec, parallel) -> dict[str, str | None]:
    """What the spec fixes of a part's plan, by the key that fixes it (None: the planner's to choose); --explain
    names them."""
    ac = ("the part's parallel.activation_checkpointing" if parallel.activation_checkpointing != "auto" else
          "parallel.activation_checkpointing" if spec.parallel.activation_checkpointing != "auto" else None)
    return {"placement": "the part's parallel.placement" if parallel.placement != "auto" else None,
            "activation_checkpointing": ac}


def _read_config(spec: Spec, path: str, key: str) -> transformers.PretrainedConfig:
    from .hf import _config_from_dict, _decode_floats  # noqa: F401  (the one place that builds configs)
    p = spec.resolve(path)
    p = p / "config.json" if p.is_dir() else p
    where = f"{spec.source}: key '{key}'"
    try:
        raw = json.loads(Path(p).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{where}: {p} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("model_type") not in transformers.CONFIG_MAPPING:
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise SpecError(f"{where}: {p} has model_type={got!r}, which this transformers version does not know")
    return _config_from_dict(transformers.CONFIG_MAPPING[raw["model_type"]], raw, f"{where}: {p}")


def _encoder(spec: Spec, index: int, part: EncoderPart) -> LoadedEncoder:
    key = f"model.parts.encoders[{index}]"
    config = _read_config(spec, part.config, f"{key}.config")
    config.dtype = torch.float32
    supported = ENCODERS[part.modality]
    if config.model_type not in supported:
        raise SpecError(f"{spec.source}: key '{key}.config': {type(config).__name__} ({config.model_type!r}) is not "
                        f"an {part.modality} encoder omnigen can feed; supported: {', '.join(supported)}")
    model_class = ENCODER_CLASSES.get(config.model_type) or transformers.MODEL_MAPPING[type(config)].__name__
    return LoadedEncoder(part, config, model_class, config.hidden_size)


def transformers_class(path: str) -> type:
    """A class by its path under transformers ("SiglipVisionModel", "models.whisper.modeling_whisper.WhisperEncoder")."""
    node: Any = transformers
    for name in path.split("."):
        node = getattr(node, name)
    return node


def _foundation_class(spec: Spec, config: transformers.PretrainedConfig) -> str:
    part = spec.model.parts.foundation
    name = part.class_name or next(iter(getattr(config, "architectures", None) or []), None)
    key = f"{spec.source}: key 'model.parts.foundation.class'"
    if name is None:
        raise SpecError(f"{key}: not given and the foundation's config names no architectures")
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise SpecError(f"{key}: {name!r} is not a transformers model class")
    if not name.endswith("ForCausalLM") or "inputs_embeds" not in inspect.signature(cls.forward).parameters:
        raise SpecError(f"{key}: {name} is not a causal LM taking inputs_embeds; the foundation is a ...ForCausalLM "
                        "class (Qwen3MoeForCausalLM, LlamaForCausalLM, ...)")
    return name


def load_parts(spec: Spec) -> LoadedParts:
    parts = spec.model.parts
    foundation = _read_config(spec, parts.foundation.config, "model.parts.foundation.config")
    foundation.dtype = torch.float32
    cls = _foundation_class(spec, foundation)
    vocab = foundation.get_text_config().vocab_size
    for i, e in enumerate(parts.encoders):
        if e.placeholder_token_id >= vocab:
            raise SpecError(f"{spec.source}: key 'model.parts.encoders[{i}].placeholder_token_id': "
                            f"{e.placeholder_token_id} is outside the foundation's vocabulary [0, {vocab})")
    for i, d in enumerate(parts.decoders):
        key = f"{spec.source}: key 'model.parts.decoders[{i}]"
        if d.placeholder_token_id is not None and d.placeholder_token_id >= vocab:
            raise SpecError(f"{key}.placeholder_token_id': {d.placeholder_token_id} is outside the foundation's "
                            f"vocabulary [0, {vocab})")
    text = foundation.get_text_config()
    scaled = [k for k in LOGIT_SCALING if getattr(text, k, None) not in (None, 1, 1.0)]
    if scaled and any(d.kind == "codebook_head" for d in parts.decoders):
        raise SpecError(f"{spec.source}: key 'model.parts.foundation.config': {', '.join(scaled)} set: this "
                        "foundation's forward changes its logits after lm_head, and a codebook decoder reads the "
                        "hidden states beside it; foundations without logit scaling are supported")
    encoders = tuple(_encoder(spec, i, e) for i, e in enumerate(parts.encoders))
    return LoadedParts(encoders, foundation, cls, parts.decoders)


# --- the composed model (the script's OmniModel, built here on the meta device for the analyzer) ----------------

def projector(kind: str, in_features: int, out_features: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_features, out_features)
    return nn.Sequential(nn.Linear(in_features, out_features), nn.GELU(), nn.Linear(out_features, out_features))


class CodebookDecoder(nn.Module):
    """A decoder of discrete tokens (VQ codebooks): head predicts them from the foundation's hidden states, embed
    feeds them back as the foundation's input at their positions; codebook c's entries sit at rows
    [c x codebook_size, (c + 1) x codebook_size) of both."""

    def __init__(self, codebook_size: int, hidden: int, codebooks: int = 1):
        super().__init__()
        self.embed = nn.Embedding(codebooks * codebook_size, hidden)
        self.head = nn.Linear(hidden, codebooks * codebook_size, bias=False)


class OmniModel(nn.Module):
    def __init__(self, parts: LoadedParts):
        super().__init__()
        hidden = parts.foundation_config.get_text_config().hidden_size
        self.encoders = nn.ModuleDict({e.part.modality: transformers_class(e.model_class)._from_config(e.config)
                                       for e in parts.encoders})
        self.projectors = nn.ModuleDict({e.part.modality: projector(e.part.projector, e.hidden_size, hidden)
                                         for e in parts.encoders})
        self.foundation = getattr(transformers, parts.foundation_class)._from_config(parts.foundation_config)
        self.decoders = nn.ModuleDict({d.modality: CodebookDecoder(d.codebook_size, hidden, d.codebooks)
                                       for d in parts.codebook_decoders})

    def get_input_embeddings(self):
        return self.foundation.get_input_embeddings()

    def get_output_embeddings(self):
        return self.foundation.get_output_embeddings()


def parts_from_compiled(parts: dict[str, Any], config: dict[str, Any]) -> LoadedParts:
    """The parts a compiled folder describes (plan.json's parts, config.json's configs by module path): what
    `omnigen export` rebuilds the script's OmniModel from, without the spec."""
    def hf_config(class_name: str, raw: dict[str, Any]) -> transformers.PretrainedConfig:
        built = getattr(transformers, class_name).from_dict(raw)
        built.dtype = torch.float32
        return built

    encoders = tuple(LoadedEncoder(EncoderPart(modality=e["modality"], config="config.json", projector=e["projector"],
                                               placeholder_token_id=e["placeholder_token_id"]),
                                   hf_config(e["config_class"], config["encoders"][e["modality"]]), e["class"],
                                   e["in_features"])
                     for e in parts["encoders"])
    decoders = tuple(DecoderPart.model_validate({k: d[k] for k in DecoderPart.model_fields}, strict=False)
                     for d in parts["decoders"])
    foundation = parts["foundation"]
    return LoadedParts(encoders, hf_config(foundation["config_class"], config["foundation"]), foundation["class"],
                       decoders)


def save_parts(model: OmniModel, folder: Path) -> None:
    """The layout the script's export_hf writes: each HF part as its own from_pretrained folder (foundation,
    encoders.<modality>), the projectors in projectors.pt and the codebook decoders in decoders.pt (state dicts
    under their module paths)."""
    for path, part in {FOUNDATION_PATH: model.foundation,
                       **{encoder_path(m): e for m, e in model.encoders.items()}}.items():
        part.save_pretrained(folder / path)
    torch.save({f"projectors.{k}": v for k, v in model.projectors.state_dict().items()}, folder / "projectors.pt")
    if len(model.decoders):
        torch.save({f"decoders.{k}": v for k, v in model.decoders.state_dict().items()}, folder / "decoders.pt")


def build_meta(parts: LoadedParts) -> OmniModel:
    with torch.device("meta"):
        try:
            return OmniModel(parts)
        except Exception as e:  # a part's config its class rejects: the user's to fix
            raise SpecError(f"cannot build the composed model from its parts: {type(e).__name__}: {e}") from None


def weight_folders(spec: Spec) -> dict[str, tuple[str, str]]:
    """The parts that start from released weights: module path -> (spec key, folder as the spec gives it)."""
    parts = spec.model.parts
    given = [(encoder_path(e.modality), f"model.parts.encoders[{i}].weights", e.weights)
             for i, e in enumerate(parts.encoders)]
    given.append((FOUNDATION_PATH, "model.parts.foundation.weights", parts.foundation.weights))
    return {path: (key, folder) for path, key, folder in given if folder is not None}


def part_weights(spec: Spec, parts: LoadedParts) -> dict[str, str]:
    """Each part's weights checked against the part (names and shapes): the prefix its tensors carry in their
    files, by module path (a part may be one model of a bigger checkpoint: Whisper's encoder, CLIP's vision tower)."""
    from .hf import match_weights
    folders = weight_folders(spec)
    model = build_meta(parts) if folders else None
    return {path: match_weights(model.get_submodule(path), spec.resolve(folder), key, spec.source)
            for path, (key, folder) in folders.items()}


def encoder_tokens(model: OmniModel, encoder: LoadedEncoder, item_shape: list[int]) -> int:
    """Output positions per item of an encoder, from a meta-device forward (no memory): what its projector places.
    item_shape: its input for one item (pixel_values, input_features), passed first as the script does."""
    with torch.device("meta"), torch.no_grad():
        out = model.encoders[encoder.part.modality](torch.zeros(item_shape))
    return int(out.last_hidden_state.shape[1])


def part_roles(parts: LoadedParts) -> dict[str, str]:
    """Roles by module path: the analyzer reads the composed model's parts from the spec, not from module names."""
    roles = {encoder_path(e.part.modality): f"encoder:{'vision' if e.part.modality == 'image' else 'audio'}"
             for e in parts.encoders}
    return {**roles, "projectors": "projector", "decoders": "decoder"}


def analyze_composite(spec: Spec, parts: LoadedParts):
    from .analyze import analyze_model
    model = build_meta(parts)
    graph = analyze_model(model, parts.foundation_config, COMPOSITE_CLASS, part_roles(parts))
    kinds = " + ".join([*(e.config.model_type for e in parts.encoders), parts.foundation_config.model_type,
                        *(f"{d.modality} head" for d in parts.codebook_decoders)])
    return replace(graph, model_type=f"parts: {kinds}")
