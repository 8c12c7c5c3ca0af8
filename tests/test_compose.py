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
SPEC_OMNI = ROOT / "specs" / "siglip_whisper_qwen3_moe_tiny_omni_ep2.yaml"
SPEC_OMNI_SP = ROOT / "specs" / "siglip_whisper_qwen3_moe_tiny_omni_sp2_ep2.yaml"


IMAGE_TOKENS = {"modality": "image_tokens", "codebook_size": 256, "placeholder_token_id": 1001, "tokens_per_item": 8}
AUDIO_CODEC = {"modality": "audio_codec", "codebook_size": 64, "codebooks": 4, "placeholder_token_id": 1003,
               "tokens_per_item": 6}


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
    ({"parts": parts(decoders=[IMAGE_TOKENS])}, "exactly one text decoder"),
    ({"parts": parts(decoders=[{"modality": "text"}, {"modality": "image_tokens"}])},
     "needs codebook_size, placeholder_token_id, tokens_per_item"),
    ({"parts": parts(decoders=[{"modality": "text"}, {**IMAGE_TOKENS, "kind": "lm_head"}])},
     "the image_tokens decoder is a codebook_head"),
    ({"parts": parts(decoders=[{"modality": "text", "codebook_size": 8}])}, "the text decoder is the foundation's"),
    ({"parts": parts(decoders=[{"modality": "text", "codebooks": 4}])}, "codebooks: the text decoder is the"),
    ({"parts": parts(decoders=[{"modality": "text"}, {**AUDIO_CODEC, "codebooks": 0}])},
     "model.parts.decoders.1.codebooks"),
    ({"parts": parts(decoders=[{"modality": "text"}, {**IMAGE_TOKENS, "placeholder_token_id": 1000}])},
     "an encoder and a decoder share a placeholder_token_id"),
    ({"parts": parts(decoders=[{"modality": "text"}, IMAGE_TOKENS, IMAGE_TOKENS])}, "one decoder per modality"),
    ({"parts": parts(encoders=[parts()["encoders"][0]] * 2)}, "one encoder per modality"),
    ({"parts": parts(), "config": str(MODELS / "llama_tiny")}, "with parts, config belong(s) to each part"),
    ({}, "give either config (one HF model) or parts"),
])
def test_bad_part_specs_are_refused_by_key(tmp_path, model, expected):
    assert expected in error_of(tmp_path, model)


@pytest.mark.parametrize("model, expected", [
    ({"parts": parts(encoder_placeholder_token_id=4096)}, "outside the foundation's vocabulary [0, 1024)"),
    ({"parts": parts(encoder_config=str(MODELS / "llama_tiny"))}, "is not an image encoder omnigen can feed"),
    ({"parts": parts(encoder_modality="audio")}, "is not an audio encoder omnigen can feed; supported: whisper"),
    ({"parts": parts(decoders=[{"modality": "text"}, {**IMAGE_TOKENS, "placeholder_token_id": 5000}])},
     "decoders[1].placeholder_token_id': 5000 is outside the foundation's vocabulary"),
    ({"parts": parts(foundation={"config": str(MODELS / "qwen3_moe_tiny"), "class": "Qwen2VLModel"})},
     "is not a causal LM taking inputs_embeds"),
    ({"parts": parts(encoder_tokens_per_item=9)}, "tokens_per_item=9, but SiglipVisionModel puts out 16"),
], ids=["vocab", "not-an-encoder", "audio", "decoder-vocab", "foundation-class", "tokens"])
def test_parts_transformers_cannot_serve_are_refused_at_compile(tmp_path, model, expected):
    assert expected in error_of(tmp_path, model, {"train": {"seq_len": 64}})


# --- analyzer, planner, script --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compiled_ep():
    from omnigen.pipeline import plan
    return plan(load_spec(SPEC_EP))


