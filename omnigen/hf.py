"""The one place omnigen touches transformers' model registry: config loading and meta-device builds."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
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
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{spec.source}: key 'model.config': {path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{spec.source}: key 'model.config': {path} holds a JSON {type(raw).__name__}, "
                        "not a config object ({\"model_type\": ..., ...})")
    model_type = raw.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        raise SpecError(f"{spec.source}: key 'model.config': {path} has model_type={model_type!r}, "
                        "which this transformers version does not know")
    config_class = transformers.CONFIG_MAPPING[model_type]
    base = _config_from_dict(config_class, raw, f"{spec.source}: key 'model.config': {path}")
    for key, value in _flat_overrides(spec.model.overrides, base):
        _apply_override(raw, base, key, value, f"{spec.source}: key 'model.overrides.{key}'", path.name)
    if not spec.model.overrides:
        return base
    return _config_from_dict(config_class, raw, f"{spec.source}: key 'model.overrides'")


def _config_from_dict(config_class: type, raw: dict[str, Any], where: str) -> transformers.PretrainedConfig:
    try:
        return config_class.from_dict(_decode_floats(raw))
    except Exception as e:  # transformers validates configs (heads dividing hidden, ...): the user's to fix
        reason = str(e).strip().splitlines()[-1].strip()
        raise SpecError(f"{where}: transformers rejects this {config_class.__name__}: {reason}") from None


def _flat_overrides(overrides: dict[str, Any], config: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) pairs. A mapping given for a sub-config (`--set model.overrides.text_config.hidden_size=256`
    arrives as {"text_config": {"hidden_size": 256}}) sets those keys inside it: replaced whole, the sub-config would
    silently fall back to its class defaults for every other key (a tiny MoE's 8 experts would become 128). A
    mapping for any other attribute (rope_parameters) is a value and replaces it."""
    pairs = []
    for key, value in overrides.items():
        sub = getattr(config, key, None) if config is not None and "." not in key else None
        if isinstance(value, dict) and isinstance(sub, transformers.PretrainedConfig):
            pairs += _flat_overrides(value, sub, f"{prefix}{key}.")
        else:
            pairs.append((f"{prefix}{key}", value))
    return pairs


def _apply_override(raw: dict[str, Any], config: Any, key: str, value: Any, where: str, file_name: str) -> None:
    """Set raw[key] (dotted), refusing keys the config class does not have: a typo would become a new, unused
    attribute and the model would silently keep its default."""
    node, attrs = raw, config
    *parents, leaf = key.split(".")
    for part in parents:
        attrs = getattr(attrs, part, None)
        if not isinstance(node.setdefault(part, {}), dict) or not isinstance(attrs, transformers.PretrainedConfig):
            raise SpecError(f"{where}: '{part}' is not a sub-config of {file_name}")
        node = node[part]
    known = set(attrs.to_dict()) | set(getattr(type(attrs), "__dataclass_fields__", {}))
    if leaf not in known:
        close = difflib.get_close_matches(leaf, sorted(known), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise SpecError(f"{where}: {type(attrs).__name__} has no attribute '{leaf}'{hint}")
    node[leaf] = value


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


def supports_sdpa(class_name: str) -> bool:
    """Whether transformers can run the class's attention with scaled_dot_product_attention (False where it marks
    _supports_sdpa = False: attention sinks, compressed or indexed attention). Unknown classes are taken to."""
    cls = getattr(transformers, class_name, None)
    return cls is None or getattr(cls, "_supports_sdpa", True) is not False


def check_produces_logits(model: torch.nn.Module, spec: Spec) -> None:
    """The script trains on `model(**batch).logits`: a bare backbone (LlamaModel) has no output head."""
    if model.get_output_embeddings() is None:
        name = type(model).__name__
        raise SpecError(f"{spec.source}: key 'model.class': {name} has no language-model head, so it produces "
                        "hidden states, not logits; name the class with the head (e.g. its ...ForCausalLM or "
                        "...ForConditionalGeneration)")


def check_weights(model: torch.nn.Module, spec: Spec) -> None:
    """model.weights: the tensors are exactly the model's parameters by name and shape, as the script's
    load_safetensors requires (rotary buffers may be absent): found now, not when every rank starts."""
    match_weights(model, spec.resolve(spec.model.weights), "model.weights", spec.source, whole=True)


def match_weights(model: torch.nn.Module, folder: Path, key: str, source: str, whole: bool = False) -> str:
    """Every *.safetensors file in folder readable, and the model's parameters in them by name and shape; the prefix
    their names carry there. whole: the files hold this model and nothing else (prefix ""); otherwise the model may
    be part of a released checkpoint (an encoder's weights under "model.encoder." of a Whisper checkpoint, the
    vision tower inside a CLIP one) whose other tensors are left out."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:
            raise SpecError(f"{source}: key '{key}': {file} is not a readable safetensors file: "
                            f"{type(e).__name__}: {e}") from None
    tied = getattr(model, "all_tied_weights_keys", None) or {}  # saved once, under the name they are tied to
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if "rotary" not in k and k not in tied}
    prefix = "" if whole else _common_prefix(expected, shapes)
    held = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    merged: dict[str, dict[str, int]] = {}
    if not prefix and set(held) - set(expected):  # another layout: the script's loader has transformers convert it
        held, merged = _converted_names(model, held)
    problems = [f"{prefix}{k} has shape {list(held[k])}, the model {list(expected[k])}"
                for k in sorted(set(held) & set(expected)) if held[k] is not None and held[k] != expected[k]]
    problems += [f"{k} would stack {n} tensors {source}, the model holds {expected[k][0]}"
                 for k, counts in sorted(merged.items()) if k in expected
                 for source, n in counts.items() if n != expected[k][0]]
    problems += [f"unexpected {k}" for k in sorted(set(held) - set(expected)) if whole and "rotary" not in k]
    problems += [f"missing {prefix}{k}" for k in sorted(set(expected) - set(held))]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise SpecError(f"{source}: key '{key}': the tensors in {folder} do not match "
                        f"{type(model).__name__}: {'; '.join(problems[:5])}{more}")
    return prefix


def _converted_names(model: torch.nn.Module, held: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, int]]]:
    """The checkpoint's tensor names as transformers' from_pretrained loads them into this model: its conversion
    rules rename keys and stack tensors (one per expert, as save_pretrained writes them, into the fused [experts,
    ...] tensors the model holds). Returns the names (a stacked tensor's shape None) and, per stacked name, how many
    tensors of each source pattern it stacks."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    try:
        rules = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - a model transformers converts nothing for keeps its names
        return held, {}
    converted, merged = dict(held), {}
    for rule in rules:
        stacks = len(rule.source_patterns) > 1 or "*" in rule.source_patterns[0]
        for source, target in zip(rule.source_patterns, rule.target_patterns * len(rule.source_patterns)):
            pattern = re.escape(source).replace(r"\*", r"\d+") if stacks else source
            renamed = {}
            for name, shape in converted.items():
                new = re.sub(pattern, target, name)
                if new != name and stacks:
                    counts = merged.setdefault(new, {})
                    counts[source] = counts.get(source, 0) + 1
                renamed[new] = None if new != name and stacks else shape
            converted = renamed
    return converted, merged


def _common_prefix(expected: dict[str, Any], held: dict[str, Any]) -> str:
    """The prefix under which the checkpoint holds the most of the model's tensor names ("" on a tie)."""
    found = {""}
    for name in held:
        for k in expected:
            if name.endswith("." + k):
                found.add(name[: -len(k)])
    return max(sorted(found), key=lambda p: sum(p + k in held for k in expected))
