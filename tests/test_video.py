"""Video inputs for patch-grid vision towers (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): pixel_values_videos + video_grid_thw
through the tower images use, asked for with train.synthetic.video_every (0, the default, makes none).

The recipe's token count must be what the real tiny tower produces; models whose videos omnigen does not make are
refused at compile with the reason; one verify at dp_shard=2 where ranks see image only, video only, both and neither
(IdleTowers must run the shared vision tower once per modality, in the same order, on every rank).
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from omnigen import runner
from omnigen.errors import SpecError
from omnigen.inputs import input_recipe
from omnigen.spec import load_spec
from test_towers import SEQ_LEN, data_module, features_count, tiny

ROOT = Path(__file__).resolve().parent.parent
EVERY = {"image": 2, "video": 3}  # samples 0: both, 1: neither, 2: image, 3: video


@pytest.mark.parametrize("name,blocks", [("Qwen2VLForConditionalGeneration", 1),
                                         ("Qwen2_5_VLForConditionalGeneration", 1),
                                         ("Qwen3VLForConditionalGeneration", 2)])
def test_video_token_count_is_what_the_tower_produces(name, blocks):
    """Qwen3-VL's rope index splits a video's grid into one-frame grids (its processor wraps every frame), so each
    temporal patch is its own wrapped block; Qwen2/2.5-VL take one block per video."""
    cls, config = tiny(name)
    recipe = input_recipe(config, name, SEQ_LEN, every=EVERY)
    video = recipe["video"]
    assert video["blocks"] == blocks and video["grid_thw"][0] == 2
    assert {"pixel_values_videos", "video_grid_thw"} <= set(recipe["model_kwargs"])
    data = data_module(recipe)
    torch.manual_seed(0)
    model = cls._from_config(config).train()
    tokens, features = data["video_block"](torch.Generator().manual_seed(0))
    assert (tokens == video["token_id"]).sum() == video["llm_tokens_per_item"]
    assert (tokens == video["start_token_id"]).sum() == blocks
    with torch.no_grad():
        out = model.get_video_features(**{a: features[a] for a in video["feature_args"]})
    assert features_count(out, config.get_text_config().hidden_size) == video["llm_tokens_per_item"]
    samples = [data["make_sample"](i, SEQ_LEN, 0) for i in range(4)]
    assert [("pixel_values" in s, "pixel_values_videos" in s) for s in samples] == [
        (True, True), (False, False), (True, False), (False, True)]
    assert torch.equal(samples[0]["mm_token_type_ids"].unique(), torch.tensor([0, 1, 2]))
    for batch in ([samples[0], samples[1]], [samples[3]]):  # the real forward: transformers checks the counts
        batch = data["collate"](batch)
        labels = batch.pop("shift_labels")
        loss = F.cross_entropy(model(**batch).logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        assert torch.isfinite(loss)


@pytest.mark.parametrize("name,reason", [
    ("LlavaForConditionalGeneration", "takes no video omnigen can make"),
    ("Glm4vForConditionalGeneration", "places video frames in image placeholders"),
    ("Qwen2_5OmniThinkerForConditionalGeneration", "use_audio_in_video"),
])
def test_videos_omnigen_does_not_make_are_refused(name, reason):
    cls, config = tiny(name)
    with pytest.raises(SpecError, match=f"video_every: {name} .*{reason}"):
        input_recipe(config, name, SEQ_LEN, every=EVERY)
    assert "video" not in input_recipe(config, name, SEQ_LEN)  # no video unless asked for


def test_video_every_is_a_spec_key(tmp_path):
    spec = load_spec(ROOT / "specs" / "qwen2_vl_tiny.yaml", ["train.synthetic.video_every=3"])
    plan = runner.compile_to(spec, tmp_path)
    assert [t["modality"] for t in plan.towers] == ["image", "video"]
    assert plan.towers[0]["module"] == plan.towers[1]["module"]  # one vision tower, called once per modality
    with pytest.raises(Exception, match="video_every"):
        load_spec(ROOT / "specs" / "qwen2_vl_tiny.yaml", ["train.synthetic.video_every=-1"])


@pytest.mark.distributed
def test_qwen2_vl_with_videos_verifies_at_dp_shard_2(tmp_path):
    spec = load_spec(ROOT / "specs" / "qwen2_vl_tiny.yaml",
                     ["train.synthetic.video_every=3", "train.synthetic.image_every=2"])
    assert runner.verify(spec, steps=2, workdir=str(tmp_path / "run")) == 0
    plan = (tmp_path / "run" / "parallel" / "train.py").read_text()
    assert 'TOWER_ORDER = ("image", "video",)' in plan
