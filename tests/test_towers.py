"""Vision and audio towers from their config: every family's synthetic inputs against the real tiny model.

The configs come from omnigen.zoo (tiny by code, from each config class's defaults). For each family the recipe's
LLM-token count must equal what the model's own tower produces: the forward below places the features into the
placeholders and transformers raises when the counts differ; the feature call is counted directly as well.
None of these models needs Pillow, timm or torchvision (only their processors do), so nothing is skipped for them.
"""

import json

import jinja2
import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml

from omnigen import runner, zoo
from omnigen.inputs import input_recipe
from omnigen.spec import load_spec

SEQ_LEN = 64
ENV = jinja2.Environment(loader=jinja2.FileSystemLoader("templates"), keep_trailing_newline=True,
                         trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)

# family -> model classes; the family is what the recipe derives, never looked up by name.
FAMILIES = {
    "patches": ["Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration",
                "Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration"],
    "crops": ["LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
              "LlavaOnevisionForConditionalGeneration", "Gemma3ForConditionalGeneration",
              "InternVLForConditionalGeneration", "Idefics3ForConditionalGeneration",
              "SmolVLMForConditionalGeneration", "Mistral3ForConditionalGeneration",
              "Llama4ForConditionalGeneration", "AyaVisionForConditionalGeneration",
              "GraniteDoclingForConditionalGeneration", "Step3p7ForConditionalGeneration"],
    "whisper_audio": ["Qwen2AudioForConditionalGeneration", "VoxtralForConditionalGeneration"],
    "omni": ["Qwen2_5OmniThinkerForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration"],
}
LAYOUT = {"patches": {"image": "patches"}, "crops": {"image": "crops"}, "whisper_audio": {"audio": None},
          "omni": {"image": "patches", "audio": None}}
CASES = [(family, name) for family, names in FAMILIES.items() for name in names]


def tiny(name):
    cls = getattr(transformers, name)
    return cls, zoo.tiny_config(cls)


def data_module(recipe):
    namespace = {"torch": torch, "IGNORE_INDEX": -100}
    exec(compile(ENV.get_template("data.py.j2").render(inputs=recipe), "data.py", "exec"), namespace)
    return namespace


def features_count(output, width):
    """Rows of the features a get_*_features call returns (a tensor, or one tensor per image)."""
    feats = getattr(output, "pooler_output", None)
    if feats is None:
        feats = output.last_hidden_state if hasattr(output, "last_hidden_state") else output
    if isinstance(feats, (list, tuple)):
        return sum(f.numel() for f in feats) // width
    return feats.numel() // width


@pytest.mark.parametrize("family,name", CASES)
def test_recipe_token_count_is_what_the_tower_produces(family, name):
    cls, config = tiny(name)
    recipe = input_recipe(config, name, SEQ_LEN)
    assert {m: recipe[m].get("layout") for m in ("image", "audio") if m in recipe} == LAYOUT[family]
    data = data_module(recipe)
    batch = data["collate"]([data["make_sample"](i, SEQ_LEN, 0) for i in range(2)])
    assert set(batch) == set(recipe["model_kwargs"]) | {"shift_labels"}
    torch.manual_seed(0)
    model = cls._from_config(config).train()
    for modality in LAYOUT[family]:  # each tower alone, called the way IdleTowers calls it
        item = recipe[modality]
        _, features = data[f"{modality}_block"](torch.Generator().manual_seed(0))
        with torch.no_grad():
            if item["tower_call"] == "module":
                tower = next(m for n, m in model.named_modules() if n.endswith(f"{modality}_tower"))
                out = tower(*(features[a] for a in item["feature_args"]))
                # A padded window's output covers the padding too: the forward below counts the real tokens.
                produced = out.last_hidden_state.shape[1] if item["window_frames"] == item["num_frames"] else None
            else:
                out = getattr(model, item["tower_call"])(**{a: features[a] for a in item["feature_args"]})
                produced = features_count(out, config.get_text_config().hidden_size)
        if produced is not None:
            assert produced == item["llm_tokens_per_item"], (name, modality, produced, item["llm_tokens_per_item"])
    # The whole model: transformers raises when placeholders and features differ in number.
    labels = batch.pop("shift_labels")
    logits = model(**batch).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    assert torch.isfinite(loss)
    for modality in LAYOUT[family]:
        item = recipe[modality]
        assert (batch["input_ids"] == item["token_id"]).sum() == 2 * item["llm_tokens_per_item"]


def test_text_range_without_eos_or_pad_in_the_text_config():
    """Qwen3-VL's text config has no eos/pad ids: the recipe still picks a pad id and a clean text range."""
    cls, config = tiny("Qwen3VLForConditionalGeneration")
    recipe = input_recipe(config, "Qwen3VLForConditionalGeneration", SEQ_LEN)
    text = recipe["text"]
    assert 0 <= text["pad_token_id"] < text["vocab_size"]
    assert not any(text["token_low"] <= t < text["token_high"] for t in recipe["ignored_label_token_ids"])


