"""Qwen2.5-Omni's talker trained beside its thinker (spec: model.class Qwen2_5OmniForConditionalGeneration, model.talker).

Compile-time refusals by key, the analyzer and planner seeing the talker as a decoder, and real runs: the generated
script on 2 CPU ranks (dp_shard=2) against the single-process reference, correct and with planted bugs (each marked
PLANTED, a few lines edited into the generated script the way a template bug would put them there)."""

from pathlib import Path

import pytest
import yaml

from omnigen import runner
from omnigen.errors import SpecError
from omnigen.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "qwen25_omni_talker_tiny.yaml"
STEPS = 2


def error_of(tmp_path, sets=(), raw_change=None):
    """The SpecError that compiling the example spec (changed) raises."""
    from omnigen.pipeline import plan
    path = SPEC
    if raw_change is not None:
        raw = yaml.safe_load(SPEC.read_text())
        raw_change(raw)
        raw["model"]["config"] = str(ROOT / "specs" / raw["model"]["config"])
        path = tmp_path / "talker.yaml"
        path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as e:
        plan(load_spec(path, list(sets)))
    return str(e.value)


def thinker_only(raw):
    raw["model"]["config"] = "models/qwen25_omni_thinker_tiny"
    raw["model"]["class"] = "Qwen2_5OmniThinkerForConditionalGeneration"


@pytest.mark.parametrize("sets, change, expected", [
    ((), thinker_only, "key 'model.talker': a talker is trained with model.class Qwen2_5OmniForConditionalGeneration"),
    (("model.overrides.enable_audio_output=false",), None, "key 'model.config': Qwen2_5OmniForConditionalGeneration "
                                                           "with enable_audio_output false is the thinker alone"),
    (("model.talker.reply_tokens=128",), None, "key 'model.talker.reply_tokens': 128 leaves no prompt"),
    (("model.talker.codec_tokens=0",), None, "key 'model.talker.codec_tokens'"),
    (("model.talker.loss_weight=0",), None, "key 'model.talker.loss_weight'"),
    (("model.talker.voice=1",), None, "unknown key 'model.talker.voice'"),
    (("model.overrides.talker_config.embedding_size=32",), None, "talker_config.embedding_size=32 must equal"),
    (("model.overrides.talker_config.tts_codec_end_token_id=600",), None,
     "talker_config.tts_codec_end_token_id=600 is outside the talker's codec vocabulary [0, 512)"),
], ids=["not-the-whole-class", "audio-output-off", "reply", "codec", "weight", "unknown", "width", "codec-id"])
def test_bad_talker_specs_are_refused_by_key(tmp_path, sets, change, expected):
    assert expected in error_of(tmp_path, sets, change)


def test_the_cli_exits_2_naming_the_key():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "omnigen.cli", "plan", str(SPEC), "--set", "model.talker.reply_tokens=200"],
                          capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2 and "model.talker.reply_tokens" in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def compiled():
    from omnigen.pipeline import plan
    return plan(load_spec(SPEC))


def test_the_planner_sees_and_prices_the_talker(compiled):
    """The talker's layers are a group of role decoder, planned (FSDP per layer) and named by plan --explain; its
    sequence (prompt, text bos, codec steps) is what the cost model prices for that role."""
    from omnigen.plan import format_explain, tokens_per_sample
    group = next(g for g in compiled.graph.groups if g.name == "talker.model.layers")
    assert group.role == "decoder" and group.count == 2
    roles = {b.name: b.role for b in compiled.graph.blocks if b.parent is None}
    assert {roles[n] for n in ("talker.thinker_to_talker_proj", "talker.codec_head", "talker.model.embed_tokens")} \
        == {"decoder"}
    planned = next(g for g in compiled.plan.groups if g.name == "talker.model.layers")
    assert planned.shard_dims == ("dp_shard",) and not planned.replicate
    assert tokens_per_sample(compiled.plan.inputs)["decoder"] == 128 - 16 + 1 + 24
    assert "talker.model.layers (2 x Qwen2_5OmniDecoderLayer, decoder)" in format_explain(compiled.plan, alternatives=True)


