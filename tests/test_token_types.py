"""token_type_ids: Gemma3's bidirectional image blocks and PaliGemma's bidirectional prefix.

Which attention token_type_ids select is asked of the model's own mask builder at compile time; the samples mark
the tokens the model's processor would mark, and no target is a token its predecessor can see. Without them
transformers runs those tokens causally (PaliGemma: both ways everywhere, its attention modules are not causal),
another attention than the model's: both the parallel script and verify's reference trained it. Under Ulysses the
masks the model builds on the whole sequence are applied after the all-to-all; a planted causal mask fails verify.
"""

from pathlib import Path

import pytest
import torch
import transformers
import yaml

from omnigen import runner, zoo
from omnigen.attention import token_type_attention
from omnigen.inputs import input_recipe
from omnigen.spec import load_spec
from test_towers import SEQ_LEN, data_module, tiny

GEMMA3, PALIGEMMA = "Gemma3ForConditionalGeneration", "PaliGemmaForConditionalGeneration"


def test_the_pattern_is_asked_of_the_models_mask_builder():
    assert token_type_attention(*tiny(GEMMA3)) == {"attention": "image_blocks", "marked": 1, "unmarked": 0}
    assert token_type_attention(*tiny(PALIGEMMA)) == {"attention": "prefix", "marked": 0, "unmarked": 1}
    qwen = input_recipe(tiny("Qwen2VLForConditionalGeneration")[1], "Qwen2VLForConditionalGeneration", SEQ_LEN)
    assert "token_types" not in qwen and "token_type_ids" not in qwen["model_kwargs"]


def sample(name, index=0):
    cls, config = tiny(name)
    recipe = input_recipe(config, name, SEQ_LEN)
    assert "token_type_ids" in recipe["model_kwargs"]
    return cls, config, recipe, data_module(recipe)["make_sample"](index, SEQ_LEN, 0)


def test_gemma3_marks_each_images_placeholders():
    _, config, recipe, s = sample(GEMMA3)
    assert torch.equal(s["token_type_ids"], (s["input_ids"] == config.image_token_id).long())
    assert s["token_type_ids"].sum() == recipe["image"]["llm_tokens_per_item"]


def test_paligemma_marks_the_prefix_and_learns_only_after_it():
    _, config, _, s = sample(PALIGEMMA)
    prefix = s["token_type_ids"] == 0
    last_image = int((s["input_ids"] == config.image_token_id).nonzero().max())
    assert prefix[: last_image + 1].all() and not prefix[last_image + 1:].any()
    targets = (s["shift_labels"] != -100).nonzero().flatten()
    assert targets.min() == last_image and len(targets) == SEQ_LEN - 1 - last_image


def first_hidden_after_nudging(model, batch, nudged, read):
    """The decoder stack's output at `read` when the input embedding at `nudged` is nudged (hooks on the stack)."""
    stack = model.model.language_model

    def nudge(module, args, kwargs):
        embeds = kwargs["inputs_embeds"].clone()
        embeds[:, nudged] += 1.0
        kwargs["inputs_embeds"] = embeds
        return args, kwargs

    handle = stack.register_forward_pre_hook(nudge, with_kwargs=True)
    try:
        with torch.no_grad():
            return model.model(**batch).last_hidden_state[0, read]
    finally:
        handle.remove()


