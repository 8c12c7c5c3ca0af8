"""Qwen2.5-Omni's talker trained beside its thinker (spec: model.class Qwen2_5OmniForConditionalGeneration, whose config
enables audio output, and the optional model.talker block).

The whole HF class holds thinker + talker + token2wav and only generates. The script trains the teacher-forced form
of its `generate` (templates/sections/talker.py.j2): the thinker's class with the talker beside it under `talker`
(module paths thinker-first, as the thinker alone has them, so every thinker feature of the script applies
unchanged); token2wav is neither built nor trained. This module is the compiler's side: the checks (exit 2 by key),
the meta-device twin the analyzer reads (the talker's layers are a "decoder" group, priced and planned like any
other) and the talker's part of the input recipe (plan.inputs["talker"]).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import transformers

from .errors import SpecError
from .spec import Spec, TalkerSpec

WHOLE_CLASS = "Qwen2_5OmniForConditionalGeneration"
THINKER_CLASS = "Qwen2_5OmniThinkerForConditionalGeneration"
TALKER_CLASS = "Qwen2_5OmniTalkerForConditionalGeneration"
TALKER_PATH = "talker"  # the talker's module path in the script's model (and in the whole class's checkpoints)


def trains_talker(spec: Spec, config: transformers.PretrainedConfig | None = None) -> bool:
    """True when the spec names the whole Qwen2.5-Omni class (thinker + talker); a model.talker block on any other
    model, or the whole class with audio output off, is refused by key."""
    if spec.model.parts is not None:
        return False
    from .hf import load_config, model_class_name
    config = config if config is not None else load_config(spec)
    whole = model_class_name(spec, config) == WHOLE_CLASS
    if spec.model.talker is not None and not whole:
        raise SpecError(f"{spec.source}: key 'model.talker': a talker is trained with model.class {WHOLE_CLASS} "
                        f"(Qwen2.5-Omni's thinker + talker), not {model_class_name(spec, config)}")
    if whole and not getattr(config, "enable_audio_output", False):
        raise SpecError(f"{spec.source}: key 'model.config': {WHOLE_CLASS} with enable_audio_output false is the "
                        f"thinker alone: name class {THINKER_CLASS} and give its thinker_config as the config, or set "
                        "enable_audio_output: true to train the talker too")
    return whole


def check(spec: Spec, config: transformers.PretrainedConfig) -> None:
    """What the generated script cannot serve yet, refused at compile by key."""
    t, src = spec.train, spec.source
    if spec.model.weights is not None:
        raise SpecError(f"{src}: key 'model.weights': released weights for the thinker + talker are not loaded yet "
                        "(random init from train.seed)")
    if t.data != "synthetic" or t.packing or t.pack_documents > 1:
        raise SpecError(f"{src}: key 'train.data': the talker trains on synthetic samples for now (train.data: "
                        "synthetic, packing: false, pack_documents: 1): its codec targets are made per sample")
    talker = spec.model.talker or TalkerSpec()
    if talker.reply_tokens >= t.seq_len:
        raise SpecError(f"{src}: key 'model.talker.reply_tokens': {talker.reply_tokens} leaves no prompt in a sample "
                        f"of train.seq_len={t.seq_len} (use fewer than seq_len)")
    thinker, tc = config.thinker_config, config.talker_config
    text_vocab, hidden = thinker.get_text_config().vocab_size, thinker.get_text_config().hidden_size
    if tc.embedding_size != hidden:
        raise SpecError(f"{src}: key 'model.config': talker_config.embedding_size={tc.embedding_size} must equal the "
                        f"thinker's hidden_size={hidden} (the talker reads the thinker's hidden states)")
    for key, vocab, owner in [*((k, text_vocab, "the thinker's") for k in TEXT_IDS.values()),
                              *((k, tc.vocab_size, "the talker's codec") for k in CODEC_IDS.values())]:
        value = getattr(tc, key)
        if not 0 <= value < vocab:
            raise SpecError(f"{src}: key 'model.config': talker_config.{key}={value} is outside {owner} vocabulary "
                            f"[0, {vocab})")


# The talker's special tokens, by their names in talker_config: text ids live in the thinker's vocabulary (the reply
# stream is thinker embeddings), codec ids in the talker's.
TEXT_IDS = {"bos": "tts_text_start_token_id", "eos": "tts_text_end_token_id", "pad": "tts_text_pad_token_id"}
CODEC_IDS = {"bos": "tts_codec_start_token_id", "end": "tts_codec_end_token_id", "pad": "tts_codec_pad_token_id",
             "mask": "tts_codec_mask_token_id"}


class ThinkerWithTalker(torch.nn.Module):
    """The script's model on the meta device, for the analyzer: the thinker's modules at the thinker's paths, and the
    talker under `talker` (the generated ThinkerTalker subclasses the thinker's class; only the structure matters)."""

    def __init__(self, config: transformers.PretrainedConfig):
        super().__init__()
        self.thinker = getattr(transformers, THINKER_CLASS)._from_config(config.thinker_config)
        for name, child in list(self.thinker.named_children()):
            self.add_module(name, child)
        self.talker = getattr(transformers, TALKER_CLASS)._from_config(config.talker_config)
        del self.thinker

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm_head


def build_meta(config: transformers.PretrainedConfig) -> ThinkerWithTalker:
    with torch.device("meta"):
        try:
            return ThinkerWithTalker(config)
        except Exception as e:  # a sub-config its class rejects: the user's to fix
            raise SpecError(f"cannot build {WHOLE_CLASS}'s thinker and talker from the given config: "
                            f"{type(e).__name__}: {e}") from None


def analyze_talker(spec: Spec, config: transformers.PretrainedConfig):
    """The thinker + talker's ModelGraph: the thinker's blocks as for the thinker alone, the talker's as role
    "decoder" (its layers one group, its projection, codec embedding and codec head top-level blocks)."""
    from .analyze import analyze_model
    check(spec, config)
    config.thinker_config.dtype = config.talker_config.dtype = torch.float32
    graph = analyze_model(build_meta(config), config.thinker_config, WHOLE_CLASS, {TALKER_PATH: "decoder"})
    return replace(graph, model_type=f"{config.model_type}: thinker + talker",
                   attention_refused="the talker's sequence, built from the thinker's whole sequence of hidden "
                                     "states (Ulysses for the thinker + talker: not built yet)",
                   chunked_loss_refused="the talker's section computes the text and speech losses itself")


def recipe(spec: Spec, config: transformers.PretrainedConfig) -> dict[str, Any]:
    """The thinker's input recipe plus `talker`: how the script lays out the talker's teacher-forced sequence."""
    from .inputs import input_recipe
    synthetic = spec.train.synthetic
    every = {"image": synthetic.image_every, "audio": synthetic.audio_every, "video": synthetic.video_every}
    inputs = input_recipe(config.thinker_config, THINKER_CLASS, spec.train.seq_len, 1, every, False)
    talker, tc = spec.model.talker or TalkerSpec(), config.talker_config
    prompt = spec.train.seq_len - talker.reply_tokens
    codec_ids = {name: getattr(tc, key) for name, key in CODEC_IDS.items()}
    inputs["talker"] = {
        "loss_weight": talker.loss_weight, "reply_tokens": talker.reply_tokens, "codec_tokens": talker.codec_tokens,
        "prompt_tokens": prompt,
        # prompt, one text-bos position, then one position per codec step
        "sequence_length": prompt + 1 + talker.codec_tokens,
        "codebook_size": tc.vocab_size,
        "codec_token_ids": codec_ids,
        "text_token_ids": {name: getattr(tc, key) for name, key in TEXT_IDS.items()},
        # synthetic codes are drawn below the lowest special codec id
        "code_range": [0, min(codec_ids.values())],
        # positions whose thinker input embedding generate() zeroes before the talker reads it (the media features)
        "media_token_ids": [getattr(config.thinker_config, f"{m}_token_index") for m in ("image", "video", "audio")],
    }
    return inputs