def test_the_analyzer_reads_roles_from_the_parts(compiled_ep):
    graph = compiled_ep.graph
    assert graph.model_class == "OmniModel" and graph.model_type == "parts: siglip_vision_model + qwen3_moe"
    assert {g.name: g.role for g in graph.groups} == {"encoders.image.encoder.layers": "encoder:vision",
                                                       "foundation.model.layers": "foundation"}
    roles = {b.name: b.role for b in graph.blocks if b.parent is None and b.group is None}
    assert roles["projectors"] == "projector" and roles["foundation.lm_head"] == "head"
    assert roles["encoders.image.embeddings"] == "encoder:vision"
    assert graph.towers["encoder:vision"] == "encoders.image" and graph.towers["foundation"] == "foundation.model"


def test_each_part_gets_its_own_plan(compiled_ep):
    p = compiled_ep.plan
    groups = {g.name: g for g in p.groups}
    vit, llm = groups["encoders.image.encoder.layers"], groups["foundation.model.layers"]
    assert vit.frozen and vit.replicate and vit.ep == 1 and vit.shard_dims == ()
    assert not llm.frozen and not llm.replicate and llm.ep == 2
    assert p.frozen == ("encoders.image",) and p.expert_parallel["modules"][0].startswith("foundation.model.layers.")
    assert p.inputs["image"]["llm_tokens_per_item"] == 16 and p.inputs["ignored_label_token_ids"] == [1000]
    assert p.inputs["text"]["token_high"] == 1000  # synthetic text never draws the placeholder


def test_a_pinned_replicate_on_experts_and_an_uneven_sp_split_of_codes_are_refused(tmp_path):
    spec = {"parts": parts(foundation={"config": str(MODELS / "qwen3_moe_tiny"),
                                       "parallel": {"placement": "replicate"}})}
    assert "its layers hold routed experts" in error_of(tmp_path, spec, {"train": {"seq_len": 64}})
    codes = {"parts": parts(decoders=[{"modality": "text"}, AUDIO_CODEC])}
    assert "key 'train.seq_len': 63 does not split evenly over parallel.sp=2" in error_of(
        tmp_path, {**codes}, {"train": {"seq_len": 63}, "parallel": {"sp": 2}, "cluster": {"procs_per_node": 2}})


def test_the_scripts_omnimodel_builds_what_the_analyzer_read(tmp_path, compiled_ep):
    """The script's OmniModel (imported from the compiled train.py) and omnigen's twin: same parameter names and
    shapes, same frozen ones; and the script's forward places one feature per placeholder."""
    import importlib.util

    import torch

    from omnigen.compose import build_meta, load_parts
    from omnigen.pipeline import render
    from omnigen.emit import write
    write(render(compiled_ep, tmp_path), tmp_path)
    module_spec = importlib.util.spec_from_file_location("composed_train", tmp_path / "train.py")
    script = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(script)
    model = script.build_model()
    twin = build_meta(load_parts(compiled_ep.spec))
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == \
           {n: tuple(p.shape) for n, p in twin.named_parameters()}
    assert {n for n, p in model.named_parameters() if not p.requires_grad} == \
           {n for n, _ in model.named_parameters() if n.startswith("encoders.image.")}
    batch = script.collate([script.make_sample(0, 64, 0)])
    assert int((batch["input_ids"] == 1000).sum()) == 16 and tuple(batch["pixel_values"].shape) == (1, 3, 32, 32)
    labels = batch.pop("shift_labels")
    with torch.no_grad():
        logits = model(**batch).logits
        blank = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape == (1, 64, 1024) and (labels != -100).sum() < 64
    assert not torch.allclose(logits, blank)  # the image's features, not the placeholder embeddings, reach the LLM


def test_verify_frozen_replicated_encoder_and_ep2_foundation(tmp_path):
    """2 CPU ranks: SigLIP frozen and replicated, Qwen3-MoE FSDP + ep=2, every other sample without an image (the
    encoder runs a blank item on those micro-batches), against one process."""
    from omnigen import runner
    assert runner.verify(load_spec(SPEC_EP), steps=2, workdir=str(tmp_path)) == 0


# --- decoders that generate: the image-token head ------------------------------------------------------------

