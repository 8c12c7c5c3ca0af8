"""The input recipe and the data code rendered from it: real forward/backward through every tiny model."""

import json
import math

import jinja2
import pytest
import torch
import torch.nn.functional as F
import transformers

from omnigen.errors import SpecError
from omnigen.inputs import input_recipe

TINY = ["llama_tiny", "qwen3_moe_tiny", "qwen2_moe_tiny", "deepseek_v3_tiny",
        "qwen2_vl_tiny", "qwen25_omni_thinker_tiny", "qwen3_omni_moe_thinker_tiny"]
MULTIMODAL = ["qwen2_vl_tiny", "qwen25_omni_thinker_tiny", "qwen3_omni_moe_thinker_tiny"]
TOWERS = {"image": "visual", "audio": "audio_tower"}  # modality -> module name of its encoder
TOWER_INPUT_LAYERS = ("patch_embed.", "conv1.", "conv2d1.")  # the first layer each tower applies to its input
SEQ_LEN = 64
ENV = jinja2.Environment(loader=jinja2.FileSystemLoader("templates"), keep_trailing_newline=True,
                         trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)


def load(name):
    raw = json.loads(open(f"specs/models/{name}/config.json").read())
    return transformers.CONFIG_MAPPING[raw["model_type"]].from_dict(raw), raw["architectures"][0]


def recipe_for(name, seq_len=SEQ_LEN, every=1):
    recipe = input_recipe(*load(name), seq_len)
    for modality in modalities(recipe):
        recipe[modality]["every"] = every
    return recipe


def modalities(recipe):
    return [m for m in TOWERS if m in recipe]


def data_module(recipe):
    """Render data.py.j2 and exec it as train.py would: with torch imported and IGNORE_INDEX defined."""
    namespace = {"torch": torch, "IGNORE_INDEX": -100}
    exec(compile(ENV.get_template("data.py.j2").render(inputs=recipe), "data.py", "exec"), namespace)
    return namespace


def build(name):
    config, class_name = load(name)
    torch.manual_seed(0)
    return getattr(transformers, class_name)._from_config(config).train()


def tower(model, modality):
    return next(m for n, m in model.named_modules() if n.split(".")[-1] == TOWERS[modality])


def train_step(model, batch):
    batch = dict(batch)
    labels = batch.pop("shift_labels")
    logits = model(**batch).logits
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    return loss


def tower_grad_norm(model, modality):
    """Gradient that reached the tower's input layer (patch embedding / first conv): it flowed all the way back."""
    params = tower(model, modality).named_parameters()
    return sum(float(p.grad.norm()) for n, p in params if n.startswith(TOWER_INPUT_LAYERS) and p.grad is not None)


@pytest.fixture(scope="module")
def models():
    return {}  # built once per module: each test zeroes grads before its step


def model_for(models, name):
    if name not in models:
        models[name] = build(name)
    models[name].zero_grad(set_to_none=True)
    return models[name]


@pytest.mark.parametrize("name", TINY)
def test_every_modality_trains(models, name):
    recipe = recipe_for(name)
    data = data_module(recipe)
    batch = data["collate"]([data["make_sample"](i, SEQ_LEN, 0) for i in range(2)])
    assert set(batch) == set(recipe["model_kwargs"]) | {"shift_labels"}
    model = model_for(models, name)
    train_step(model, batch)
    for modality in modalities(recipe):
        assert tower_grad_norm(model, modality) > 0, f"{modality} tower got no gradient"


@pytest.mark.parametrize("name", MULTIMODAL)
def test_samples_without_media_train(models, name):
    recipe = recipe_for(name, every=2)
    data = data_module(recipe)
    mixed = data["collate"]([data["make_sample"](i, SEQ_LEN, 0) for i in (0, 1)])  # only sample 0 has media
    if "image" in recipe:
        assert mixed["image_grid_thw"].tolist() == [recipe["image"]["grid_thw"]]
    if "audio" in recipe:
        assert mixed["input_features"].shape[0] == 1
    model = model_for(models, name)
    train_step(model, mixed)
    for modality in modalities(recipe):
        assert tower_grad_norm(model, modality) > 0
    text_only = data["collate"]([data["make_sample"](i, SEQ_LEN, 0) for i in (1, 3)])
    assert set(text_only) == {"input_ids", "attention_mask", "shift_labels"} | (
        {"mm_token_type_ids"} if "mm_token_type_ids" in recipe["model_kwargs"] else set())
    model.zero_grad(set_to_none=True)
    train_step(model, text_only)
    for modality in modalities(recipe):
        assert tower_grad_norm(model, modality) == 0


@pytest.mark.parametrize("name", ["qwen25_omni_thinker_tiny", "qwen3_omni_moe_thinker_tiny"])
def test_audio_length_formula_matches_the_model(models, name):
    """The recipe's llm_tokens_per_item is what the audio tower emits (the model never checks it against the
    placeholder count: masked_scatter silently takes a prefix), for single- and multi-chunk clips."""
    model = model_for(models, name)
    for seq_len in (16, 64, 120, 400):
        audio = recipe_for(name, seq_len)["audio"]
        frames = audio["num_frames"]
        features = torch.randn(1, audio["num_mel_bins"], frames)
        with torch.no_grad():
            out = model.get_audio_features(features, torch.ones(1, frames, dtype=torch.long))
        assert out.last_hidden_state.shape[0] == audio["llm_tokens_per_item"], (seq_len, frames)