@pytest.mark.parametrize("name", [GEMMA3, PALIGEMMA])
def test_a_later_token_changes_an_earlier_ones_output_only_inside_a_block(name):
    """The real model fed the sample: nudging the last image token changes the first image token's output (both
    in one bidirectional block); a text token after the block never reaches back into it. Without token_type_ids
    (what omnigen fed before) Gemma3 is causal everywhere and PaliGemma bidirectional everywhere."""
    cls, config, _, s = sample(name)
    torch.manual_seed(0)
    model = cls._from_config(config).eval()
    image = (s["input_ids"] == config.image_token_id).nonzero().flatten()
    first, last = int(image.min()), int(image.max())
    batch = {k: v[None] if k not in ("pixel_values",) else v for k, v in s.items() if k != "shift_labels"}
    base = first_hidden_after_nudging(model, batch, nudged=[], read=first)
    assert not torch.allclose(first_hidden_after_nudging(model, batch, [last], first), base)
    after = last + 2  # past the end-of-image wrapper (Gemma3) / the first suffix token (PaliGemma)
    assert torch.allclose(first_hidden_after_nudging(model, batch, [after], first), base)
    old = {k: v for k, v in batch.items() if k != "token_type_ids"}  # what omnigen fed before
    before = first_hidden_after_nudging(model, old, [], first)
    if name == GEMMA3:  # causal everywhere: the image block's later tokens stay unseen
        assert torch.allclose(first_hidden_after_nudging(model, old, [last], first), before)
    else:  # no mask built and attention modules that are not causal: every token sees the whole row, answer included
        assert not torch.allclose(first_hidden_after_nudging(model, old, [after], first), before)


# verify at dp_shard=2 and sp=2 against one single-process reference (the same data and global batch); then sp=2
# with the model's masks dropped (Ulysses' plain causal attention, what the script did before) must fail.
CAUSAL_UNDER_SP = ('    kwargs["attention_mask"] = whole_sequence_masks(kwargs.get("attention_mask"))',
                   '    kwargs["attention_mask"] = None  # PLANTED: the bidirectional image blocks are lost')


def write_spec(tmp_path, name, parallel):
    spec = zoo.write_tiny(getattr(transformers, name), tmp_path / "models" / name.lower(),
                          cluster={"nodes": 1, "procs_per_node": 2, "device": "cpu", "hardware": "cpu"},
                          train={"seq_len": SEQ_LEN, "micro_batch_size": 1, "global_batch_size": 4, "steps": 2,
                                 "lr": 1e-3, "seed": 0, "precision": "fp32", "synthetic": {"image_every": 2}},
                          parallel=parallel)
    spec["model"]["config"] = f"models/{name.lower()}"
    path = tmp_path / f"{name.lower()}_{'_'.join(f'{k}{v}' for k, v in parallel.items())}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(path)


def run(spec, folder: Path, plants=(), single_process=False):
    runner.compile_to(runner.reference_spec(spec) if single_process else spec, folder)
    script = folder / "train.py"
    for old, new in plants:
        text = script.read_text()
        assert text.count(old) == 1, old
        script.write_text(text.replace(old, new))
    result = runner.run_script(spec, folder, 2, single_process=single_process)
    assert result is not None, f"{script} failed"
    return result


def deviations(ref, par):
    return {c.what: c for c in runner.compare(ref, par, 2, runner.tolerances("fp32", False))}


@pytest.mark.distributed
@pytest.mark.parametrize("name", [GEMMA3, PALIGEMMA])
def test_token_type_masks_verify_at_dp_shard_2_and_sp_2_and_a_causal_mask_fails(name, tmp_path):
    """Gemma3's bidirectional image blocks and PaliGemma's bidirectional prefix (its attention modules are not causal,
    use_bidirectional_attention: they follow the model's mask) under Ulysses: the masks the model builds on the whole
    sequence are kept; dropping them (plain causal attention, or for PaliGemma both ways everywhere) fails."""
    dp2 = write_spec(tmp_path, name, {"dp_shard": 2})
    sp2 = write_spec(tmp_path, name, {"sp": 2})
    assert runner.compile_to(sp2, tmp_path / "check").sequence_parallel["model_masks"]
    reference = run(dp2, tmp_path / "reference", single_process=True)
    for spec, folder in ((dp2, "dp2"), (sp2, "sp2")):
        found = deviations(reference, run(spec, tmp_path / folder))
        assert all(c.ok for c in found.values()), (folder, found)
    planted = deviations(reference, run(sp2, tmp_path / "planted", [CAUSAL_UNDER_SP]))
    assert not planted["step-0 loss, grad norm"].ok and not planted["step-0 gradients"].ok
