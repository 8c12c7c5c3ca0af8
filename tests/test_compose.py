"""Models composed from parts (spec model.parts): spec validation, the analyzer's view, the plan per part, the
script's OmniModel against omnigen's twin, and one 2-rank verify of each example spec."""

from pathlib import Path

import pytest
import yaml

from omnigen.errors import OmnigenError, SpecError
from omnigen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "specs" / "models"
SPEC = ROOT / "specs" / "siglip_qwen3_moe_tiny_parts.yaml"
SPEC_EP = ROOT / "specs" / "siglip_qwen3_moe_tiny_parts_ep2.yaml"


def parts(**changes) -> dict:
    encoder = {"modality": "image", "config": str(MODELS / "siglip_vision_tiny"), "placeholder_token_id": 1000}
    body = {"encoders": [encoder], "foundation": {"config": str(MODELS / "qwen3_moe_tiny")}}
    for key, value in changes.items():
        if key.startswith("encoder_"):
            encoder[key.removeprefix("encoder_")] = value
        else:
            body[key] = value
    return body


def error_of(tmp_path, model: dict, extra: dict | None = None) -> str:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "model": model, **(extra or {})}))
    with pytest.raises(OmnigenError) as e:
        spec = load_spec(path)
        from omnigen.pipeline import plan
        plan(spec)
    return str(e.value)


# --- spec -----------------------------------------------------------------------------------------------------

def test_trainable_false_and_part_parallel_map_onto_freeze_and_placement():
    spec = load_spec(SPEC_EP)
    assert spec.model.freeze == ("encoders.image",)
    assert spec.model.part_parallel("encoders.image.encoder.layers").placement == "replicate"
    assert spec.model.part_parallel("foundation.model.layers").placement == "fsdp"
    assert spec.model.part_parallel("projectors") is None
    assert [d.modality for d in spec.model.parts.decoders] == ["text"]


@pytest.mark.parametrize("model, expected", [
    ({"parts": parts(encoder_projecter="linear")}, "unknown key 'model.parts.encoders.0.projecter'; did you mean "
                                                   "'projector'?"),
    ({"parts": parts(foundaton={})}, "did you mean 'foundation'?"),
    ({"parts": parts(encoder_projector="qformer")}, "model.parts.encoders.0.projector"),
    ({"parts": parts(encoder_modality="video")}, "model.parts.encoders.0.modality"),
    ({"parts": parts(encoder_placeholder_token_id="<image>")}, "placeholder_token_id"),
    ({"parts": parts(encoder_parallel={"placement": "sharded"})}, "model.parts.encoders.0.parallel.placement"),
    ({"parts": parts(encoder_parallel={"place": "fsdp"})}, "did you mean 'placement'?"),
    ({"parts": parts(encoder_config="nowhere")}, "key 'model.parts.encoders[0].config': no config.json"),
    ({"parts": parts(decoders=[{"modality": "image_tokens"}])}, "exactly one text decoder"),
    ({"parts": parts(encoders=[parts()["encoders"][0]] * 2)}, "one encoder per modality"),
    ({"parts": parts(), "config": str(MODELS / "llama_tiny")}, "with parts, config belong(s) to each part"),
    ({}, "give either config (one HF model) or parts"),
])
def test_bad_part_specs_are_refused_by_key(tmp_path, model, expected):
    assert expected in error_of(tmp_path, model)


@pytest.mark.parametrize("model, expected", [
    ({"parts": parts(encoder_placeholder_token_id=4096)}, "outside the foundation's vocabulary [0, 1024)"),
    ({"parts": parts(encoder_config=str(MODELS / "llama_tiny"))}, "is not an image encoder omnigen can feed"),
    ({"parts": parts(encoder_modality="audio")}, "audio encoder parts are not built yet"),
    ({"parts": parts(decoders=[{"modality": "text"}, {"modality": "image_tokens"}])},
     "image_tokens decoders are not built yet"),
    ({"parts": parts(decoders=[{"modality": "text", "loss_weight": 0.5}])}, "loss_weight 1.0"),
    ({"parts": parts(foundation={"config": str(MODELS / "qwen3_moe_tiny"), "class": "Qwen2VLModel"})},
     "is not a causal LM taking inputs_embeds"),
    ({"parts": parts(encoder_tokens_per_item=9)}, "tokens_per_item=9, but SiglipVisionModel puts out 16"),
], ids=["vocab", "not-an-encoder", "audio", "image-tokens", "loss-weight", "foundation-class", "tokens"])
def test_parts_transformers_cannot_serve_are_refused_at_compile(tmp_path, model, expected):
    assert expected in error_of(tmp_path, model, {"train": {"seq_len": 64}})