@pytest.mark.parametrize("name", [n for _, n in CASES] + ["Qwen3MoeForCausalLM", "DeepseekV3ForCausalLM"])
def test_zoo_configs_are_tiny_and_consistent(name):
    cls, config = tiny(name)
    text = config.get_text_config()
    assert text.vocab_size == zoo.VOCAB and text.hidden_size == zoo.WIDTH
    assert text.num_hidden_layers == zoo.LAYERS
    raw = config.to_dict()
    ids = set()
    zoo._token_ids(raw, ids)
    assert all(i < zoo.VOCAB for i in ids)
    rope = getattr(text, "rope_parameters", None) or {}
    if rope.get("mrope_section"):
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        factor = rope.get("partial_rotary_factor") or getattr(text, "partial_rotary_factor", None) or 1.0
        assert sum(rope["mrope_section"]) == int(head_dim * factor) // 2
    with torch.device("meta"):
        model = cls._from_config(config)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


# One real verify per family: torchrun at dp_shard=2 against the single-process reference. Every other sample
# carries no image/audio, so one rank runs its tower on IdleTowers' dummy item in some micro-batch.
VERIFY = ["Qwen3VLForConditionalGeneration", "LlavaForConditionalGeneration", "Idefics3ForConditionalGeneration",
          "Llama4ForConditionalGeneration",
          "Qwen2AudioForConditionalGeneration"]


def write_spec(tmp_path, name):
    spec = zoo.write_tiny(getattr(transformers, name), tmp_path / "models" / name.lower(),
                          cluster={"nodes": 1, "procs_per_node": 2, "device": "cpu", "hardware": "cpu"},
                          train={"seq_len": SEQ_LEN, "micro_batch_size": 1, "global_batch_size": 4, "steps": 2,
                                 "lr": 1e-3, "seed": 0, "precision": "fp32",
                                 "synthetic": {"image_every": 2, "audio_every": 2}},
                          parallel={"dp_shard": 2})
    spec["model"]["config"] = f"models/{name.lower()}"
    path = tmp_path / f"{name.lower()}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(path)


@pytest.mark.distributed
@pytest.mark.parametrize("name", VERIFY)
def test_tower_family_verifies_at_dp_shard_2(name, tmp_path):
    code = runner.verify(write_spec(tmp_path, name), steps=2, workdir=str(tmp_path / "run"))
    metrics = runner.read_metrics(tmp_path / "run" / "parallel" / "metrics.jsonl")
    assert code == 0 and len(metrics) == 2
    assert json.loads((tmp_path / "run" / "parallel" / "plan.json").read_text())["mesh"]["dp_shard"] == 2


def test_a_fixed_audio_window_caps_the_clip():
    """Qwen2-Audio's tower takes exactly 2 x max_source_positions frames: a long sequence's clip fills that window
    (750 LLM tokens at the released 1500 positions) instead of asking for more frames than the tower takes."""
    config = transformers.Qwen2AudioConfig()
    audio = input_recipe(config, "Qwen2AudioForConditionalGeneration", 8192)["audio"]
    assert audio["num_frames"] == audio["window_frames"] == 3000 and audio["llm_tokens_per_item"] == 750
    short = input_recipe(config, "Qwen2AudioForConditionalGeneration", 256)["audio"]
    assert short["window_frames"] == 3000 and short["num_frames"] < 3000 and short["llm_tokens_per_item"] == 32


def test_the_pixel_mask_shape_is_asked_of_the_model():
    """Idefics3 masks padded pixels ([batch, images, h, w]); GraniteDocling marks real tiles ([batch, tiles]) and
    shuffles by its vision config's scale_factor: at the released sizes a 512 x 512 tile is (512/16)^2 / 4^2 = 64
    LLM tokens. The recipe tells the two apart by a meta run of get_image_features, not by the class name."""
    docling = input_recipe(transformers.GraniteDoclingConfig(), "GraniteDoclingForConditionalGeneration", 256)["image"]
    assert docling["pixel_attention_mask"] == "per_tile" and docling["llm_tokens_per_item"] == 64
    idefics = input_recipe(transformers.Idefics3Config(), "Idefics3ForConditionalGeneration", 256)["image"]
    assert idefics["pixel_attention_mask"] == "per_pixel"


def test_a_tower_that_reads_values_is_counted_on_a_narrow_copy():
    """Step3p7's tower builds its rotary grid with .tolist() (no meta run) and halves the patch grid twice with
    strided convolutions, which no config field says: at the released 728 x 728 image and patch 14, 52 x 52
    patches become 13 x 13 = 169 LLM tokens, counted by a CPU run of a narrow copy of the config."""
    image = input_recipe(transformers.Step3p7Config(), "Step3p7ForConditionalGeneration", 4096)["image"]
    assert image["encoder_tokens_per_item"] == 52 * 52 and image["llm_tokens_per_item"] == 13 * 13
