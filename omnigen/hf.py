"""The one place omnigen touches transformers' model registry: config loading and meta-device builds."""

from __future__ import annotations

import json
from typing import Any

import torch
import transformers

from .errors import SpecError
from .spec import Spec


def load_config(spec: Spec) -> transformers.PretrainedConfig:
    """The model config with the spec's overrides applied (nested keys via dotted names: text_config.num_hidden_layers)."""
    path = spec.config_path()
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SpecError(f"{spec.source}: key 'model.config': {path} is not valid JSON: {e}") from None
    for key, value in spec.model.overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise SpecError(f"{spec.source}: key 'model.overrides.{key}': '{part}' is not a section of {path.name}")
            node = node[part]
        node[leaf] = value
    model_type = raw.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise SpecError(f"{spec.source}: key 'model.config': {path} has model_type={model_type!r}, "
                        "which this transformers version does not know")
    try:
        return transformers.CONFIG_MAPPING[model_type].from_dict(_decode_floats(raw))
    except Exception as e:  # the config class validates its fields: a bad value is the user's to fix
        raise SpecError(f"{spec.source}: key 'model.config': {path} is not a valid {model_type} config: "
                        f"{type(e).__name__}: {' '.join(str(e).split())}") from None


def _decode_floats(node: Any) -> Any:
    """transformers writes non-finite floats as {"__float__": "Infinity"} (JSON has no inf) but does not read them
    back: decode them, so a config it saved loads again."""
    if isinstance(node, dict):
        if node.keys() == {"__float__"} and isinstance(node["__float__"], str):
            return float(node["__float__"])
        return {k: _decode_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_decode_floats(v) for v in node]
    return node


def model_class_name(spec: Spec, config: transformers.PretrainedConfig) -> str:
    if spec.model.class_name:
        return spec.model.class_name
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise SpecError(f"{spec.source}: key 'model.class': not given and {spec.config_path()} names no architectures")
    return archs[0]


def model_class(spec: Spec, config: transformers.PretrainedConfig) -> type:
    name = model_class_name(spec, config)
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        import difflib
        known = [n for n in dir(transformers) if n.endswith(("ForCausalLM", "ForConditionalGeneration"))]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise SpecError(f"{spec.source}: key 'model.class': {name!r} is not a transformers model class.{hint}")
    return cls


def build_meta_model(cls: type, config: transformers.PretrainedConfig) -> torch.nn.Module:
    """Instantiate without memory: parameters live on the meta device (seconds even for 72B)."""
    with torch.device("meta"):
        try:
            return cls._from_config(config)
        except Exception as e:  # a config/class mismatch is the user's to fix
            raise SpecError(f"cannot build {cls.__name__} from the given config: {type(e).__name__}: {e}") from None


def config_to_dict(config: transformers.PretrainedConfig) -> dict[str, Any]:
    """The config as written into generated/<name>/config.json (sorted, only non-default keys, stable bytes)."""
    return json.loads(config.to_json_string(use_diff=True))