def image_token_spec(tmp_path, **train) -> Path:
    path = tmp_path / "image_tokens.yaml"
    body = parts(decoders=[{"modality": "text"}, {**IMAGE_TOKENS, "loss_weight": 0.5}])
    path.write_text(yaml.safe_dump({
        "name": "image_tokens", "model": {"parts": body},
        "train": {"seq_len": 64, "global_batch_size": 4, "steps": 2, "synthetic": {"image_tokens_every": 2}, **train},
        "parallel": {"dp_shard": 2}}))
    return path


def test_image_token_head_samples_forward_and_weighted_objective(tmp_path):
    """The script's samples end in an image to generate (placeholders whose inputs are codebook embeddings and whose
    targets are the codes, one position early); the head's loss is logged on its own; the objective is the
    weighted sum, each decoder's cross entropy over its own label count."""
    import importlib.util

    import torch

    from omnigen.emit import write
    from omnigen.pipeline import plan, render
    compiled = plan(load_spec(image_token_spec(tmp_path)))
    write(render(compiled, tmp_path / "out"), tmp_path / "out")
    assert [g.role for g in compiled.graph.groups] == ["encoder:vision", "foundation"]
    assert {b.name: b.role for b in compiled.graph.blocks if b.parent is None}["decoders"] == "decoder"
    module_spec = importlib.util.spec_from_file_location("image_tokens_train", tmp_path / "out" / "train.py")
    script = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(script)
    with_image, without = script.make_sample(0, 64, 0), script.make_sample(1, 64, 0)
    at = with_image["input_ids"] == 1001
    assert at[-8:].all() and int(at.sum()) == 8 and not (without["input_ids"] == 1001).any()
    codes, labels = with_image["image_tokens"], with_image["image_tokens_labels"]
    assert torch.equal(labels[-9:-1], codes[-8:]) and (labels[:-9] == -100).all() and labels[-1] == -100
    assert (with_image["shift_labels"][-9:-1] == -100).all()  # the text head never predicts a placeholder
    assert (without["image_tokens_labels"] == -100).all()

    model = script.build_model()
    batches = [script.collate([script.make_sample(i, 64, 0)]) for i in range(2)]
    script.count_decoder_labels(batches, torch.device("cpu"))  # one process: the all-reduce is the identity
    assert [b["image_tokens_label_count"] for b in batches] == [8.0, 8.0]
    text_count = sum(int((b["shift_labels"] != -100).sum()) for b in batches)
    batch = dict(batches[0])
    with torch.no_grad():
        output, loss, terms = script.prediction_loss(model, dict(batch), text_count)
    assert output.logits.shape == (1, 64, 1024) and output.decoder_logits["image_tokens"].shape == (1, 64, 1, 256)
    assert torch.allclose(loss, terms["loss_text"] + 0.5 * terms["loss_image_tokens"])
    expected = torch.nn.functional.cross_entropy(output.decoder_logits["image_tokens"][0, :, 0],
                                                 batch["image_tokens_labels"][0, :, 0], ignore_index=-100,
                                                 reduction="sum") / 8
    assert torch.allclose(terms["loss_image_tokens"], expected)