def test_recipe_for_the_omni_thinker():
    recipe = recipe_for("qwen25_omni_thinker_tiny")
    assert json.loads(json.dumps(recipe, sort_keys=True)) == recipe
    assert list(recipe) == sorted(recipe)
    image, audio = recipe["image"], recipe["audio"]
    assert image["grid_thw"] == [1, 4, 4] and image["encoder_tokens_per_item"] == 16 and image["llm_tokens_per_item"] == 4
    assert image["pixel_values_shape"] == [16, 3 * 2 * 4 * 4]
    assert audio["encoder_tokens_per_item"] == math.ceil(audio["num_frames"] / 2)  # one stride-2 conv
    assert audio["llm_tokens_per_item"] == 8
    low, high = recipe["text"]["token_low"], recipe["text"]["token_high"]
    assert not any(low <= t < high for t in recipe["ignored_label_token_ids"] + [recipe["text"]["pad_token_id"]])
    assert recipe["model_kwargs"] == ["attention_mask", "feature_attention_mask", "image_grid_thw",
                                      "input_features", "input_ids", "pixel_values"]


def test_text_only_models_have_no_modalities():
    recipe = recipe_for("deepseek_v3_tiny")
    assert modalities(recipe) == [] and recipe["model_kwargs"] == ["attention_mask", "input_ids", "position_ids"]
    assert recipe["text"]["token_low"] == 3  # above bos=0, eos=1, pad=2
    source = ENV.get_template("data.py.j2").render(inputs=recipe)
    assert "IMAGE" not in source and "AUDIO" not in source and "NON_TEXT" not in source


def test_short_seq_len_is_a_spec_error():
    with pytest.raises(SpecError, match="too short.*seq_len >= 8"):
        input_recipe(*load("qwen25_omni_thinker_tiny"), 7)


def test_samples_are_deterministic_and_labels_shifted():
    recipe = recipe_for("qwen25_omni_thinker_tiny")
    template = ENV.get_template("data.py.j2")
    assert template.render(inputs=recipe) == template.render(inputs=recipe)
    data = data_module(recipe)
    a, b = data["make_sample"](5, SEQ_LEN, 3), data_module(recipe)["make_sample"](5, SEQ_LEN, 3)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["input_ids"], data["make_sample"](6, SEQ_LEN, 3)["input_ids"])
    assert not torch.equal(a["input_ids"], data["make_sample"](5, SEQ_LEN, 4)["input_ids"])
    ids, labels = a["input_ids"], a["shift_labels"]
    special = torch.isin(ids, torch.tensor(recipe["ignored_label_token_ids"]))
    assert labels[-1] == -100
    assert torch.equal(labels[:-1] == -100, special[1:])  # ignored exactly where the next token is special
    assert torch.equal(labels[:-1][~special[1:]], ids[1:][~special[1:]])
    for item in (recipe[m] for m in modalities(recipe)):
        assert int((ids == item["token_id"]).sum()) == item["llm_tokens_per_item"]


def test_jsonl_rows_pad_and_truncate(models):
    data = data_module(recipe_for("qwen2_vl_tiny"))
    short = data["load_jsonl_sample"]({"input_ids": [5, 6, 7]}, 8)
    assert short["input_ids"].tolist() == [5, 6, 7] + [1012] * 5
    assert short["attention_mask"].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert short["shift_labels"].tolist() == [6, 7] + [-100] * 6
    long = data["load_jsonl_sample"]({"input_ids": list(range(10, 30))}, 8)
    assert long["input_ids"].tolist() == list(range(10, 18)) and long["shift_labels"][-1] == -100
    with pytest.raises(ValueError, match="out of range"):
        data["load_jsonl_sample"]({"input_ids": [5, 5000]}, 8)
    train_step(model_for(models, "qwen2_vl_tiny"), data["collate"]([short, long]))


def test_audio_towers_are_asked_how_many_tokens_a_clip_makes():
    """Voxtral takes no mask and stacks frames in its projector: the clip fills the tower's window and the count is
    what the model's own get_audio_features returns on the meta device. GLM-ASR's tower pools by its mask's values,
    which no shape inference sees: refused with that reason rather than a guess that crashes at step 0."""
    from omnigen import zoo
    name = "VoxtralForConditionalGeneration"
    config = zoo.tiny_config(getattr(transformers, name))
    audio = input_recipe(config, name, 128)["audio"]
    assert audio["item_kwargs"] == ["input_features"] and audio["feature_mask"] is None
    assert audio["num_frames"] == audio["window_frames"] == 2 * config.audio_config.max_source_positions
    model = transformers.VoxtralForConditionalGeneration._from_config(config)
    with torch.no_grad():
        features = model.get_audio_features(input_features=torch.zeros(1, audio["num_mel_bins"], audio["num_frames"]))
    assert getattr(features, "pooler_output", features).shape[0] == audio["llm_tokens_per_item"]
    name = "GlmAsrForConditionalGeneration"
    with pytest.raises(SpecError, match="input_features_mask"):
        input_recipe(zoo.tiny_config(getattr(transformers, name)), name, 128)