def test_the_script_trains_thinker_and_talker_together(compiled, tmp_path):
    """The generated script's model (imported from train.py): thinker at the thinker's own paths, the talker beside it,
    the same parameters the analyzer read, and a forward whose codec logits cover the talker's whole sequence."""
    import importlib.util

    import torch

    from omnigen.emit import write
    from omnigen.pipeline import render
    write(render(compiled, tmp_path), tmp_path)
    module_spec = importlib.util.spec_from_file_location("talker_train", tmp_path / "train.py")
    script = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(script)
    script.HERE = str(tmp_path)
    model = script.build_model()
    assert sum(p.numel() for p in model.parameters()) == compiled.graph.total_params
    assert "talker.codec_head.weight" in dict(model.named_parameters())
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in dict(model.named_parameters())
    batch = script.collate([script.make_sample(0, script.SEQ_LEN, script.SEED)])
    batch["codec_codes"] = script.codec_codes(0)[None]
    batch.pop("shift_labels")
    output = model(**batch)
    assert output.codec_logits.shape == (1, script.TALKER_SEQ_LEN, 512)
    assert set(output.keys()) == {"logits", "codec_logits"}  # the hidden states are not returned
    assert int(batch["codec_codes"][0, -1]) == script.CODEC_END
    # the talker reads the thinker: its logits move with the thinker's last layer
    with torch.no_grad():
        model.model.language_model.layers[-1].mlp.down_proj.weight.mul_(2.0)
    assert not torch.allclose(model(**batch).codec_logits, output.codec_logits)


# --- real runs: 2 ranks against one process --------------------------------------------------------------------

def run(folder, plants=(), single_process=False):
    """Compile the example spec into `folder`, make the planted edits (old text, new text), run it; the Run it dumped."""
    s = load_spec(SPEC)
    runner.compile_to(runner.reference_spec(s) if single_process else s, folder)
    runner.dropout_off(folder / "config.json")
    script = folder / "train.py"
    for old, new in plants:
        text = script.read_text()
        assert text.count(old) == 1, f"the planted bug's anchor is not in the script once: {old!r}"
        script.write_text(text.replace(old, new))
    result = runner.run_script(s, folder, STEPS, single_process=single_process)
    assert result is not None, f"{script} failed"
    return result


def failed_checks(ref, par):
    found = runner.compare(ref, par, STEPS, runner.tolerances("fp32", False))
    print({c.what: f"{c.worst:.2e}" + ("" if c.ok else " FAIL") for c in found})
    return {c.what for c in found if not c.ok}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run(tmp_path_factory.mktemp("reference"), single_process=True)



PLANTED = {
    # The speech loss divided by this rank's codec labels, not the global batch's: every rank's share doubles.
    "speech loss over the local count": (
        "    count = all_reduce(torch.tensor(local, dtype=torch.float64, device=device)).item()\n",
        "    count = local  # PLANTED: this rank's codec labels only\n"),
    # The talker reads a detached thinker: no speech gradient reaches the thinker.
    "thinker hidden state detached": (
        "        thinker = hidden_states[-1] + token_embeds\n",
        "        thinker = hidden_states[-1].detach() + token_embeds  # PLANTED\n"),
}


@pytest.mark.distributed
def test_verify_passes_on_two_ranks(reference, tmp_path):
    """Every other sample has no audio clip: rank 1 runs the audio tower on a blank item, tied to the text logits."""
    parallel = run(tmp_path)
    assert not failed_checks(reference, parallel)
    assert {"loss_text", "loss_speech"} <= set(parallel.metrics[0])


@pytest.mark.distributed
@pytest.mark.parametrize("bug", PLANTED, ids=["local-count", "detached"])
def test_each_planted_bug_fails_verify(bug, reference, tmp_path):
    assert failed_checks(reference, run(tmp_path, [PLANTED[bug]]))