def test_audio_codec_head_feeds_back_and_predicts_every_codebook(tmp_path):
    """A codec decoder with 4 residual codebooks: each generated position holds one code of each, its input is the
    sum of their embeddings (one slice of the table per codebook), the head predicts all four one position early,
    and the decoder's loss is the mean over every code of the step."""
    import importlib.util

    import torch
    import torch.nn.functional as F

    from omnigen.emit import write
    from omnigen.pipeline import plan, render
    path = tmp_path / "codec.yaml"
    path.write_text(yaml.safe_dump({
        "name": "codec", "model": {"parts": parts(decoders=[{"modality": "text"}, {**AUDIO_CODEC, "loss_weight": 2.0}])},
        "train": {"seq_len": 64, "global_batch_size": 4, "steps": 2, "synthetic": {"audio_codec_every": 2}},
        "parallel": {"dp_shard": 2}}))
    write(render(plan(load_spec(path)), tmp_path / "out"), tmp_path / "out")
    module_spec = importlib.util.spec_from_file_location("codec_train", tmp_path / "out" / "train.py")
    script = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(script)
    sample = script.make_sample(0, 64, 0)
    at = sample["input_ids"] == 1003
    assert at[-6:].all() and int(at.sum()) == 6 and not (script.make_sample(1, 64, 0)["input_ids"] == 1003).any()
    codes, labels = sample["audio_codec"], sample["audio_codec_labels"]
    assert codes.shape == labels.shape == (64, 4) and (codes[:-6] == 0).all() and len(codes[-6:].unique()) > 4
    assert torch.equal(labels[-7:-1], codes[-6:]) and (labels[:-7] == -100).all() and (labels[-1] == -100).all()

    model = script.build_model()
    decoder = model.decoders["audio_codec"]
    assert tuple(decoder.embed.weight.shape) == tuple(decoder.head.weight.shape) == (4 * 64, 64)
    summed = sum(decoder.embed.weight[c * 64 + codes[-1, c]] for c in range(4))
    assert torch.allclose(decoder.embed_codes(codes[None, -1:])[0, 0], summed)

    batches = [script.collate([script.make_sample(i, 64, 0)]) for i in range(2)]
    script.count_decoder_labels(batches, torch.device("cpu"))
    assert [b["audio_codec_label_count"] for b in batches] == [24.0, 24.0]  # 6 positions x 4 codebooks
    text_count = sum(int((b["shift_labels"] != -100).sum()) for b in batches)
    with torch.no_grad():
        output, loss, terms = script.prediction_loss(model, dict(batches[0]), text_count)
        other = dict(batches[0], audio_codec=batches[0]["audio_codec"].clone())
        other["audio_codec"][0, -6, 2] += 1  # one code of the third codebook at the first generated position
        changed = script.prediction_loss(model, other, text_count)[0].decoder_logits["audio_codec"]
    logits = output.decoder_logits["audio_codec"]
    assert logits.shape == (1, 64, 4, 64)
    assert torch.allclose(loss, terms["loss_text"] + 2.0 * terms["loss_audio_codec"])
    expected = F.cross_entropy(logits[0].flatten(0, 1), batches[0]["audio_codec_labels"][0].flatten(),
                               ignore_index=-100, reduction="sum") / 24
    assert torch.allclose(terms["loss_audio_codec"], expected)
    assert torch.allclose(changed[0, :-6], logits[0, :-6], atol=1e-6)  # causal: earlier positions cannot see it
    assert not torch.allclose(changed[0, -6:], logits[0, -6:], atol=1e-3)


def test_image_token_head_needs_synthetic_data(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"input_ids": [5, 6, 7]}\n')
    with pytest.raises(OmnigenError, match="trains on synthetic samples for now"):
        from omnigen.pipeline import plan
        plan(load_spec(image_token_spec(tmp_path, data=str(rows))))


# --- the audio encoder part, and the whole any-to-any example on 4 ranks ----------------------------------------

