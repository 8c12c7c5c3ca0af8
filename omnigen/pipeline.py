"""spec → ModelGraph → Plan → files: the stages chained, each called once."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from . import emit
from .analyze import analyze
from .chat_data import check_chat_manifest
from .data import check_jsonl, check_shards
from .errors import SpecError
from .hardware import HardwareProfile, load_profile
from .hf import config_to_dict, load_config
from .inputs import input_recipe
from .model_graph import ModelGraph, router_aux_loss
from .plan import Plan, make_plan
from .spec import Spec
from .talker import trains_talker


@dataclass(frozen=True)
class Compiled:
    spec: Spec
    graph: ModelGraph
    hardware: HardwareProfile
    plan: Plan
    config: dict


def plan(spec: Spec) -> Compiled:
    if spec.model.parts is not None:
        return plan_composite(spec)
    config = load_config(spec)
    if trains_talker(spec, config):
        return plan_talker(spec, config)
    graph = analyze(spec)
    check_data_files(spec, config)
    hw = load_profile(spec)
    every = {"image": spec.train.synthetic.image_every, "audio": spec.train.synthetic.audio_every,
             "video": spec.train.synthetic.video_every if data_format(spec) is None else 0}
    inputs = input_recipe(config, graph.model_class, spec.train.seq_len, spec.train.pack_documents, every,
                          spec.train.packing)
    refuse_packed_router_loss(spec, config, f"{graph.model_class}'s config", "model.overrides")
    check_chat(spec, inputs)
    the_plan = make_plan(spec, graph, hw, inputs, weights=spec.model.weights)
    return Compiled(spec, graph, hw, the_plan, config_to_dict(config))


def plan_composite(spec: Spec) -> Compiled:
    """A model composed from parts (model.parts): the same stages, each part read from its own config."""
    from . import compose
    from .inputs import composite_recipe
    parts = compose.load_parts(spec)
    refuse_packed_router_loss(spec, parts.foundation_config, "the foundation's config", "the foundation's config")
    if parts.codebook_decoders and data_format(spec) is not None:
        raise SpecError(f"{spec.source}: key 'train.data': a model with a {parts.codebook_decoders[0].modality} decoder "
                        "trains on synthetic samples for now (train.data: synthetic); jsonl rows and token shards "
                        "hold text only, and chat manifests no item to generate")
    graph = compose.analyze_composite(spec, parts)
    check_data_files(spec, parts.foundation_config)
    synthetic = spec.train.synthetic
    every = {"image": synthetic.image_every, "audio": synthetic.audio_every, "image_tokens": synthetic.image_tokens_every,
             "audio_codec": synthetic.audio_codec_every}
    inputs = composite_recipe(parts, compose.build_meta(parts), spec.train.seq_len, spec.train.pack_documents, every,
                              spec.source, spec.train.packing)
    check_chat(spec, inputs)
    prefixes = compose.part_weights(spec, parts)
    hw = load_profile(spec)
    the_plan = replace(make_plan(spec, graph, hw, inputs), parts=parts.describe(spec, prefixes))
    sp, seq_len = the_plan.mesh["sp"], spec.train.seq_len
    if parts.codebook_decoders and seq_len % sp:  # the per-position codes would need padding of their own
        raise SpecError(f"{spec.source}: key 'train.seq_len': {seq_len} does not split evenly over parallel.sp={sp}, "
                        f"which a model with a {parts.codebook_decoders[0].modality} decoder needs; use seq_len "
                        f"{seq_len + -seq_len % sp}")
    return Compiled(spec, graph, hw, the_plan, parts.config_dict())


def plan_talker(spec: Spec, config) -> Compiled:
    """Qwen2.5-Omni's thinker + talker (omnigen/talker.py): the thinker's recipe plus the talker's sequence."""
    from .talker import recipe
    graph = analyze(spec)
    hw = load_profile(spec)
    the_plan = make_plan(spec, graph, hw, recipe(spec, config))
    return Compiled(spec, graph, hw, the_plan, config_to_dict(config))


def check_data_files(spec: Spec, config) -> None:
    """A jsonl file or token-shard folder in train.data: every token id inside the (text) model's vocabulary."""
    t, vocab_size = spec.train, config.get_text_config().vocab_size
    if data_format(spec) == "jsonl":
        check_jsonl(spec.resolve(t.data), vocab_size, spec.source)
    elif data_format(spec) == "token_shards":
        check_shards(spec.resolve(t.data), vocab_size, t.seq_len, t.global_batch_size, spec.source)


def check_chat(spec: Spec, inputs: dict) -> None:
    """A chat manifest in train.data: every row read by the script's own reader for this input recipe."""
    t = spec.train
    if data_format(spec) == "chat":
        check_chat_manifest(spec.resolve(t.data), spec.resolve(t.processor), inputs, t.long_samples, spec.source)


def refuse_packed_router_loss(spec: Spec, config, whose: str, where_to_zero: str) -> None:
    """Packed steps vary the count of micro-batches, which the router load-balancing loss averages over."""
    if spec.train.packing and router_aux_loss(config_to_dict(config)):
        raise SpecError(f"{spec.source}: key 'train.packing': {whose} turns on the router load-balancing loss, which "
                        "averages over a fixed count of micro-batches per step; packed steps vary it (use packing: "
                        f"false, or router_aux_loss_coef: 0 in {where_to_zero})")


def data_format(spec: Spec) -> str | None:
    """None (synthetic samples), "jsonl", "chat" (a manifest read through train.processor) or "token_shards" (a
    folder omnigen data tokenize wrote)."""
    if spec.train.data == "synthetic":
        return None
    if spec.train.processor is not None:
        return "chat"
    return "token_shards" if spec.resolve(spec.train.data).is_dir() else "jsonl"


def default_out_dir(spec: Spec) -> Path:
    """generated/<name>/ beside the specs/ folder holding the spec (or in the working directory)."""
    base = Path(spec.base_dir)
    root = base.parent if base.name == "specs" else Path.cwd()
    return root / "generated" / spec.name


def render(compiled: Compiled, out_dir: Path) -> dict[str, str]:
    from .compose import weight_folders
    spec = compiled.spec
    rel = lambda p: os.path.relpath(spec.resolve(p), out_dir.resolve())  # noqa: E731  (paths stay portable)
    paths = emit.Paths(data=None if spec.train.data == "synthetic" else rel(spec.train.data),
                       weights=None if spec.model.weights is None else rel(spec.model.weights),
                       part_weights=None if spec.model.parts is None else
                       {path: rel(folder) for path, (_, folder) in weight_folders(spec).items()},
                       data_format=data_format(spec),
                       processor=None if spec.train.processor is None else rel(spec.train.processor))
    return emit.render(compiled.plan, compiled.config, spec.to_dict(), paths)