def test_whisper_encoder_part_takes_its_fixed_mel_window(tmp_path):
    """WhisperEncoder (not exported at transformers' top level) from a WhisperConfig: a clip is its fixed window of
    2 x max_source_positions frames, and each of its max_source_positions outputs is one placeholder; the script
    builds what omnigen's twin builds, and places the clip's features."""
    import importlib.util

    import torch

    from omnigen.compose import build_meta, load_parts
    from omnigen.emit import write
    from omnigen.pipeline import plan, render
    compiled = plan(load_spec(SPEC_OMNI))
    audio = compiled.plan.inputs["audio"]
    assert audio["input_features_shape"] == [1, 16, 16] and audio["llm_tokens_per_item"] == 8
    assert audio["item_kwargs"] == ["input_features"] and audio["token_id"] == 1002
    assert {g.name: g.role for g in compiled.graph.groups}["encoders.audio.layers"] == "encoder:audio"
    write(render(compiled, tmp_path), tmp_path)
    module_spec = importlib.util.spec_from_file_location("omni_train", tmp_path / "train.py")
    script = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(script)
    model = script.build_model()
    twin = build_meta(load_parts(compiled.spec))
    assert type(model.encoders["audio"]).__name__ == "WhisperEncoder"
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == \
           {n: tuple(p.shape) for n, p in twin.named_parameters()}
    batch = script.collate([script.make_sample(0, 64, 0)])  # sample 0 carries an image, a clip and an image to make
    assert int((batch["input_ids"] == 1002).sum()) == 8 and tuple(batch["input_features"].shape) == (1, 16, 16)
    labels = {k: batch.pop(k) for k in list(batch) if k.endswith("labels")}
    with torch.no_grad():
        heard = model(**batch).logits
        deaf = model(**{k: v for k, v in batch.items() if k != "input_features"}).logits
    assert not torch.allclose(heard, deaf) and (labels["image_tokens_labels"] != -100).sum() == 16


@pytest.mark.parametrize("spec", [SPEC_OMNI, SPEC_OMNI_SP], ids=["dp4-ep2", "dp2-sp2-ep2"])
def test_verify_any_to_any_on_4_ranks(tmp_path, spec):
    """The issue's proof: SigLIP (frozen, replicated) + Whisper + Qwen3-MoE (FSDP, ep=2) with a text head, an
    image-token head and a 4-codebook audio-codec head, against one process, with and without Ulysses sp=2; the
    per-decoder losses agree too (verify compares loss_*)."""
    from omnigen import runner
    assert runner.verify(load_spec(spec), steps=2, workdir=str(tmp_path)) == 0


def test_explain_names_each_part_and_who_set_its_placement():
    from omnigen.pipeline import plan
    from omnigen.plan import format_explain
    text = format_explain(plan(load_spec(SPEC_OMNI)).plan, alternatives=False)
    per_part = text[text.index("per part (model.parts):"):].splitlines()
    assert per_part[1].startswith("  encoders.image (image encoder SiglipVisionModel, frozen")
    assert per_part[2].startswith("    encoders.image.encoder.layers: replicated, set by the part's parallel.placement; "
                                  "nearest other: FSDP would take")
    assert "  encoders.audio (audio encoder WhisperEncoder)" in per_part
    assert any(line.startswith("    encoders.audio.layers: FSDP over dp_shard") and "set by the planner" in line
               for line in per_part)
    assert any("experts over ep=2 (parallel.ep), set by the part's parallel.placement" in line for line in per_part)
    assert any("decoders.image_tokens" in line and "in the root unit" in line for line in per_part)


# --- released weights per part ------------------------------------------------------------------------------

def test_parts_start_from_released_weights(tmp_path):
    """Each part loads its own safetensors: a SigLIP vision checkpoint as saved, the encoder of a whole Whisper
    checkpoint (its tensors under model.encoder., the decoder's left unread), a Llama causal LM with tied
    embeddings (MoE foundations: the test below). The script's build_model holds exactly those tensors; weights of another model are
    refused at compile, naming the part's key."""
    import importlib.util

    import torch
    import transformers
    from click.testing import CliRunner

    from omnigen.cli import main

    torch.manual_seed(1)
    siglip = transformers.SiglipVisionModel(transformers.SiglipVisionConfig.from_pretrained(MODELS / "siglip_vision_tiny"))
    whisper = transformers.WhisperForConditionalGeneration(
        transformers.WhisperConfig.from_pretrained(MODELS / "whisper_encoder_tiny"))
    llama_config = transformers.AutoConfig.from_pretrained(MODELS / "llama_tiny")
    llama_config.tie_word_embeddings = True
    llama = transformers.LlamaForCausalLM(llama_config)
    for name, model in (("siglip", siglip), ("whisper", whisper), ("llama", llama)):
        model.save_pretrained(tmp_path / name)
    spec = yaml.safe_load(SPEC_OMNI.read_text())
    spec["name"] = "weights"
    spec["model"]["parts"]["encoders"][0].update(config=str(MODELS / "siglip_vision_tiny"), weights=str(tmp_path / "siglip"))
    spec["model"]["parts"]["encoders"][1].update(config=str(MODELS / "whisper_encoder_tiny"), weights=str(tmp_path / "whisper"))
    spec["model"]["parts"]["foundation"] = {"config": str(tmp_path / "llama"), "weights": str(tmp_path / "llama")}
    spec["parallel"]["ep"] = 1
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "out" / "train.py").read_text()
    assert '"encoders.audio": ("../whisper", "model.encoder.")' in text and '"foundation": ("../llama", "")' in text
    module_spec = importlib.util.spec_from_file_location("weights_train", tmp_path / "out" / "train.py")
    script = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(script)
    built = script.build_model().state_dict()
    for path, part in (("encoders.image", siglip), ("encoders.audio", whisper.model.encoder), ("foundation", llama)):
        for name, tensor in part.state_dict().items():
            assert torch.equal(built[f"{path}.{name}"], tensor), f"{path}.{name}"
    spec["model"]["parts"]["foundation"]["weights"] = str(tmp_path / "siglip")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "spec.yaml"), "-o", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "key 'model.parts.foundation.weights'" in result.output and "missing" in result.output, result.output
    assert not (tmp_path / "bad").exists()


def test_moe_checkpoints_saved_per_expert_load_through_transformers_conversion(tmp_path):
    """transformers' save_pretrained writes a Qwen3-MoE's experts one tensor each (experts.3.gate_proj.weight); the
    model trains them fused (experts.gate_up_proj). Compile checks the names through transformers' conversion rules
    and the script's loader has from_pretrained merge them: as a foundation part and as a whole model
    (model.weights). A checkpoint lacking one expert is refused at compile, naming the key."""
    import importlib.util

    import torch
    import transformers
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file

    from omnigen.cli import main

    torch.manual_seed(2)
    moe = transformers.Qwen3MoeForCausalLM(transformers.AutoConfig.from_pretrained(MODELS / "qwen3_moe_tiny"))
    moe.save_pretrained(tmp_path / "moe")
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in load_file(tmp_path / "moe" / "model.safetensors")
    part_spec = yaml.safe_load(SPEC_EP.read_text())
    part_spec["model"]["parts"]["foundation"].update(config=str(tmp_path / "moe"), weights=str(tmp_path / "moe"))
    part_spec["model"]["parts"]["encoders"][0]["config"] = str(MODELS / "siglip_vision_tiny")
    whole_spec = yaml.safe_load((ROOT / "specs" / "qwen3_moe_tiny_ep2.yaml").read_text())
    whole_spec["model"].update(config=str(tmp_path / "moe"), weights=str(tmp_path / "moe"))
    for name, spec, prefix in (("part", part_spec, "foundation."), ("whole", whole_spec, "")):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        result = CliRunner().invoke(main, ["compile", str(tmp_path / f"{name}.yaml"), "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        module_spec = importlib.util.spec_from_file_location(f"{name}_train", tmp_path / name / "train.py")
        script = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(script)
        built = script.build_model().state_dict()
        for key, tensor in moe.state_dict().items():
            assert torch.equal(built[prefix + key], tensor), key

    held = load_file(tmp_path / "moe" / "model.safetensors")
    (tmp_path / "lacking").mkdir()
    save_file({k: v for k, v in held.items() if ".experts.3." not in k or ".layers.1." not in k},
              tmp_path / "lacking" / "model.safetensors")
    whole_spec["model"]["weights"] = str(tmp_path / "lacking")
    (tmp_path / "lacking.yaml").write_text(yaml.safe_dump(whole_spec))
    result = CliRunner().invoke(main, ["compile", str(tmp_path / "lacking.yaml"), "-o", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "key 'model.weights'" in result.output and "layers.1.mlp.experts" in result.output, result.output
